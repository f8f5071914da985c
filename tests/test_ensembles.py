"""Ensembles: a population of cells with batched weights (`eqx.filter_vmap`) inside one step.

The ETP operations keep their tag under `vmap` whatever operands are batched, so every weight of
the ensemble is found; each output position reads its own member's weights, so D-RTRL's
weight-shaped trace is exact for an ensemble of position-diagonal cells.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .brute_force import d_rtrl_reference_step
from .helpers import assert_tree_allclose


N_IN, N_HID, N_MEMBERS, T = 3, 5, 4, 6


def mse(y, t):
    return jnp.sum((y - t) ** 2)


class Ensemble(eqx.Module):
    """`N_MEMBERS` cells of one kind, each with its own weights, reading the same input."""

    cells: enn.AbstractRNNCell

    def __init__(self, cell_cls, *, key):
        keys = jax.random.split(key, N_MEMBERS)
        self.cells = eqx.filter_vmap(lambda k: cell_cls(N_IN, N_HID, key=k))(keys)

    def __call__(self, x, state):
        new = eqx.filter_vmap(lambda c, s: c(x, s))(self.cells, state)
        return jnp.sum(new.h, axis=0), new

    def init_state(self):
        return eqx.filter_vmap(lambda c: c.init_state())(self.cells)


class SharedInputWeight(eqx.Module):
    """Members with their own recurrence `u` and input `x[e]` but one input weight `w` for all."""

    w: jax.Array
    u: jax.Array

    def __call__(self, x, h):
        def member(x, u, h):
            return jnp.tanh(eqtrace.matmul(x, self.w) + eqtrace.element_wise(u) * h)

        h = jax.vmap(member)(x, self.u, h)
        return jnp.sum(h, axis=0), h

    def init_state(self):
        return jnp.zeros(self.u.shape)


def _data(key, n_in=N_IN):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (T, n_in)), jax.random.normal(k2, (T, N_HID))


def _per_step_bptt(model, state, xs, targets, t):
    """`∂L_t/∂θ` by back-propagation through the first `t + 1` steps."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_t(params):
        m, s = eqx.combine(params, static), state
        for i in range(t + 1):
            y, s = m(xs[i], s)
        return mse(y, targets[t])

    return jax.grad(loss_t)(params)


def _assert_live(grads):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert jnp.all(jnp.isfinite(g)), f"non-finite gradient for {jax.tree_util.keystr(path)}"
        assert jnp.any(g != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def test_ensemble_compiles_with_relations_for_its_weights():
    model = Ensemble(enn.IndRNNCell, key=jax.random.key(0))
    assert model.cells.W.weight.shape == (N_MEMBERS, N_IN, N_HID)
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(N_IN), model.init_state())
    [group] = graph.hidden_groups
    assert group.hidden_paths == (("h",),)
    assert group.varshape == (N_MEMBERS, N_HID) and group.position_wise and group.recurrent
    rel = {r.weight_path: r for r in graph.hidden_param_op_relations}
    assert set(rel) == {("cells", "W", "weight"), ("cells", "W", "bias"), ("cells", "u")}
    assert not graph.excluded_weights
    assert rel[("cells", "W", "weight")].primitive is eqtrace.etp_matmul_p
    assert rel[("cells", "u")].primitive is eqtrace.etp_element_wise_p
    assert all(r.position_diagonal and r.hidden_groups == (group,) for r in rel.values())
    # The member and output axes of the weight are the positions; its input axis is not.
    assert rel[("cells", "W", "weight")].input_axes == (1,)
    assert rel[("cells", "W", "bias")].input_axes == rel[("cells", "u")].input_axes == ()


def test_d_rtrl_equals_bptt_on_an_ensemble_per_step():
    model = Ensemble(enn.IndRNNCell, key=jax.random.key(1))
    state = model.init_state()
    xs, targets = _data(jax.random.key(2))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    for t in range(T):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
    _assert_live(grads)


def test_online_grad_equals_bptt_grad_on_an_ensemble():
    model = Ensemble(enn.IndRNNCell, key=jax.random.key(3))
    xs, targets = _data(jax.random.key(4))
    grads, losses = eqtrace.online_grad(model, model.init_state(), xs, targets, mse, algorithm="d_rtrl")
    ref, ref_losses = eqtrace.bptt_grad(model, model.init_state(), xs, targets, mse)
    assert_tree_allclose(losses, ref_losses)
    assert_tree_allclose(grads, ref)
    _assert_live(grads)


def test_batch_of_examples_through_an_ensemble():
    """A `vmap` over examples around the ensemble's own `vmap` over members."""
    model = Ensemble(enn.IndRNNCell, key=jax.random.key(5))
    xs, targets = jax.vmap(_data)(jax.random.split(jax.random.key(6), 3))
    states = jax.tree.map(lambda h: jnp.broadcast_to(h, (3,) + h.shape), model.init_state())
    grads, _ = eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, targets, mse, algorithm="d_rtrl")
    ref, _ = eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, targets, mse)
    assert_tree_allclose(grads, ref)
    es, _ = eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, targets, mse, algorithm="es_d_rtrl")
    _assert_live(es)


@pytest.mark.parametrize("cell_cls", [enn.IndRNNCell, enn.VanillaRNNCell, enn.GRUCell])
@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
def test_every_leaf_of_an_ensemble_gets_a_gradient(cell_cls, algorithm):
    model = Ensemble(cell_cls, key=jax.random.key(7))
    xs, targets = _data(jax.random.key(8))
    graph = eqtrace.compile_etrace_graph(model, xs[0], model.init_state())
    assert graph.hidden_param_op_relations
    accounted = {r.weight_path for r in graph.hidden_param_op_relations}
    accounted |= {w.weight_path for w in graph.excluded_weights}
    assert accounted == set(graph.module_info.weight_paths)
    grads, _ = eqtrace.online_grad(model, model.init_state(), xs, targets, mse, algorithm=algorithm)
    _assert_live(grads)


def _shared_input_model():
    k1, k2 = jax.random.split(jax.random.key(9))
    u = jax.random.uniform(k2, (N_MEMBERS, N_HID), minval=0.2, maxval=0.9)
    return SharedInputWeight(jax.random.normal(k1, (N_IN, N_HID)), u)


APPROXIMATE = {
    "gru": lambda: (Ensemble(enn.GRUCell, key=jax.random.key(10)), (N_IN,)),
    "shared_input_weight": lambda: (_shared_input_model(), (N_MEMBERS, N_IN)),
}


@pytest.mark.parametrize("name", sorted(APPROXIMATE))
def test_d_rtrl_equals_brute_force_reference_on_ensembles(name):
    """Where D-RTRL is an approximation, it still equals the same approximation from full Jacobians."""
    model, x_shape = APPROXIMATE[name]()
    state = model.init_state()
    xs = jax.random.normal(jax.random.key(11), (4, *x_shape))
    targets = jax.random.normal(jax.random.key(12), (4, N_HID))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    if name == "shared_input_weight":
        # One weight read by every member: shared across positions, as a convolution's kernel is.
        rel = {r.weight_path: r for r in graph.hidden_param_op_relations}
        assert not rel[("w",)].position_diagonal and rel[("u",)].position_diagonal
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    memory, ref_state = {}, state
    for x, target in zip(xs, targets):
        traces, _, _, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = d_rtrl_reference_step(graph, model, ref_state, x, target, mse, memory)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        assert_tree_allclose(traces.state, ref_state)
