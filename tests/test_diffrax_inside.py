"""Weights inside an ODE's vector field: `dV/dt = (-V + lin(x)) / τ` with `lin` an untagged
`eqx.nn.Linear` and `τ = exp(log_tau)`, both applied in the vector field that Diffrax calls in its
loop.

Computed from the weights and the step's input alone, they are the same on every iteration: the
compiler moves them out of the loops (and of the custom derivative of Diffrax's default adjoint),
infers their ETP operations, and D-RTRL equals BPTT per step. A product of what the loop carries
(`W @ v`) cannot be moved: its weight is excluded with a reason that names the loop.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
from eqtrace._compiler._evaluate import evaluate
from eqtrace._compiler._run import flatten_step_inputs

from .helpers import assert_tree_allclose, bptt_step_grads, d_rtrl_step_grads


DT = 0.5
SOLVERS = {"euler": diffrax.Euler, "tsit5": diffrax.Tsit5}
ADJOINTS = {"default": diffrax.RecursiveCheckpointAdjoint, "direct": diffrax.DirectAdjoint}


def mse(y, t):
    return jnp.sum((y - t) ** 2)


class InsideNeurons(eqx.Module):
    """Leaky integrators whose input layer and time constants are applied in the vector field;
    with `recurrent`, the vector field also reads `W_rec tanh(V)`, a product of what the solver's
    loop carries."""

    lin: eqx.nn.Linear
    log_tau: jax.Array
    w_rec: jax.Array
    readout: eqx.nn.Linear
    solver: diffrax.AbstractSolver
    adjoint: diffrax.AbstractAdjoint
    recurrent: bool = eqx.field(static=True)

    def __call__(self, x, v):
        def field(t, v, x):
            drive = self.lin(x) + (self.w_rec @ jnp.tanh(v) if self.recurrent else 0.0)
            return (-v + drive) / jnp.exp(self.log_tau)

        term = diffrax.ODETerm(field)
        v = diffrax.diffeqsolve(term, self.solver, 0.0, DT, DT, v, args=x, adjoint=self.adjoint).ys[-1]
        return self.readout(jnp.tanh(v)), v


def _neurons(solver="euler", adjoint="default", recurrent=False):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return InsideNeurons(
        eqx.nn.Linear(3, 4, key=k1),
        jnp.log(jnp.array([0.5, 1.0, 2.0, 4.0])),
        0.5 * jax.random.normal(k2, (4, 4)),
        eqx.nn.Linear(4, 2, key=k3),
        SOLVERS[solver](),
        ADJOINTS[adjoint](),
        recurrent,
    )


def _compile(model):
    return eqtrace.compile_etrace_graph(model, jnp.zeros(3), jnp.zeros(4))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_weights_in_the_vector_field_are_exact_per_step(solver):
    """Default adjoint (a `jax.custom_vjp` around the solve): D-RTRL equals BPTT at every step."""
    model, state = _neurons(solver), jnp.zeros(4)
    graph = _compile(model)
    assert {r.weight_path: r.inferred for r in graph.hidden_param_op_relations} == {
        ("lin", "weight"): True,
        ("lin", "bias"): True,
        ("log_tau",): True,
    }
    assert not graph.partly_traced_weights
    assert "--etp_inferred_linear-->  [0]  (inferred" in eqtrace._compiler._show.format_graph(graph)
    xs = jax.random.normal(jax.random.key(1), (3, 3))
    ts = jax.random.normal(jax.random.key(2), (3, 2))
    online = d_rtrl_step_grads(graph, model, state, xs, ts, mse)
    reference = bptt_step_grads(model, state, xs, ts, mse)
    assert_tree_allclose(online, reference, rtol=1e-9, atol=1e-12)
    # The traces carry credit across steps: the last step's gradient is not its same-step part.
    assert float(jnp.max(jnp.abs(online.lin.weight[-1]))) > 1e-3


@pytest.mark.parametrize("adjoint", sorted(ADJOINTS))
def test_moved_step_has_the_values_and_derivatives_of_the_model(adjoint):
    """The compiled step, with the weights' computations moved out of the solve, against the model
    itself: values, reverse mode (through the custom derivative under the default adjoint), and
    forward mode where the model has one."""
    model = _neurons("tsit5" if adjoint == "default" else "euler", adjoint)
    graph = _compile(model)
    x, v = jnp.array([0.3, -0.5, 0.8]), jnp.array([0.1, 0.2, -0.3, 0.4])
    flat = flatten_step_inputs(graph, model, x, v)
    args = [*flat[0], *flat[1], *flat[2]]
    dynamic, static = eqx.partition((model, x, v), eqx.is_array)

    def moved(*a):
        return evaluate(graph.module_info.closed_jaxpr, a)

    def original(*a):
        y, h = eqx.combine(jax.tree.unflatten(jax.tree.structure(dynamic), a), static)[0](*a[-2:])
        return [*jax.tree.leaves(y), *jax.tree.leaves(h)]

    outs = jax.eval_shape(moved, *args)
    cts = [jax.random.normal(jax.random.key(i), o.shape) for i, o in enumerate(outs)]
    tangents = [jax.random.normal(jax.random.key(10 + i), a.shape) for i, a in enumerate(args)]

    @eqx.filter_jit
    def check(f):
        pull = jax.vjp(f, *args)[1]
        # Forward mode goes through `DirectAdjoint` only (the default adjoint is a `custom_vjp`).
        push = jax.jvp(f, args, tangents)[1] if adjoint == "direct" else []
        return f(*args), pull(cts), push

    got, want = check(moved), check(original)
    assert_tree_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_product_of_the_carried_state_is_flagged(solver):
    """`W_rec tanh(V)` in the vector field changes at every stage of the solve: `W_rec` stays in
    the loop, excluded with a reason that names it. The input layer's output then mixes with it in
    the loop, so it stays under the custom derivative, excluded with a reason too."""
    graph = _compile(_neurons(solver, "default", recurrent=True))
    excluded = {w.weight_path: w for w in graph.excluded_weights}
    assert excluded[("w_rec",)].reason == excluded[("lin", "weight")].reason == "no_etp_op"
    detail = excluded[("w_rec",)].detail
    assert "`dot_general` inside `while` inside `custom_vjp_call`" in detail
    assert "`W @ v`" in detail and "not traced" in detail
    assert "inside `custom_vjp_call`" in excluded[("lin", "weight")].detail
    assert "mixes positions" in excluded[("lin", "weight")].detail
    assert not graph.hidden_param_op_relations or all(
        r.weight_path not in excluded for r in graph.hidden_param_op_relations
    )
    assert detail in eqtrace._compiler._show.format_graph(graph)


LOOPS = {
    "fori_loop": lambda w, x, v: jax.lax.fori_loop(0, 2, lambda _, v: 0.8 * v + 0.2 * jnp.tanh(w @ x), v),
    "cond": lambda w, x, v: jax.lax.cond(
        jnp.sum(x) > 0, lambda v: 0.8 * v + 0.2 * jnp.tanh(w @ x), lambda v: 0.9 * v - w @ x, v
    ),
    "checkpoint": lambda w, x, v: jax.checkpoint(lambda v: 0.8 * v + 0.2 * jnp.tanh(w @ x))(v),
}


class LoopNeurons(eqx.Module):
    """`W @ x` inside a loop, a branch or a checkpoint, not tagged."""

    w: jax.Array
    readout: jax.Array
    construct: str = eqx.field(static=True)

    def __call__(self, x, v):
        v = LOOPS[self.construct](self.w, x, v)
        return self.readout @ v, v


@pytest.mark.parametrize("construct", sorted(LOOPS))
def test_weight_products_leave_plain_loops_and_branches(construct):
    """The same motion out of `lax` constructs: exact per step, the weight traced and inferred."""
    k1, k2 = jax.random.split(jax.random.key(0))
    model = LoopNeurons(jax.random.normal(k1, (4, 3)), jax.random.normal(k2, (2, 4)), construct)
    state = jnp.zeros(4)
    graph = _compile(model)
    assert {r.weight_path for r in graph.hidden_param_op_relations} == {("w",)}
    assert all(r.inferred for r in graph.hidden_param_op_relations)
    xs = jax.random.normal(jax.random.key(1), (4, 3))
    ts = jax.random.normal(jax.random.key(2), (4, 2))
    traces, online = eqtrace.d_rtrl_init(graph, model, state), []
    for x, t in zip(xs, ts):
        traces, _, _, g = eqtrace.d_rtrl_step(graph, model, traces, x, t, mse)
        online.append(g)
    online = jax.tree.map(lambda *a: jnp.stack(a), *online)
    assert_tree_allclose(online, bptt_step_grads(model, state, xs, ts, mse), rtol=1e-9, atol=1e-12)


@jax.custom_vjp
def _spike_of_drive(w, x, v):
    """A spike of `v + W x` with a surrogate gradient: a custom rule that is not its primal's
    derivative, so nothing may be moved out of it."""
    return (v + w @ x > 0).astype(v.dtype)


def _spike_fwd(w, x, v):
    return _spike_of_drive(w, x, v), (w, x, v)


def _spike_bwd(res, ct):
    w, x, v = res
    s = ct / (1 + jnp.abs(v + w @ x)) ** 2
    return jnp.outer(s, x), w.T @ s, s


_spike_of_drive.defvjp(_spike_fwd, _spike_bwd)


class SurrogateNeurons(eqx.Module):
    w: jax.Array
    readout: jax.Array

    def __call__(self, x, v):
        v = 0.8 * v + _spike_of_drive(self.w, x, v)
        return self.readout @ v, v


def test_product_under_a_surrogate_gradient_is_flagged():
    model = SurrogateNeurons(jax.random.normal(jax.random.key(0), (4, 3)), jnp.ones((2, 4)))
    graph = _compile(model)
    assert not graph.hidden_param_op_relations
    [w] = [w for w in graph.excluded_weights if w.weight_path == ("w",)]
    assert w.reason == "no_etp_op"
    assert "inside `custom_vjp_call`, a custom derivative that is not a loop's" in w.detail
