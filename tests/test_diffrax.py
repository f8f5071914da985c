"""Neurons whose step is an ODE solved by Diffrax: `dV/dt = (-V + W x) / τ` over one `dt` per step.

The solve is a loop (inside a `jax.custom_vjp` under Diffrax's default adjoint) whose body acts
position by position, so the compiler finds one position-wise group fed element-wise by the input
weight and by the learnable time constant; D-RTRL is then exact, per step, against BPTT.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose, bptt_step_grads, d_rtrl_step_grads


DT = 0.5
SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "tsit5": diffrax.Tsit5}
ADJOINTS = {"default": diffrax.RecursiveCheckpointAdjoint, "direct": diffrax.DirectAdjoint}


def mse(y, t):
    return jnp.sum((y - t) ** 2)


class ODENeurons(eqx.Module):
    """Leaky integrators `dV/dt = (-V + W x + b) / τ`, `τ = exp(log_tau)` learnt per neuron, read
    out through `tanh`. The input layer and `τ` are applied before the solve; the vector field reads
    them through `args` and its closure."""

    inputs: enn.Linear
    log_tau: jax.Array
    readout: enn.Linear
    solver: diffrax.AbstractSolver
    adjoint: diffrax.AbstractAdjoint

    def __call__(self, x, v):
        current = self.inputs(x)
        tau = eqtrace.element_wise(self.log_tau, jnp.exp)
        term = diffrax.ODETerm(lambda t, v, current: (-v + current) / tau)
        solution = diffrax.diffeqsolve(term, self.solver, 0.0, DT, DT, v, args=current, adjoint=self.adjoint)
        v = solution.ys[-1]
        return self.readout(jnp.tanh(v)), v


def _neurons(solver="tsit5", adjoint="default"):
    k1, k2 = jax.random.split(jax.random.key(0))
    return ODENeurons(
        enn.Linear(3, 4, key=k1),
        jnp.log(jnp.array([0.5, 1.0, 2.0, 4.0])),
        enn.Linear(4, 2, key=k2),
        SOLVERS[solver](),
        ADJOINTS[adjoint](),
    )


@pytest.mark.parametrize("adjoint", sorted(ADJOINTS))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_ode_neuron_graph(solver, adjoint):
    graph = eqtrace.compile_etrace_graph(_neurons(solver, adjoint), jnp.zeros(3), jnp.zeros(4))
    [group] = graph.hidden_groups
    assert group.position_wise and group.recurrent
    assert {r.weight_path for r in graph.hidden_param_op_relations} == {
        ("inputs", "weight"),
        ("inputs", "bias"),
        ("log_tau",),
    }
    assert {w.weight_path: w.reason for w in graph.excluded_weights} == {
        ("readout", "weight"): "non_temporal",
        ("readout", "bias"): "non_temporal",
    }
    # The default adjoint wraps the solve in a `jax.custom_vjp`: linearised in reverse mode.
    assert graph.module_info.forward_differentiable == (adjoint == "direct")


def test_tsit5_neuron_with_learnable_time_constant_is_exact_per_step():
    """Tsit5 under the default adjoint (reverse-mode linearisation): D-RTRL equals BPTT per step."""
    model, state = _neurons("tsit5", "default"), jnp.zeros(4)
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    xs = jax.random.normal(jax.random.key(1), (4, 3))
    ts = jax.random.normal(jax.random.key(2), (4, 2))
    online = d_rtrl_step_grads(graph, model, state, xs, ts, mse)
    reference = bptt_step_grads(model, state, xs, ts, mse)
    assert_tree_allclose(jax.tree.leaves(online), jax.tree.leaves(reference), rtol=1e-9, atol=1e-12)
    assert all(jnp.all(jnp.any(leaf.reshape(len(xs), -1) != 0, axis=1)) for leaf in jax.tree.leaves(online))


class WeightInVectorField(eqx.Module):
    """The tagged input weight applied inside the vector field, i.e. inside the solver's loop."""

    w: jax.Array

    def __call__(self, x, v):
        term = diffrax.ODETerm(lambda t, v, x: -v + eqtrace.matmul(x, self.w))
        v = diffrax.diffeqsolve(term, diffrax.Euler(), 0.0, DT, DT, v, args=x).ys[-1]
        return v, v


def test_etp_op_inside_the_vector_field_is_refused():
    with pytest.raises(ValueError) as info:
        eqtrace.compile_etrace_graph(WeightInVectorField(jnp.ones((3, 4))), jnp.zeros(3), jnp.zeros(4))
    message = str(info.value)
    assert "(etp_matmul) is used inside `while`" in message
    assert "inside `custom_vjp_call`" in message
    assert "before the solve and pass it through `args`" in message
