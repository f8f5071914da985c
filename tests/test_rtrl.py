"""RTRL and truncated BPTT against their oracles: BPTT per step (RTRL, on every model) and an
independent truncated back-propagation from the true state `h_{t-K}` (truncated BPTT)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose
from .test_d_rtrl import _per_step_bptt, _random_steps, MODELS, mse


class ReadsPrevious(eqx.Module):
    """`y_t = R tanh(h_{t-1}) + R' h_t`, with an untagged recurrent weight `u` mixing positions and an
    integer step counter in the state."""

    w: jax.Array
    u: jax.Array
    out: enn.Linear
    out_new: enn.Linear

    def __call__(self, x, state):
        h, n = state
        new = jnp.tanh(eqtrace.matmul(x, self.w) + h @ self.u)
        return self.out(jnp.tanh(h)) + self.out_new(new), (new, n + 1)

    def init_state(self):
        return jnp.full(self.w.shape[1], 0.1), jnp.zeros((), jnp.int32)


def _reads_previous():
    k = jax.random.split(jax.random.key(11), 4)
    return ReadsPrevious(
        jax.random.normal(k[0], (3, 4)),
        0.5 * jax.random.normal(k[1], (4, 4)),
        enn.Linear(4, 2, key=k[2]),
        enn.Linear(4, 2, key=k[3]),
    )


ALL = {**MODELS, "reads_previous": _reads_previous()}


def _run(model, state, xs, n):
    """The true state after the first `n` steps."""
    for x in xs[:n]:
        _, state = model(x, state)
    return state


# ------------------------------------------------------------------------------------------
# RTRL: exact, on every model.


@pytest.mark.parametrize("name", sorted(ALL))
def test_rtrl_equals_bptt_per_step(name):
    model = ALL[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 4)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    rule = eqtrace.RTRL()
    step = eqx.filter_jit(rule.step)
    traces = rule.init(graph, model, state)
    for t in range(4):
        traces, y, loss, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
        assert_tree_allclose(traces.state, _run(model, state, xs, t + 1))
        assert_tree_allclose(loss, mse(model(xs[t], _run(model, state, xs, t))[0], targets[t]))


@pytest.mark.parametrize("name", ["two_layer_gru", "recurrent_alif", "reads_previous"])
def test_rtrl_online_grad_equals_bptt_grad(name):
    model = ALL[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 6, seed=5)
    rule = eqtrace.RTRL()
    grads, losses = eqx.filter_jit(eqtrace.online_grad)(model, state, xs, targets, mse, rule)
    ref, ref_losses = eqtrace.bptt_grad(model, state, xs, targets, mse)
    assert_tree_allclose(grads, ref)
    assert_tree_allclose(losses, ref_losses)
    # A sequence continued from the traces of its first half is one sequence.
    g1, _, traces = eqtrace.online_grad(model, state, xs[:3], targets[:3], mse, rule, return_traces=True)
    g2, _ = eqtrace.online_grad(model, None, xs[3:], targets[3:], mse, rule, traces=traces)
    assert_tree_allclose(jax.tree.map(jnp.add, g1, g2), ref)
    check = eqtrace.check_gradient(model, state, xs, targets, mse, rule, verbose=False)
    assert check.max_relative_error < 1e-6


def test_rtrl_batch_grad_is_bptt_of_the_batch():
    model = ALL["stacked_lstm_gru"]
    xs, targets = jax.vmap(lambda s: _random_steps(model, 5, seed=s))(jnp.arange(3))
    states = jax.vmap(lambda _: model.init_state())(jnp.arange(3))
    grads, losses = eqtrace.batch_grad(
        eqtrace.online_grad, model, states, xs, targets, mse, algorithm=eqtrace.RTRL()
    )
    ref, ref_losses = eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, targets, mse)
    assert_tree_allclose(grads, ref)
    assert_tree_allclose(losses, ref_losses)


def test_rtrl_refuses_a_large_influence_matrix():
    model = ALL["single_layer_rnn"]  # 5 states; (3 + 5) * 5 + 5 + 5 * 2 + 2 = 57 weights
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    with pytest.raises(ValueError, match=r"5 state entries x 57 weight entries = 285 .*`eqtrace.DRTRL\(\)`"):
        eqtrace.RTRL(max_size=284).init(graph, model, state)
    assert eqtrace.RTRL(max_size=285).init(graph, model, state).influence.shape == (5, 57)
    assert eqtrace.RTRL(max_size=None).init(graph, model, state).influence.shape == (5, 57)
    xs, targets = _random_steps(model, 2)
    with pytest.raises(ValueError, match="above `max_size=100`"):
        eqtrace.online_grad(model, state, xs, targets, mse, eqtrace.RTRL(max_size=100))
    with pytest.raises(ValueError, match="`max_size` must be an integer >= 0 or `None`"):
        eqtrace.RTRL(max_size=-1)


def test_rtrl_refuses_traces_of_another_graph():
    model = ALL["single_layer_rnn"]
    other = ALL["MGUCell"]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    other_graph = eqtrace.compile_etrace_graph(other, jnp.zeros(3), other.init_state())
    wrong = eqtrace.RTRL().init(other_graph, other, other.init_state())
    with pytest.raises((TypeError, ValueError), match="`traces`"):
        eqtrace.RTRL().step(graph, model, wrong, jnp.zeros(3), jnp.zeros(2), mse)


# ------------------------------------------------------------------------------------------
# Truncated BPTT.


def _truncated_bptt(model, state, xs, targets, t, window):
    """`∂L_t/∂θ` back-propagated through steps `t-K+1 … t` only, from the true state `h_{t-K}`."""
    start = max(0, t - window + 1)
    anchor = _run(model, state, xs, start)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_t(params):
        m, s = eqx.combine(params, static), anchor
        for i in range(start, t + 1):
            y, s = m(xs[i], s)
        return mse(y, targets[t])

    return jax.grad(loss_t)(params)


TRUNCATED = ["two_layer_gru", "conv_leaky", "recurrent_alif", "reads_previous"]


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("name", TRUNCATED)
def test_truncated_bptt_per_step(name, window):
    model = ALL[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 6)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    rule = eqtrace.TruncatedBPTT(window=window)
    step = eqx.filter_jit(rule.step)
    traces = rule.init(graph, model, state)
    for t in range(6):
        traces, y, loss, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _truncated_bptt(model, state, xs, targets, t, window))
        assert_tree_allclose(traces.state, _run(model, state, xs, t + 1))
    if window == 1:  # the oracle itself truncates: it differs from BPTT on a recurrent model
        with pytest.raises(AssertionError):
            assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, 5))


@pytest.mark.parametrize("name", ["single_layer_rnn", "recurrent_lif_learnable_tau", "reads_previous"])
def test_truncated_bptt_window_as_long_as_the_sequence_is_bptt(name):
    model = ALL[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 5, seed=6)
    rule = eqtrace.TruncatedBPTT(window=5)
    grads, losses = eqx.filter_jit(eqtrace.online_grad)(model, state, xs, targets, mse, rule)
    ref, ref_losses = eqtrace.bptt_grad(model, state, xs, targets, mse)
    assert_tree_allclose(grads, ref)
    assert_tree_allclose(losses, ref_losses)
    check = eqtrace.check_gradient(model, state, xs, targets, mse, rule, verbose=False)
    assert check.max_relative_error < 1e-6


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("name", ["two_layer_gru", "conv_leaky", "adaptive_neurons"])
def test_truncated_bptt_batch_grad_is_the_mean_of_single_sequences(name, window):
    model = ALL[name]
    xs, targets = jax.vmap(lambda s: _random_steps(model, 5, seed=s))(jnp.arange(3))
    states = jax.vmap(lambda _: model.init_state())(jnp.arange(3))
    rule = eqtrace.TruncatedBPTT(window=window)
    grads, losses = eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, targets, mse, algorithm=rule)
    singles = [eqtrace.online_grad(model, model.init_state(), xs[b], targets[b], mse, rule) for b in range(3)]
    assert_tree_allclose(grads, jax.tree.map(lambda *g: sum(g) / 3, *[g for g, _ in singles]))
    assert_tree_allclose(losses, sum(l for _, l in singles) / 3)


def test_truncated_bptt_options():
    assert eqtrace.TruncatedBPTT.batch_native and not eqtrace.RTRL.batch_native
    for window in (0, -1, True):
        with pytest.raises(ValueError, match="`window` must be an integer >= 1"):
            eqtrace.TruncatedBPTT(window=window)
    model = ALL["single_layer_rnn"]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    relation = graph.hidden_param_op_relations[0]
    assert not eqtrace.TruncatedBPTT().traces_relation(relation)
    assert eqtrace.RTRL().traces_relation(relation)
