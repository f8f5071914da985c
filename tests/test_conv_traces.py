"""Convolution kernels traced by D-RTRL: a trace per output position (`positions + kernel.shape +
(S,)`), exact where the recurrence is position-wise. Checked per step against BPTT, and against the
brute-force reference of the D-RTRL approximation where the recurrence mixes positions."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqtrace
import eqtrace.nn as enn

from .brute_force import (
    d_rtrl_reference_step,
    es_d_rtrl_reference_step,
    memory_as_traces,
    snap1_reference_step,
)
from .helpers import assert_tree_allclose, bptt_step_grads


def mse(y, t):
    return jnp.mean((y - t) ** 2)


class ConvLeaky(eqx.Module):
    """`h_t = tanh(conv(W, x_t) + u ⊙ h_{t-1})`: a position-wise recurrence driven by a convolution."""

    conv: eqx.Module
    u: jax.Array

    def __call__(self, x, h):
        h = jnp.tanh(self.conv(x) + self.u * h)
        return jnp.mean(h.reshape(h.shape[0], -1), axis=1), h


class ConvAdaptive(eqx.Module):
    """A 2-d convolution driving two states per position (`v` and its adaptation `a`)."""

    conv: enn.Conv2d

    def __call__(self, x, state):
        v, a = state
        v = 0.9 * v + self.conv(x) - 0.5 * a
        a = 0.8 * a + 0.2 * jnp.tanh(v)
        return jnp.mean(jnp.tanh(v), axis=(1, 2)), (v, a)


class ConvRecurrent(eqx.Module):
    """`h_t = h_{t-1} / 2 + tanh(conv(W, x_t) + conv(U, h_{t-1}))`: the recurrence mixes positions."""

    conv_in: enn.Conv1d
    conv_rec: enn.Conv1d

    def __call__(self, x, h):
        h = 0.5 * h + jnp.tanh(self.conv_in(x) + self.conv_rec(h))
        return jnp.mean(h, axis=1), h


def _leaky(conv, shape):
    u = jax.random.uniform(jax.random.key(7), shape, jnp.float64, 0.3, 0.9)
    return ConvLeaky(conv, u), jnp.zeros(shape)


def _models():
    k = jax.random.split(jax.random.key(0), 5)
    f64 = dict(dtype=jnp.float64)
    return {
        "conv1d": (*_leaky(enn.Conv1d(2, 3, 3, key=k[0], **f64), (3, 6)), (2, 6)),
        "conv2d": (
            ConvAdaptive(enn.Conv2d(2, 2, 3, key=k[1], **f64)),
            (jnp.zeros((2, 5, 5)), jnp.zeros((2, 5, 5))),
            (2, 5, 5),
        ),
        "eqx_conv1d": (
            *_leaky(eqx.nn.Conv1d(2, 3, 3, padding=1, use_bias=False, key=k[2], **f64), (3, 6)),
            (2, 6),
        ),
        "strided_dilated_padded": (
            *_leaky(enn.Conv1d(2, 3, 3, stride=2, padding=((2, 1),), dilation=2, key=k[3], **f64), (3, 4)),
            (2, 9),
        ),
    }


def _sequence(model, state, x_shape, n_steps=4, seed=1):
    kx, kt = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(kx, (n_steps,) + x_shape)
    n_out = jax.eval_shape(model, xs[0], state)[0].shape
    return xs, jax.random.normal(kt, (n_steps,) + n_out)


@pytest.mark.parametrize(
    "name, window",
    [(name, w) for name in ("conv1d", "conv2d", "eqx_conv1d") for w in (0, 1)]
    + [("strided_dilated_padded", 1), ("conv1d", 3)],
)
def test_position_wise_conv_recurrence_is_bptt_per_step(name, window):
    model, state, x_shape = _models()[name]
    xs, targets = _sequence(model, state, x_shape)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    conv = [r for r in graph.hidden_param_op_relations if r.weight_path[0] == "conv"]
    assert conv and all(r.shared_axes and not r.position_diagonal for r in conv)
    assert all(r.inferred == (name == "eqx_conv1d") for r in conv)
    assert all(eqtrace.DRTRL().traces_relation(r) for r in graph.hidden_param_op_relations)
    bptt = bptt_step_grads(model, state, xs, targets, mse)
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state, window=window)
    for t in range(len(xs)):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, jax.tree.map(lambda g: g[t], bptt))
    # The kernel's gradient has a history term (not only the same-step one) that the traces carry.
    assert all(bool(jnp.any(e != 0)) for e in traces.eps)


@pytest.mark.parametrize("rule", [eqtrace.EProp()])
def test_rules_sharing_the_traces_are_exact_too(rule):
    """e-prop (as OSTL, RFLO and SnAp-1) keeps D-RTRL's per-position kernel traces: on a
    position-wise recurrence whose loss reads only the new state, it equals BPTT per step."""
    model, state, x_shape = _models()["conv1d"]
    xs, targets = _sequence(model, state, x_shape, n_steps=3)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    assert all(rule.traces_relation(r) for r in graph.hidden_param_op_relations)
    bptt = bptt_step_grads(model, state, xs, targets, mse)
    step, traces = eqx.filter_jit(rule.step), rule.init(graph, model, state)
    for t in range(len(xs)):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, jax.tree.map(lambda g: g[t], bptt))


def test_trace_is_positions_by_kernel_by_states():
    model, state, x_shape = _models()["conv2d"]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(x_shape), state)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    shapes = {r.weight_path[-1]: e.shape for r, e in zip(graph.hidden_param_op_relations, traces.eps)}
    # 5×5 output positions, the (2, 2, 3, 3) kernel (its bias (2,)), 2 states per position.
    assert shapes == {"weight": (5, 5, 2, 2, 3, 3, 2), "bias": (5, 5, 2, 2)}
    kernel = model.conv.weight
    assert np.prod(shapes["weight"]) == 25 * kernel.size * 2
    text = str(graph)
    assert "traced per position" in text and "ES-D-RTRL only" not in text


@pytest.mark.parametrize("rule, window", [("d_rtrl", 0), ("snap1", 1)])
def test_conv_of_the_state_equals_the_brute_force_reference(rule, window):
    """Where a convolution reads `h_{t-1}`, D-RTRL is an approximation: its gradients and per-position
    traces equal those of the same approximation computed from full Jacobians (SnAp-1 likewise,
    its blocks from the full step Jacobian)."""
    k = jax.random.split(jax.random.key(3), 2)
    model = ConvRecurrent(
        enn.Conv1d(2, 3, 3, dtype=jnp.float64, key=k[0]), enn.Conv1d(3, 3, 3, dtype=jnp.float64, key=k[1])
    )
    state = jnp.zeros((3, 5))
    xs, targets = _sequence(model, state, (2, 5), n_steps=3)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    assert sum(r.per_position for r in graph.hidden_param_op_relations) == 4  # both kernels and biases
    rule_step, reference_step = {
        "d_rtrl": (eqtrace.DRTRL(window=window), d_rtrl_reference_step),
        "snap1": (eqtrace.SnAp1(window=window), snap1_reference_step),
    }[rule]
    step, reference = eqx.filter_jit(rule_step.step), eqx.filter_jit(reference_step)
    traces = rule_step.init(graph, model, state)
    # The reference memory, full (hidden × weight) matrices, filled in from the start (one trace).
    weights = jax.tree.leaves(model)
    memory = {
        r: jnp.zeros((state.size, weights[rel.weight_index].size))
        for r, rel in enumerate(graph.hidden_param_op_relations)
    }
    ref_state = state
    for x, target in zip(xs, targets):
        traces, _, _, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = reference(graph, model, ref_state, x, target, mse, memory, window)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        ref_traces, off_diagonal = memory_as_traces(graph, memory, model)
        assert off_diagonal == 0.0, "the reference has an entry outside the per-position layout"
        assert_tree_allclose(list(traces.eps), ref_traces)
    bptt = jax.tree.map(lambda g: g[-1], bptt_step_grads(model, state, xs, targets, mse))
    assert not np.allclose(grads.conv_in.weight, bptt.conv_in.weight)  # not exact here


def test_untagged_conv_feeding_a_state_is_a_relation_for_es_d_rtrl_too():
    """The inferred `eqx.nn.Conv1d` (its batch axis squeezed within the operation) reaches the state
    position by position: ES-D-RTRL traces it too, equal to its brute-force reference."""
    model, state, x_shape = _models()["eqx_conv1d"]
    xs, targets = _sequence(model, state, x_shape, n_steps=3)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("conv", "weight")]
    assert rel.inferred and rel.y_shape == (3, 6) and rel.shared_axes == (1,) and rel.input_axes == (1, 2)
    traces = eqtrace.es_d_rtrl_init(graph, model, state, 0.7)
    step, reference = eqx.filter_jit(eqtrace.es_d_rtrl_step), eqx.filter_jit(es_d_rtrl_reference_step)
    memory, ref_state = {"x": {}, "f": {}}, state
    for x, target in zip(xs, targets):
        traces, _, _, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = reference(graph, model, ref_state, x, target, mse, memory, 0.7)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
    assert bool(jnp.any(grads.conv.weight != 0))
