"""User-defined derivatives (`jax.custom_jvp`, `jax.custom_vjp`) in a step.

Around a non-linearity (a surrogate spike) they are position-wise operations like any other. Around
an ETP operation they would hide it from the online rules, which record its operands and hold its
output fixed: the compiler refuses them, naming the construct, the operation and the fix.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .brute_force import d_rtrl_reference_step
from .helpers import assert_tree_allclose


def mse(y, t):
    return jnp.sum((y - t) ** 2)


@jax.custom_jvp
def tanh_layer(x, w):
    """A layer with a hand-written derivative around its tagged matmul."""
    return jnp.tanh(eqtrace.matmul(x, w))


@tanh_layer.defjvp
def _tanh_layer_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    y = tanh_layer(x, w)
    return y, (1 - y**2) * (dx @ w + x @ dw)


@jax.custom_vjp
def gated_layer(x, w, u):
    """A surrogate wrapper around two ETP operations."""
    return jnp.tanh(eqtrace.matmul(x, w)) * eqtrace.element_wise(u, jax.nn.sigmoid)


def _gated_fwd(x, w, u):
    return gated_layer(x, w, u), (x, w, u)


def _gated_bwd(res, g):
    x, w, u = res
    _, vjp = jax.vjp(lambda x, w, u: jnp.tanh(x @ w) * jax.nn.sigmoid(u), x, w, u)
    return vjp(g)


gated_layer.defvjp(_gated_fwd, _gated_bwd)


@jax.custom_jvp
def nested_layer(x, w):
    """The ETP operation one `jax.jit` deeper inside the custom rule."""
    return jax.jit(eqtrace.matmul)(x, w)


nested_layer.defjvp(lambda p, t: (nested_layer(*p), t[0] @ p[1] + p[0] @ t[1]))


@jax.custom_vjp
def spike(v):
    """A surrogate spike with `custom_vjp`: Heaviside forward, a smooth derivative backward."""
    return (v > 0).astype(v.dtype)


spike.defvjp(lambda v: (spike(v), v), lambda v, g: (g / (1 + jnp.abs(v)) ** 2,))


class Leaky(eqx.Module):
    """`h ← 0.8 h + layer(x, w)` for a layer given as a function of the weights."""

    w: jax.Array
    u: jax.Array
    layer: str = eqx.field(static=True)

    def __call__(self, x, h):
        if self.layer == "gated":
            y = gated_layer(x, self.w, self.u)
        else:
            y = {"tanh": tanh_layer, "nested": nested_layer}[self.layer](x, self.w)
        h = 0.8 * h + y
        return h, h


def _leaky(layer):
    k1, k2 = jax.random.split(jax.random.key(0))
    return Leaky(jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (4,)), layer)


@pytest.mark.parametrize(
    "layer, construct, ops",
    [
        ("tanh", "custom_jvp_call", ["etp_matmul"]),
        ("gated", "custom_vjp_call", ["etp_element_wise", "etp_matmul"]),
        ("nested", "custom_jvp_call", ["etp_matmul"]),
    ],
)
def test_etp_op_inside_a_custom_derivative_is_refused(layer, construct, ops):
    model = _leaky(layer)
    with pytest.raises(ValueError) as info:
        eqtrace.compile_etrace_graph(model, jnp.zeros(3), jnp.zeros(4))
    message = str(info.value)
    assert f"({', '.join(ops)}) is used inside `{construct}`" in message
    assert "test_custom_derivatives.py" in message  # where the user's code calls it
    assert "Apply the custom derivative to the non-linearity only" in message
    # The drivers compile through the same path.
    xs, ts = jnp.ones((3, 3)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match=construct):
        eqtrace.online_grad(model, jnp.zeros(4), xs, ts, mse)


class SpikingLeaky(eqx.Module):
    """A leaky integrate-and-fire layer with reset, its spike a user `custom_vjp` or a library
    `custom_jvp` surrogate, applied to the membrane potential after the tagged matmul."""

    w: jax.Array
    readout: enn.Linear
    surrogate: object = eqx.field(static=True)

    def __call__(self, x, v):
        v = 0.9 * v + eqtrace.matmul(x, self.w)
        s = self.surrogate(v - 1.0)
        v = v - s
        return self.readout(jnp.tanh(v)), v


def _spiking(surrogate):
    k1, k2 = jax.random.split(jax.random.key(1))
    return SpikingLeaky(2.0 * jax.random.normal(k1, (3, 4)), enn.Linear(4, 2, key=k2), surrogate)


SURROGATES = {"custom_vjp": spike, "arctan": enn.ArctanSurrogate(), "sigmoid": enn.SigmoidSurrogate()}


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_surrogate_spike_outside_the_etp_op_compiles(name):
    graph = eqtrace.compile_etrace_graph(_spiking(SURROGATES[name]), jnp.zeros(3), jnp.zeros(4))
    [group] = graph.hidden_groups
    assert group.position_wise and group.recurrent  # the spike's primal body is element-wise
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("w",)]
    assert {w.weight_path: w.reason for w in graph.excluded_weights} == {
        ("readout", "weight"): "non_temporal",
        ("readout", "bias"): "non_temporal",
    }


@pytest.mark.parametrize("name", ["arctan", "sigmoid"])
def test_d_rtrl_is_exact_through_a_surrogate_spike(name):
    """One position-wise group fed element-wise: D-RTRL equals BPTT, surrogate derivative included."""
    model, state = _spiking(SURROGATES[name]), jnp.zeros(4)
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    xs = jax.random.normal(jax.random.key(2), (6, 3))
    ts = jax.random.normal(jax.random.key(3), (6, 2))
    grads, _ = eqtrace.online_grad(model, state, xs, ts, mse, graph=graph)
    ref, _ = eqtrace.bptt_grad(model, state, xs, ts, mse)
    assert_tree_allclose(grads, ref)
    assert jnp.any(grads.w != 0)
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces, memory, ref_state = eqtrace.d_rtrl_init(graph, model, state), {}, state
    for x, t in zip(xs, ts):
        traces, _, _, g = step(graph, model, traces, x, t, mse)
        memory, ref_g, ref_state = d_rtrl_reference_step(graph, model, ref_state, x, t, mse, memory)
        assert_tree_allclose(jax.tree.leaves(g), ref_g)
