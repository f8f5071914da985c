"""OSTL against its oracles: BPTT on one hidden group, where the paper's single-layer equivalence
holds (position-wise recurrence without `H`; any recurrence through traced weights with it), and
brute-force references of its own approximation from full Jacobians on every model, per step
(without `H`, D-RTRL's `window=0` reference: the two are the same rule on eqtrace's graph)."""

import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqtrace
from eqtrace._compiler._run import flatten_step_inputs

from .brute_force import (
    _flat,
    _group_rows,
    _layout,
    _run,
    _traced_hidden,
    d_rtrl_reference_step,
    memory_as_traces,
    traced_hidden_vector,
    with_traced_hidden,
)
from .helpers import assert_tree_allclose, check_drivers_sum_steps, rule_steps
from .test_d_rtrl import _exact_models, _per_step_bptt, _random_steps, _sequence, MODELS, mse
from .test_eprop import _recurrent


# ------------------------------------------------------------------------------------------
# The reference: OSTL from full Jacobians of the step, masked.


def ostl_reference_step(graph, model, state, x, target, memory, recurrent):
    """One OSTL step. Without `recurrent`, D-RTRL's `window=0` reference. With it, `memory[r]` is
    relation `r`'s `∂h/∂W` estimate as a (hidden × weight) matrix, rows of its groups only:
    `M_t = J M_{t-1} + ∂h_t/∂W`, with `J` the full step Jacobian masked to same-group entries (every
    position), and the gradient `∂L_t/∂W|_{h_{t-1}} + (∂L_t/∂h_{t-1}) M_{t-1}`."""
    if not recurrent:
        return d_rtrl_reference_step(graph, model, state, x, target, mse, memory, window=0)
    weights, xs, hidden = flatten_step_inputs(graph, model, x, state)
    traced = _traced_hidden(graph, hidden)
    offsets, _ = _layout(graph)
    paths = graph.hidden_perturb.hidden_paths
    group = np.concatenate(
        [np.full(offsets[k + 1] - offsets[k], graph.hid_path_to_group[p].index) for k, p in enumerate(paths)]
    )

    def new_of_old(flat_h):
        h = list(hidden)
        for k, i in enumerate(traced):
            h[i] = flat_h[offsets[k] : offsets[k + 1]].reshape(hidden[i].shape)
        return _flat(_run(graph, weights, xs, h)[1])

    h0 = traced_hidden_vector(graph, state)
    jac = jnp.where(group[:, None] == group[None, :], jax.jacfwd(new_of_old)(h0), 0.0)
    signal = jax.grad(lambda h: mse(model(x, with_traced_hidden(graph, state, h))[0], target))(h0)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    same = eqx.filter_grad(lambda p: mse(eqx.combine(p, static)(x, state)[0], target))(params)
    grads = list(jax.tree.leaves(same))
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    new_memory = {}
    for r, rel in enumerate(graph.hidden_param_op_relations):
        w = weights[index[rel.weight_path]]
        rows = _group_rows(graph, offsets, rel.hidden_groups, len(h0))

        def new_of_weight(wv, rel=rel, w=w):
            over = {(rel.eqn_index, rel.operand_index): wv.reshape(w.shape)}
            return _flat(_run(graph, weights, xs, hidden, cut=True, weight_override=over)[1])

        instant = jnp.where(rows[:, None], jax.jacfwd(new_of_weight)(jnp.ravel(w)), 0.0)
        old = memory.get(r, jnp.zeros_like(instant))
        g = index[rel.weight_path]
        grads[g] = grads[g] + (signal @ old).reshape(w.shape)
        new_memory[r] = jac @ old + instant
    return new_memory, grads, model(x, state)[1]


def full_traces(graph, memory, model):
    """The reference memory in `OSTL(recurrent=True)`'s layout, `weight.shape + varshape + (S,)`."""
    offsets, _ = _layout(graph)
    paths = graph.hidden_perturb.hidden_paths
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    weights = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    traces = []
    for r, rel in enumerate(graph.hidden_param_op_relations):
        w = weights[index[rel.weight_path]]
        for group in rel.hidden_groups:
            ks = [k for k, p in enumerate(paths) if p in group.hidden_paths]
            block = jnp.stack([memory[r][offsets[k] : offsets[k + 1]] for k in ks], axis=-1)  # (N, W, S)
            block = block.reshape(group.varshape + w.shape + (len(ks),))
            traces.append(
                jnp.moveaxis(block, tuple(range(len(group.varshape))), tuple(range(w.ndim, block.ndim - 1)))
            )
    return traces


# With `H`: two GRU layers, an LSTM (two states), recurrent ALIF neurons with a leaky readout (two
# groups), positions mixed outside ETP operations, a convolution's shared kernel. Without `H`
# (D-RTRL's `window=0`, tested on every model in test_d_rtrl.py): fewer. A vanilla RNN is checked
# against the reference by the drivers' test below.
REFERENCE_CASES = [
    *[(name, True) for name in ["two_layer_gru", "LSTMCell", "recurrent_alif", "mixing", "conv_leaky"]],
    *[(name, False) for name in ["LSTMCell", "conv_leaky"]],
]


@pytest.mark.parametrize("name, recurrent", REFERENCE_CASES)
def test_ostl_equals_brute_force_reference_per_step(name, recurrent):
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 3)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    memory, ref_state = {}, state
    reference = eqx.filter_jit(ostl_reference_step)
    steps = rule_steps(eqtrace.OSTL(recurrent=recurrent), graph, model, state, xs, targets, mse)
    for x, target, (traces, grads) in zip(xs, targets, steps):
        memory, ref_grads, ref_state = reference(graph, model, ref_state, x, target, memory, recurrent)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        if recurrent:
            ref_traces = full_traces(graph, memory, model)
        else:
            ref_traces, off_diagonal = memory_as_traces(graph, memory, model)
            assert off_diagonal == 0.0
        assert_tree_allclose(list(traces.eps), ref_traces)
        assert_tree_allclose(traces.state, ref_state)
    # A convolution's kernel (shared across positions) is traced per position, with `H` or without.
    assert any(bool(jnp.any(e != 0)) for e in traces.eps)


# ------------------------------------------------------------------------------------------
# Exact for a single layer: one hidden group read by a stateless readout.


def _single_layer_models(recurrent):
    """Models of one hidden group whose weights are all traced; with `recurrent`, also those whose
    recurrence goes through ETP operations (a dense `H`)."""
    models = [(n, m, s) for n, m, s in _exact_models(readout=True) if not recurrent or n == "two_state"]
    if recurrent:
        for name in ["single_layer_rnn", "LSTMCell"]:
            models.append((name, MODELS[name], MODELS[name].init_state()))
        model = _recurrent("alif")
        models.append(("recurrent_alif", model, model.init_state()))
    return models


@pytest.mark.parametrize("recurrent", [False, True], ids=["without_H", "with_H"])
def test_ostl_equals_bptt_per_step_on_one_layer(recurrent):
    for name, model, state in _single_layer_models(recurrent):
        x0 = jnp.zeros(3)
        graph = eqtrace.compile_etrace_graph(model, x0, state)
        assert len(graph.hidden_groups) == 1, name
        # Every weight is traced, or read out without state.
        assert all(e.reason == "non_temporal" for e in graph.excluded_weights), name
        xs, targets = _sequence(model(x0, state)[0].shape[0], 3, 4, jax.random.key(1))
        xs = 3.0 * xs  # spiking neurons fire
        steps = rule_steps(eqtrace.OSTL(recurrent=recurrent), graph, model, state, xs, targets, mse)
        live = None
        for t, (_, grads) in enumerate(steps):
            assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
            nonzero = [bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads)]
            live = nonzero if live is None else [a or b for a, b in zip(live, nonzero, strict=True)]
        assert all(live), name  # every leaf got a gradient


@pytest.mark.parametrize(
    "name, recurrent",
    [
        ("single_layer_rnn", False),
        ("LSTMCell", False),
        ("GRUCell", True),
        ("MGUCell", True),
        ("two_layer_gru", True),
    ],
)
def test_ostl_is_not_bptt_beyond_its_claim(name, recurrent):
    """Without `H` the recurrent weight's mixing is dropped. With it, two layers still drop the
    temporal paths that cross layers; and a weight that reaches the state through the input of
    another ETP operation gets only its same-step gradient along that path: a GRU's reset gate
    (`r ⊙ h` into the recurrent matmul, excluded as `via_other_etp_op`) and an MGU's forget gate
    (traced through `(1 - f) ⊙ h + f ⊙ h̃`, but also in `f ⊙ h` read by the candidate's matmul)."""
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 4)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    grads = list(rule_steps(eqtrace.OSTL(recurrent=recurrent), graph, model, state, xs, targets, mse))[-1][1]
    exact = _per_step_bptt(model, state, xs, targets, 3)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(exact)))
    assert gap > 1e-6


@pytest.mark.parametrize("name", ["two_layer_gru", "recurrent_alif"])
def test_ostl_without_h_is_d_rtrl_window_0(name):
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 3)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    ostl = rule_steps(eqtrace.OSTL(), graph, model, state, xs, targets, mse)
    drtrl = rule_steps(eqtrace.DRTRL(window=0), graph, model, state, xs, targets, mse)
    for (o_traces, o_grads), (d_traces, d_grads) in zip(ostl, drtrl):
        assert_tree_allclose(o_grads, d_grads)
        assert_tree_allclose(list(o_traces.eps), list(d_traces.eps))
    assert any(bool(jnp.any(e != 0)) for e in o_traces.eps)


# ------------------------------------------------------------------------------------------
# Drivers, docs and checks.


@pytest.mark.parametrize("recurrent", [False, True], ids=["without_H", "with_H"])
def test_drivers_sum_the_reference_steps_under_filter_jit(recurrent):
    model = MODELS["single_layer_rnn"]
    state = model.init_state()
    batch = [_random_steps(model, 3, seed=s) for s in (10, 11)]
    reference_step = eqx.filter_jit(ostl_reference_step)
    xs, targets = jnp.stack([b[0] for b in batch]), jnp.stack([b[1] for b in batch])
    graph = eqtrace.compile_etrace_graph(model, xs[0, 0], state)

    treedef = jax.tree.structure(eqx.filter(model, eqx.is_inexact_array))

    def reference(xs, targets):
        memory, s = {}, state
        for x, target in zip(xs, targets):
            memory, g, s = reference_step(graph, model, s, x, target, memory, recurrent)
            yield jax.tree.unflatten(treedef, g)

    rule = eqtrace.OSTL(recurrent=recurrent)
    grads, _ = check_drivers_sum_steps(rule, model, state, xs, targets, mse, reference)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "page, printed",
    [("ostl.md", "OSTL(recurrent=True)"), ("not-included.md", "three-factor updates")],
)
def test_docs_pages_run(page, printed, capsys):
    path = pathlib.Path(__file__).parent.parent / "docs" / "rules" / page
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    assert blocks
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):
        for block in blocks:
            exec(compile(block, str(path), "exec"), namespace)
    assert printed in capsys.readouterr().out


def test_bad_options_and_traces():
    with pytest.raises((TypeError, ValueError), match="recurrent"):  # beartype, or the rule
        eqtrace.OSTL(recurrent=1)
    with pytest.raises(ValueError, match="`max_size`"):
        eqtrace.OSTL(max_size=-1)
    model = MODELS["single_layer_rnn"]
    state = model.init_state()
    xs, targets = _random_steps(model, 1)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    with pytest.raises(ValueError, match="max_size"):
        eqtrace.OSTL(recurrent=True, max_size=10).init(graph, model, state)
    rule = eqtrace.OSTL()
    traces = rule.init(graph, model, state)
    with pytest.raises(ValueError, match="one example at a time"):
        rule.step(graph, model, traces, xs[0], targets[0], mse, batched=True)
    with pytest.raises(ValueError, match="recurrent=False"):
        eqtrace.OSTL(recurrent=True).step(graph, model, traces, xs[0], targets[0], mse)
    other = MODELS["GRUCell"]
    other_traces = rule.init(eqtrace.compile_etrace_graph(other, xs[0], other.init_state()), other, state)
    with pytest.raises((TypeError, ValueError), match=r"OSTL\(\)\.init"):
        rule.step(graph, model, other_traces, xs[0], targets[0], mse)
    conv = MODELS["conv_leaky"]
    conv_graph = eqtrace.compile_etrace_graph(conv, jnp.zeros((2, 5)), conv.init_state())
    shared = [r for r in conv_graph.hidden_param_op_relations if not r.position_diagonal]
    assert shared and eqtrace.OSTL(recurrent=True).traces_relation(shared[0])
    assert eqtrace.OSTL().traces_relation(shared[0]) and shared[0].shared_axes
    assert not eqtrace.OSTL.batch_native
