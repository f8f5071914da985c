"""Loops, branches and custom derivatives inside one step.

A `lax.fori_loop`, `while_loop`, `scan`, `cond` or `switch` whose body acts position by position is
element-wise for the compiler, like the operations in it: D-RTRL is then exact on a position-wise
model, per step. An ETP operation inside one is refused with an error that names the construct. A
`jax.custom_vjp` function in the step (a surrogate spike, an ODE solve) has no forward-mode
derivative: every rule linearises such a step in reverse mode, with the function's own derivative.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose, bptt_step_grads, d_rtrl_step_grads


def mse(y, t):
    return jnp.sum((y - t) ** 2)


def _leak(v, drive):
    """One update `v ← 0.8 v + 0.2 tanh(drive)`; the constructs below repeat or select it."""
    return 0.8 * v + 0.2 * jnp.tanh(drive)


BODIES = {
    "fori_loop": lambda v, i: lax.fori_loop(0, 2, lambda _, v: _leak(v, i), v),
    "while_loop": lambda v, i: lax.while_loop(
        lambda c: c[0] < 2, lambda c: (c[0] + 1, _leak(c[1], i)), (jnp.int32(0), v)
    )[1],
    "scan": lambda v, i: lax.scan(lambda v, d: (_leak(v, i * d), v), v, jnp.array([1.0, 0.5]))[0],
    "cond": lambda v, i: lax.cond(jnp.sum(i) > 0, _leak, lambda v, i: _leak(v, -i), v, i),
    "switch": lambda v, i: lax.switch(jnp.argmax(i) % 3, [_leak, lambda v, i: 0.9 * v + i, _leak], v, i),
}


class LoopCell(eqx.Module):
    """`v ← body(v, x W)`, then a readout: the weight applied before the construct."""

    w: jax.Array
    readout: enn.Linear
    body: str = eqx.field(static=True)

    def __call__(self, x, v):
        v = BODIES[self.body](v, eqtrace.matmul(x, self.w))
        return self.readout(v), v


def _loop_cell(body):
    k1, k2 = jax.random.split(jax.random.key(0))
    return LoopCell(jax.random.normal(k1, (3, 4)), enn.Linear(4, 2, key=k2), body)


@pytest.mark.parametrize("body", sorted(BODIES))
def test_position_wise_control_flow_is_element_wise(body):
    graph = eqtrace.compile_etrace_graph(_loop_cell(body), jnp.zeros(3), jnp.zeros(4))
    [group] = graph.hidden_groups
    assert group.position_wise and group.recurrent
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("w",)]
    assert {w.weight_path: w.reason for w in graph.excluded_weights} == {
        ("readout", "weight"): "non_temporal",
        ("readout", "bias"): "non_temporal",
    }


# A `while_loop` has no reverse-mode derivative in JAX (BPTT cannot run through it either).
@pytest.mark.parametrize("body", sorted(set(BODIES) - {"while_loop"}))
def test_d_rtrl_is_exact_through_position_wise_control_flow(body):
    model, state = _loop_cell(body), jnp.zeros(4)
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    ts = jax.random.normal(jax.random.key(2), (5, 2))
    online = d_rtrl_step_grads(graph, model, state, xs, ts, mse)
    reference = bptt_step_grads(model, state, xs, ts, mse)
    assert_tree_allclose(jax.tree.leaves(online), jax.tree.leaves(reference), rtol=1e-9, atol=1e-12)
    assert jnp.all(jnp.any(online.w != 0, axis=(1, 2)))  # every step credits the weight


class RollingCell(eqx.Module):
    """A loop whose body mixes positions (`jnp.roll`): not element-wise."""

    w: jax.Array

    def __call__(self, x, v):
        i = eqtrace.matmul(x, self.w)
        v = lax.fori_loop(0, 2, lambda _, v: 0.5 * jnp.roll(v, 1) + jnp.tanh(i), v)
        return v, v


def test_mixing_loop_body_is_not_element_wise():
    model = RollingCell(jax.random.normal(jax.random.key(0), (3, 4)))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), jnp.zeros(4))
    [group] = graph.hidden_groups
    assert not group.position_wise
    assert {w.weight_path: w.reason for w in graph.excluded_weights} == {("w",): "not_element_wise"}


class EtpInside(eqx.Module):
    w: jax.Array
    construct: str = eqx.field(static=True)

    def __call__(self, x, v):
        f = lambda v: 0.5 * v + eqtrace.matmul(x, self.w)  # noqa: E731
        if self.construct == "fori_loop":
            v = lax.fori_loop(0, 2, lambda _, v: f(v), v)
        elif self.construct == "scan":
            v = lax.scan(lambda v, _: (f(v), None), v, length=2)[0]
        else:
            v = lax.cond(jnp.sum(x) > 0, f, lambda v: v, v)
        return v, v


@pytest.mark.parametrize("construct, primitive", [("fori_loop", "scan"), ("scan", "scan"), ("cond", "cond")])
def test_etp_op_inside_control_flow_is_refused(construct, primitive):
    model = EtpInside(jnp.ones((3, 4)), construct)
    with pytest.raises(ValueError) as info:
        eqtrace.compile_etrace_graph(model, jnp.zeros(3), jnp.zeros(4))
    message = str(info.value)
    assert f"(etp_matmul) is used inside `{primitive}`" in message
    assert "test_control_flow.py" in message  # where the user's code calls it
    assert "Apply the operation before the loop and pass its output in" in message


@jax.custom_vjp
def vjp_spike(v):
    """A Heaviside spike whose `custom_vjp` derivative is a surrogate: not the primal's (zero)."""
    return (v > 0).astype(v.dtype)


vjp_spike.defvjp(lambda v: (vjp_spike(v), v), lambda v, g: (g / (1 + jnp.abs(v)) ** 2,))


@jax.custom_jvp
def jvp_spike(v):
    """The same spike and surrogate derivative as a `custom_jvp`, which forward mode honours."""
    return (v > 0).astype(v.dtype)


jvp_spike.defjvp(lambda p, t: (jvp_spike(p[0]), t[0] / (1 + jnp.abs(p[0])) ** 2))


class SpikingCell(eqx.Module):
    """Leaky integrate-and-fire with reset and a learnable per-neuron leak."""

    w: jax.Array
    leak: jax.Array
    readout: enn.Linear
    spike: object = eqx.field(static=True)

    def __call__(self, x, v):
        v = eqtrace.element_wise(self.leak, jax.nn.sigmoid) * v + eqtrace.matmul(x, self.w)
        v = v - self.spike(v - 1.0)
        return self.readout(jnp.tanh(v)), v


def _spiking(spike):
    k1, k2 = jax.random.split(jax.random.key(3))
    return SpikingCell(
        2.0 * jax.random.normal(k1, (3, 4)), jnp.linspace(-1.0, 2.0, 4), enn.Linear(4, 2, key=k2), spike
    )


RULES = {
    "DRTRL": lambda: eqtrace.DRTRL(),
    "DRTRL(window=2)": lambda: eqtrace.DRTRL(window=2),
    "ESDRTRL": lambda: eqtrace.ESDRTRL(),
    "RTRL": lambda: eqtrace.RTRL(),
    "SnAp1": lambda: eqtrace.SnAp1(),
    "UORO": lambda: eqtrace.UORO(),
    "EProp": lambda: eqtrace.EProp(),
    "TruncatedBPTT": lambda: eqtrace.TruncatedBPTT(window=2),
    "OSTL": lambda: eqtrace.OSTL(),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_custom_vjp_is_linearised_in_reverse_mode(rule):
    """A `custom_vjp` spike gives every rule the gradients that the same surrogate as a `custom_jvp`
    gives in forward mode: its own derivative, not the primal's (a Heaviside's, zero)."""
    state = jnp.zeros(4)
    xs = jax.random.normal(jax.random.key(4), (5, 3))
    ts = jax.random.normal(jax.random.key(5), (5, 2))
    grads = {}
    for name, spike in (("vjp", vjp_spike), ("jvp", jvp_spike)):
        model = _spiking(spike)
        graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
        assert graph.module_info.forward_differentiable == (name == "jvp")
        grads[name], _ = eqtrace.online_grad(model, state, xs, ts, mse, graph=graph, algorithm=RULES[rule]())
    vjp, jvp = jax.tree.leaves(grads["vjp"]), jax.tree.leaves(grads["jvp"])
    assert_tree_allclose(vjp, jvp, rtol=1e-9, atol=1e-12)
    assert all(jnp.any(g != 0) for g in vjp)


def test_d_rtrl_is_exact_through_a_custom_vjp_spike():
    model, state = _spiking(vjp_spike), jnp.zeros(4)
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    xs = jax.random.normal(jax.random.key(6), (5, 3))
    ts = jax.random.normal(jax.random.key(7), (5, 2))
    online = d_rtrl_step_grads(graph, model, state, xs, ts, mse)
    reference = bptt_step_grads(model, state, xs, ts, mse)
    assert_tree_allclose(jax.tree.leaves(online), jax.tree.leaves(reference), rtol=1e-9, atol=1e-12)
