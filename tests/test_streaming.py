"""`eqtrace.Stream` against its oracles: per-step BPTT on a model where D-RTRL is exact, and a loop
written by hand with the rule's pure step and Optax."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose
from .models import SingleLayerRNN


def mse(y, t):
    return jnp.mean((y - t) ** 2)


class IndRNN(eqx.Module):
    """An IndRNN (`h ← tanh(x W + b + u ⊙ h)`) with a readout: D-RTRL is exact on it."""

    cell: enn.IndRNNCell
    out: enn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.cell = enn.IndRNNCell(3, 4, activation=jnp.tanh, key=k1)
        self.out = enn.Linear(4, 2, key=k2)

    def __call__(self, x, state):
        state = self.cell(x, state)
        return self.out(state.h), state

    def init_state(self):
        return self.cell.init_state()


def _data(T, key):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (T, 3)), jax.random.normal(k2, (T, 2))


def _bptt_loss_grad(model, state, xs, targets, t):
    """`∂L_t/∂θ` by back-propagation through steps `0 … t`."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_t(params):
        m, s = eqx.combine(params, static), state
        for i in range(t + 1):
            y, s = m(xs[i], s)
        return mse(y, targets[t])

    return jax.grad(loss_t)(params)


def test_stream_sums_bptt_gradients_then_updates():
    """Per step, the running sum is `Σ_{s ≤ t} ∂L_s/∂θ` (BPTT); on the `every`-th step the weights
    move by `-lr` times that sum and the sum restarts from zero."""
    model, lr, k = IndRNN(jax.random.key(0)), 0.1, 3
    state = model.init_state()
    xs, targets = _data(k + 1, jax.random.key(1))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    stream = eqtrace.Stream(graph, mse, optax.sgd(lr), every=k)
    step = eqx.filter_jit(stream.step)
    carry = stream.init(model, state)
    params, total = model, None
    for t in range(k):
        g = _bptt_loss_grad(model, state, xs, targets, t)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        before = carry.grads
        params, carry, _, _ = step(params, carry, xs[t], targets[t])
        if t < k - 1:
            assert int(carry.count) == t + 1
            assert params is model or eqx.tree_equal(params, model)
            assert_tree_allclose(carry.grads, total)
            assert_tree_allclose(jax.tree.map(jnp.subtract, carry.grads, before), g)
    assert int(carry.count) == 0
    assert all(jnp.all(g == 0) for g in jax.tree.leaves(carry.grads))
    expected = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, total))
    assert_tree_allclose(eqx.filter(params, eqx.is_inexact_array), eqx.filter(expected, eqx.is_inexact_array))
    assert not eqx.tree_equal(params, model)
    # The traces run on across the update: the next step is the rule's step on the new weights.
    traces, y, loss, _ = eqtrace.d_rtrl_step(graph, params, carry.traces, xs[k], targets[k], mse)
    _, carry2, y2, loss2 = step(params, carry, xs[k], targets[k])
    assert_tree_allclose((y2, loss2, carry2.traces), (y, loss, traces))


@pytest.mark.parametrize(
    "algorithm", [eqtrace.DRTRL(), eqtrace.ESDRTRL(decay=0.8)], ids=["d_rtrl", "es_d_rtrl"]
)
def test_stream_matches_a_hand_written_loop(algorithm):
    """Adam every `k` steps on a stream equals, block by block, `online_grad` continued from the
    previous block's traces followed by the Optax update written by hand."""
    model = SingleLayerRNN(3, 5, 2, key=jax.random.key(2))
    k, blocks = 3, 3
    xs, targets = _data(k * blocks, jax.random.key(3))
    graph = eqtrace.compile_etrace_graph(model, xs[0], model.init_state())
    optim = optax.adam(1e-2)
    stream = eqtrace.Stream(graph, mse, optim, algorithm, every=k)
    step = eqx.filter_jit(stream.step, donate="all-except-first")
    params, carry, losses = model, stream.init(model, model.init_state()), []
    for t in range(k * blocks):
        params, carry, _, loss = step(params, carry, xs[t], targets[t])
        losses.append(loss)

    ref = model
    opt_state = optim.init(eqx.filter(ref, eqx.is_inexact_array))
    traces = algorithm.init(graph, ref, ref.init_state())
    ref_losses = []
    for b in range(blocks):
        block = slice(b * k, (b + 1) * k)
        grads, ls, traces = eqtrace.online_grad(
            ref,
            None,
            xs[block],
            targets[block],
            mse,
            algorithm,
            graph=graph,
            traces=traces,
            return_traces=True,
        )
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optim.update(grads, opt_state, eqx.filter(ref, eqx.is_inexact_array))
        ref = eqx.apply_updates(ref, updates)
        ref_losses.extend(ls)
    assert_tree_allclose(jnp.stack(losses), jnp.stack(ref_losses))
    assert_tree_allclose(eqx.filter(params, eqx.is_inexact_array), eqx.filter(ref, eqx.is_inexact_array))
    assert_tree_allclose(carry.traces, traces)
    assert not eqx.tree_equal(params, model)  # it learnt something


def test_bad_stream_input():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(4))
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    # Type errors name the argument: the checks of `Stream`, or the annotation checks of the test
    # suite's runtime type checking, whichever comes first.
    with pytest.raises(TypeError, match=r"`graph` must be an `eqtrace.ETraceGraph`|parameter 'graph'"):
        eqtrace.Stream(model, mse, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"`optim` must be an Optax optimiser"):
        eqtrace.Stream(graph, mse, "adam")
    with pytest.raises(TypeError, match=r"`loss_fn` must be a function|parameter 'loss_fn'"):
        eqtrace.Stream(graph, None, optax.sgd(0.1))
    for every in (0, 1.5, True):
        with pytest.raises(
            (TypeError, ValueError), match=r"`every` must be an integer >= 1|parameter 'every'"
        ):
            eqtrace.Stream(graph, mse, optax.sgd(0.1), every=every)
    with pytest.raises(ValueError, match=r"`algorithm` must be a rule object"):
        eqtrace.Stream(graph, mse, optax.sgd(0.1), "bptt")
    stream = eqtrace.Stream(graph, mse, optax.sgd(0.1))
    carry = stream.init(model, state)
    with pytest.raises(TypeError, match=r"`carry` must be the `eqtrace.StreamState`|parameter 'carry'"):
        stream.step(model, carry.traces, jnp.zeros(3), jnp.zeros(2))
    other = IndRNN(jax.random.key(5))
    with pytest.raises(ValueError, match=r"`graph` was compiled for another model"):
        stream.init(other, other.init_state())
    with pytest.raises(ValueError, match=r"`x` leaf .* compiled for"):
        stream.step(model, carry, jnp.zeros((1, 3)), jnp.zeros(2))


def test_stream_leaves_frozen_weights_alone():
    """With a graph compiled for a `filter_spec`, the frozen readout gets no gradient and no update,
    and the rest moves as `online_grad` with that `filter_spec` says."""
    model, lr, k = SingleLayerRNN(3, 4, 2, key=jax.random.key(6)), 0.1, 3
    xs, targets = _data(k, jax.random.key(7))
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: (m.out.weight, m.out.bias), spec, (False, False))
    graph = eqtrace.compile_etrace_graph(model, xs[0], model.init_state(), filter_spec=spec)
    stream = eqtrace.Stream(graph, mse, optax.sgd(lr), every=k)
    params, carry = model, stream.init(model, model.init_state())
    for t in range(k):
        params, carry, _, _ = stream.step(params, carry, xs[t], targets[t])
    grads, _ = eqtrace.online_grad(model, model.init_state(), xs, targets, mse, filter_spec=spec)
    assert grads.out.weight is None and carry.grads.out.weight is None
    assert bool(eqx.tree_equal(params.out, model.out))
    expected = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))
    assert_tree_allclose(params.rnn, expected.rnn)
    assert not bool(eqx.tree_equal(params.rnn, model.rnn))
