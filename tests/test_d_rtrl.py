"""D-RTRL against its oracles: BPTT (where it is exact) and a brute-force Jacobian reference of the
same approximation (on every model), compared step by step."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .brute_force import d_rtrl_reference_step, memory_as_traces, window_reference
from .helpers import assert_tree_allclose
from .models import AdaptiveNeurons, ConvRNN, SingleLayerRNN, StackedCells, TwoLayerGRU


def mse(y, t):
    return jnp.sum((y - t) ** 2)


# ------------------------------------------------------------------------------------------
# Models on which D-RTRL is exact: one hidden group, position-diagonal recurrence, element-wise
# y → h tail.


class LeakyIntegrator(eqx.Module):
    """`h ← a ⊙ h + x W`, with a fixed decay `a`."""

    w: jax.Array
    readout: enn.Linear | None
    a: float = eqx.field(static=True, default=0.8)

    def __call__(self, x, h):
        h = self.a * h + eqtrace.matmul(x, self.w)
        return (h if self.readout is None else self.readout(jnp.tanh(h))), h


class ElementwiseRNN(eqx.Module):
    """`h ← tanh(x W + b + u ⊙ h)` with learnable recurrence `u` (an IndRNN with tanh)."""

    cell: enn.IndRNNCell
    readout: enn.Linear | None

    def __call__(self, x, state):
        state = self.cell(x, state)
        return (state.h if self.readout is None else self.readout(state.h)), state


class TwoStateNeuron(eqx.Module):
    """A smooth two-state group: the adaptation `a` reads the *new* `v` within the step."""

    w: jax.Array
    tau: jax.Array
    readout: enn.Linear | None

    def __call__(self, x, state):
        v, a = state
        decay = eqtrace.element_wise(self.tau, lambda t: jnp.exp(-1.0 / t))
        v = decay * v + eqtrace.matmul(x, self.w) - a
        a = 0.7 * a + 0.3 * jnp.tanh(v)
        r = jax.nn.sigmoid(v)
        return (r if self.readout is None else self.readout(r)), (v, a)


def _exact_models(readout: bool):
    k = jax.random.split(jax.random.key(0), 6)
    n_in, n, n_out = 3, 4, 2
    lin = (lambda key: enn.Linear(n, n_out, key=key)) if readout else (lambda key: None)
    zeros = jnp.zeros(n)
    return [
        ("leaky", LeakyIntegrator(jax.random.normal(k[0], (n_in, n)), lin(k[1])), zeros),
        (
            "elementwise_rnn",
            ElementwiseRNN(enn.IndRNNCell(n_in, n, activation=jnp.tanh, key=k[2]), lin(k[3])),
            enn.IndRNNState(h=zeros),
        ),
        (
            "two_state",
            TwoStateNeuron(jax.random.normal(k[4], (n_in, n)), jnp.linspace(2.0, 5.0, n), lin(k[5])),
            (zeros, zeros),
        ),
    ]


def _sequence(model_out, n_in, T, key):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (T, n_in)), jax.random.normal(k2, (T, model_out))


def _per_step_bptt(model, state, xs, targets, t):
    """`∂L_t/∂θ` by back-propagation through the first `t + 1` steps."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_t(params):
        m = eqx.combine(params, static)
        s = state
        for i in range(t + 1):
            y, s = m(xs[i], s)
        return mse(y, targets[t])

    return jax.grad(loss_t)(params)


@pytest.mark.parametrize("readout", [True, False], ids=["readout", "no_readout"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["leaky", "elementwise_rnn", "two_state"])
def test_d_rtrl_equals_bptt_per_step(index, readout):
    name, model, state = _exact_models(readout)[index]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    assert len(graph.hidden_groups) == 1, name
    y0, _ = model(jnp.zeros(3), state)
    T = 5
    xs, targets = _sequence(y0.shape[0], 3, T, jax.random.key(1))
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    for t in range(T):
        traces, y, loss, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
    # Every leaf, the readout included, got a gradient from its trace or its same-step term.
    assert all(jnp.any(g != 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("index", [0, 1, 2], ids=["leaky", "elementwise_rnn", "two_state"])
def test_online_grad_equals_bptt_grad(index):
    _, model, state = _exact_models(True)[index]
    xs, targets = _sequence(2, 3, 7, jax.random.key(2))
    g_online, l_online = eqtrace.online_grad(model, state, xs, targets, mse)
    g_bptt, l_bptt = eqtrace.bptt_grad(model, state, xs, targets, mse)
    assert l_online.shape == (7,)
    assert_tree_allclose(l_online, l_bptt)
    assert_tree_allclose(g_online, g_bptt)


# ------------------------------------------------------------------------------------------
# Every model: D-RTRL equals the brute-force reference of the same approximation, per step.


class Mixing(eqx.Module):
    """A hidden state whose transition mixes positions outside any ETP op (`jnp.roll`)."""

    w: jax.Array
    readout: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(eqtrace.matmul(x, self.w) + 0.5 * jnp.roll(h, 1) + 0.3 * h)
        return self.readout(h), h

    def init_state(self):
        return jnp.zeros(self.w.shape[1])


class ConvLeaky(eqx.Module):
    """A convolution feeding a leaky state element-wise: a relation shared across positions."""

    conv: enn.Conv1d
    readout: enn.Linear

    def __call__(self, x, v):
        v = 0.8 * v + self.conv(x)
        return self.readout(jnp.tanh(v).reshape(-1)), v

    def init_state(self):
        return jnp.zeros((3, 5))


class SpikingNet(eqx.Module):
    """A spiking layer read out by a leaky readout with its own state."""

    layer: enn.AbstractSpikingLayer
    readout: enn.LeakyRateReadout

    def __call__(self, x, state):
        s = self.layer(3.0 * x, state[0])
        r = self.readout(self.layer.spike(s), state[1])
        return r.r, (s, r)

    def init_state(self):
        return self.layer.init_state(), self.readout.init_state()


def _all_models():
    k = jax.random.split(jax.random.key(3), 12)
    cells = [enn.VanillaRNNCell, enn.GRUCell, enn.LSTMCell, enn.MGUCell, enn.MinimalRNNCell, enn.IndRNNCell]
    models = {
        "single_layer_rnn": SingleLayerRNN(3, 5, 2, key=k[0]),
        "two_layer_gru": TwoLayerGRU(3, 4, 2, key=k[1]),
        "conv_rnn": ConvRNN(channels=2, size=5, n_rec=4, key=k[2]),
        "adaptive_neurons": AdaptiveNeurons(
            jax.random.normal(k[3], (3, 4)), jnp.linspace(2.0, 4.0, 4), jax.random.normal(k[4], (4, 2))
        ),
        "mixing": Mixing(jax.random.normal(k[5], (3, 4)), enn.Linear(4, 2, key=k[6])),
        "conv_leaky": ConvLeaky(enn.Conv1d(2, 3, kernel_size=3, key=k[5]), enn.Linear(15, 2, key=k[6])),
    }
    for i, cell in enumerate(cells):
        models[cell.__name__] = StackedCells((cell(3, 4, key=k[7 + i // 3]),), enn.Linear(4, 2, key=k[11]))
    models["recurrent_alif"] = SpikingNet(
        enn.RecurrentSpikingLayer(3, 5, neuron="alif", key=k[9]), enn.LeakyRateReadout(5, 2, key=k[10])
    )
    models["recurrent_lif_learnable_tau"] = SpikingNet(
        enn.RecurrentSpikingLayer(3, 5, neuron=enn.LIF(5, learn_tau=True), key=k[8]),
        enn.LeakyRateReadout(5, 2, key=k[11]),
    )
    models["stacked_lstm_gru"] = StackedCells(
        (enn.LSTMCell(3, 4, key=k[8]), enn.GRUCell(4, 3, key=k[9])), enn.Linear(3, 2, key=k[10])
    )
    return models


MODELS = _all_models()


def _input_for(model):
    if isinstance(model, ConvRNN):
        return lambda key: jax.random.normal(key, (1, 5, 5))
    if isinstance(model, ConvLeaky):
        return lambda key: jax.random.normal(key, (2, 5))
    return lambda key: jax.random.normal(key, (3,))


def _random_steps(model, n_steps, seed=4):
    make_x = _input_for(model)
    keys = jax.random.split(jax.random.key(seed), n_steps)
    n_out = jax.eval_shape(model, make_x(keys[0]), model.init_state())[0].shape
    xs = jnp.stack([make_x(k) for k in keys])
    targets = jnp.stack([jax.random.normal(jax.random.fold_in(k, 1), n_out) for k in keys])
    return xs, targets


@pytest.mark.parametrize("window", [0, 1])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_d_rtrl_equals_brute_force_reference_per_step(name, window):
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 4)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state, window=window)
    memory, ref_state = {}, state
    for x, target in zip(xs, targets):
        traces, y, loss, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = d_rtrl_reference_step(
            graph, model, ref_state, x, target, mse, memory, window
        )
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        ref_traces, off_diagonal = memory_as_traces(graph, memory, model)
        assert off_diagonal == 0.0, "a traced relation has an entry off its position diagonal"
        assert_tree_allclose(list(traces.eps), ref_traces)
        assert_tree_allclose(traces.state, ref_state)
    assert graph.hidden_param_op_relations, name
    # Every group a position-diagonal (or per-position shared) relation reaches keeps a trace,
    # recurrent or not (D = 0).
    assert len(traces.eps) == sum(
        r.per_position for r in graph.hidden_param_op_relations for g in r.hidden_groups
    )


WINDOW_MODELS = ["two_layer_gru", "conv_leaky", "single_layer_rnn"]


@pytest.mark.parametrize("name", WINDOW_MODELS)
def test_d_rtrl_window_equals_brute_force_reference_per_step(name):
    """`window=3`: exact back-propagation through the last three steps, traces two steps behind."""
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 5)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state, window=3)
    reference = window_reference(graph, model, state, xs, targets, mse, 3, d_rtrl_reference_step, {})
    for x, target, (ref_grads, memory) in zip(xs, targets, reference):
        traces, y, loss, grads = step(graph, model, traces, x, target, mse)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        assert_tree_allclose(
            list(traces.eps),
            memory_as_traces(graph, memory, model)[0] if memory else [jnp.zeros_like(e) for e in traces.eps],
        )


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_window_as_long_as_the_sequence_is_bptt_per_step(name, algorithm):
    """With `window >= t`, nothing lies beyond the window: every step's gradient is BPTT's."""
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 3, seed=8)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    init, step = {
        "d_rtrl": (eqtrace.d_rtrl_init, eqtrace.d_rtrl_step),
        "es_d_rtrl": (eqtrace.es_d_rtrl_init, eqtrace.es_d_rtrl_step),
    }[algorithm]
    traces = init(graph, model, state, window=3)
    for t in range(3):
        traces, y, loss, grads = eqx.filter_jit(step)(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_leaf_gets_a_non_zero_gradient(name):
    model = MODELS[name]
    make_x = _input_for(model)
    xs = jax.vmap(make_x)(jax.random.split(jax.random.key(5), 4))
    n_out = jax.eval_shape(model, xs[0], model.init_state())[0].shape
    targets = jax.random.normal(jax.random.key(6), (4, *n_out))
    grads, _ = eqtrace.online_grad(model, model.init_state(), xs, targets, mse)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    for path, g in leaves:
        assert jnp.any(g != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def test_bptt_matches_central_finite_differences():
    _, model, state = _exact_models(True)[2]
    xs, targets = _sequence(2, 3, 4, jax.random.key(7))
    grads, _ = eqtrace.bptt_grad(model, state, xs, targets, mse)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    eps = 1e-6
    fd = []
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        up = _total_loss(unravel(flat + e), static, state, xs, targets)
        down = _total_loss(unravel(flat - e), static, state, xs, targets)
        fd.append((up - down) / (2 * eps))
    assert_tree_allclose(jax.flatten_util.ravel_pytree(grads)[0], jnp.stack(fd), rtol=1e-5, atol=1e-7)


def _total_loss(params, static, state, xs, targets):
    m = eqx.combine(params, static)
    total = 0.0
    for x, t in zip(xs, targets):
        y, state = m(x, state)
        total = total + mse(y, t)
    return total
