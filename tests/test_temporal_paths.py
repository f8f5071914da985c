"""Temporal paths outside `h_{t-1} → h_t` within one group: an output that reads the previous state,
states that copy other states, a weight used by a tagged and an untagged operation, and sequences
continued from saved traces. Each is exact against BPTT per step where the model is
position-diagonal, or flagged in the graph."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose, tree_allclose
from .test_d_rtrl import _per_step_bptt, mse


K1, K2, K3 = jax.random.split(jax.random.key(0), 3)
N_IN, N, N_OUT, T = 3, 5, 2, 6


class ReadsPrevious(eqx.Module):
    """`y_t = R h_{t-1}`: the output reads the state before the step."""

    rnn: enn.IndRNNCell
    out: enn.Linear

    def __call__(self, x, s):
        return self.out(s.h), self.rnn(x, s)


class ReadsBoth(eqx.Module):
    """`y_t = R(h_t + 0.5 h_{t-1})`."""

    rnn: enn.IndRNNCell
    out: enn.Linear

    def __call__(self, x, s):
        new = self.rnn(x, s)
        return self.out(new.h + 0.5 * s.h), new


class PreviousSpikes(eqx.Module):
    """A feed-forward LIF layer read out through its previous spikes (`readout(spike(V_{t-1}))`)."""

    layer: enn.FeedForwardSpikingLayer
    out: enn.Linear

    def __call__(self, x, s):
        return self.out(self.layer.spike(s)), self.layer(3.0 * x, s)


class DelayLine(eqx.Module):
    """`(h, h_prev) -> (h_new, h)`, read out through both."""

    rnn: enn.IndRNNCell
    out: enn.Linear

    def __call__(self, x, s):
        h, h_prev = s
        new = self.rnn(x, enn.IndRNNState(h=h)).h
        return self.out(jnp.tanh(h + h_prev)), (new, h)


class Swap(eqx.Module):
    """`(a, b) -> (b, 0.9 a + x W)`: two states that trade places every step."""

    w: jax.Array
    out: enn.Linear

    def __call__(self, x, s):
        a, b = s
        a = 0.9 * a + eqtrace.matmul(x, self.w)
        return self.out(jnp.tanh(a + 0.5 * b)), (b, a)


def _models():
    rnn = enn.IndRNNCell(N_IN, N, activation=jnp.tanh, key=K1)
    out = enn.Linear(N, N_OUT, key=K2)
    lif = enn.FeedForwardSpikingLayer(N_IN, N, neuron=enn.LIF(N, learn_tau=True), key=K1)
    zeros = jnp.zeros(N)
    return {
        "reads_previous": (ReadsPrevious(rnn, out), enn.IndRNNState(h=zeros + 0.1)),
        "reads_both": (ReadsBoth(rnn, out), enn.IndRNNState(h=zeros + 0.1)),
        "previous_spikes": (PreviousSpikes(lif, out), lif.init_state()),
        "delay_line": (DelayLine(rnn, out), (zeros, zeros)),
        "swap": (Swap(jax.random.normal(K3, (N_IN, N)), out), (zeros, zeros)),
    }


MODELS = _models()


def _data(key=K3, constant=False):
    kx, kt = jax.random.split(key)
    xs = jax.random.normal(kx, (T, N_IN))
    if constant:
        xs = jnp.broadcast_to(xs[0], xs.shape)
    return xs, jax.random.normal(kt, (T, N_OUT))


@pytest.mark.parametrize("window", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_d_rtrl_is_bptt_per_step(name, window):
    model, state = MODELS[name]
    xs, targets = _data()
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    assert graph.untraced_hidden_paths == ()  # copied states are traced with their group
    assert len(graph.hidden_groups) == 1
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state, window=window)
    total = None
    for t in range(T):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    assert all(jnp.any(g != 0) for g in jax.tree.leaves(total))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_es_d_rtrl_is_bptt_for_a_constant_input(name):
    """With a constant input the normalised input trace is exact, so ES-D-RTRL is D-RTRL."""
    model, state = MODELS[name]
    xs, targets = _data(constant=True)
    g, _ = eqtrace.online_grad(model, state, xs, targets, mse, algorithm="es_d_rtrl", decay=0.8)
    assert_tree_allclose(g, eqtrace.bptt_grad(model, state, xs, targets, mse)[0])


def test_the_issue_reproducer_gets_its_recurrent_gradient():
    model, state = MODELS["reads_previous"]
    xs, ys = jax.random.normal(K1, (15, N_IN)), jax.random.normal(K2, (15, N_OUT))
    g_bptt, _ = eqtrace.bptt_grad(model, state, xs, ys, mse)
    for algorithm in ("d_rtrl", "es_d_rtrl"):
        g, _ = eqtrace.online_grad(model, state, xs, ys, mse, algorithm=algorithm)
        assert jnp.all(g.rnn.u != 0)
        assert float(jnp.dot(g.rnn.u, g_bptt.rnn.u)) > 0.9 * float(
            jnp.linalg.norm(g.rnn.u) * jnp.linalg.norm(g_bptt.rnn.u)
        )


class UsedTwice(eqx.Module):
    w: jax.Array
    out: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(0.8 * h + eqtrace.matmul(x, self.w) + x @ self.w)
        return self.out(h), h


class GateUsedTwice(eqx.Module):
    a: jax.Array
    w: jax.Array
    out: enn.Linear

    def __call__(self, x, h):
        decay = eqtrace.element_wise(self.a, jax.nn.sigmoid)
        h = decay * h * jax.nn.sigmoid(self.a) + eqtrace.matmul(x, self.w)
        return self.out(h), h


@pytest.mark.parametrize(
    "model, path, primitive",
    [
        (UsedTwice(jax.random.normal(K3, (N_IN, N)), enn.Linear(N, N_OUT, key=K2)), ("w",), "dot_general"),
        (
            GateUsedTwice(
                jnp.linspace(0.5, 2.0, N), jax.random.normal(K3, (N_IN, N)), enn.Linear(N, N_OUT, key=K2)
            ),
            ("a",),
            "logistic",
        ),
    ],
    ids=["matmul_and_at", "element_wise_and_sigmoid"],
)
def test_a_weight_used_by_a_tagged_and_an_untagged_operation_is_flagged(model, path, primitive):
    state = jnp.zeros(N)
    xs, targets = _data()
    # Inference off: it would trace the untagged `x @ w` as a second relation of `w`.
    graph = eqtrace.compile_etrace_graph(model, xs[0], state, infer_etp_ops=False)
    assert [w.weight_path for w in graph.partly_traced_weights] == [path]
    (flag,) = graph.partly_traced_weights
    assert flag.reason == "untraced_use" and primitive in flag.detail
    assert "partly traced" in str(graph) and primitive in str(graph)
    # The flag is not decorative: the traces miss that use, the exact window does not.
    g_bptt, _ = eqtrace.bptt_grad(model, state, xs, targets, mse)
    g_online, _ = eqtrace.online_grad(model, state, xs, targets, mse, graph=graph)
    assert not tree_allclose(g_online, g_bptt)
    assert_tree_allclose(
        eqtrace.online_grad(model, state, xs, targets, mse, window=T, graph=graph)[0], g_bptt
    )


def test_position_diagonal_models_flag_nothing():
    for model, state in MODELS.values():
        graph = eqtrace.compile_etrace_graph(model, jnp.zeros(N_IN), state)
        assert graph.partly_traced_weights == ()


@pytest.mark.parametrize("algorithm, window", [("d_rtrl", 3), ("es_d_rtrl", 1)])
def test_a_sequence_continued_from_saved_traces_equals_one_pass(algorithm, window):
    model, state = MODELS["delay_line"]
    xs, targets = _data()
    options = {"algorithm": algorithm, "window": window}
    g_all, l_all = eqtrace.online_grad(model, state, xs, targets, mse, **options)
    g1, l1, traces = eqtrace.online_grad(
        model, state, xs[:2], targets[:2], mse, return_traces=True, **options
    )
    g2, l2, traces = eqtrace.online_grad(
        model, None, xs[2:], targets[2:], mse, algorithm=algorithm, traces=traces, return_traces=True
    )
    assert_tree_allclose(jax.tree.map(jnp.add, g1, g2), g_all)
    assert_tree_allclose(jnp.concatenate([l1, l2]), l_all)
    # Batched, too: the traces carry a batch axis.
    states = jax.tree.map(lambda a: jnp.stack([a, a + 0.1]), state)
    xb, tb = jnp.stack([xs, -xs]), jnp.stack([targets, targets])
    gb, _ = eqtrace.batch_grad(eqtrace.online_grad, model, states, xb, tb, mse, **options)
    gb1, _, tr = eqtrace.batch_grad(
        eqtrace.online_grad, model, states, xb[:, :4], tb[:, :4], mse, return_traces=True, **options
    )
    gb2, _ = eqtrace.batch_grad(
        eqtrace.online_grad, model, None, xb[:, 4:], tb[:, 4:], mse, algorithm=algorithm, traces=tr
    )
    assert_tree_allclose(jax.tree.map(jnp.add, gb1, gb2), gb)


def test_traces_and_state_together_are_refused():
    model, state = MODELS["reads_previous"]
    xs, targets = _data()
    _, _, traces = eqtrace.online_grad(model, state, xs, targets, mse, return_traces=True)
    with pytest.raises(ValueError, match="`state` must be `None`"):
        eqtrace.online_grad(model, state, xs, targets, mse, traces=traces)
