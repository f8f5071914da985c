"""Saving and resuming mid-sequence: the model, the optimiser state and the traces go through
`eqx.tree_serialise_leaves`, the graph is recompiled, and the resumed run is bit for bit the run
that never stopped."""

import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqtrace

from .models import SingleLayerRNN


def mse(y, t):
    return jnp.mean((y - t) ** 2)


def _data(blocks, k, key):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (blocks, k, 3)), jax.random.normal(k2, (blocks, k, 2))


OPTIM = optax.adam(1e-2)


@eqx.filter_jit
def train_block(graph, algorithm, model, opt_state, traces, xs, targets):
    """One block of a long sequence: the online gradient from where `traces` stopped, then Adam."""
    grads, losses, traces = eqtrace.online_grad(
        model, None, xs, targets, mse, algorithm, graph=graph, traces=traces, return_traces=True
    )
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = OPTIM.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, traces, losses


def _start(key, algorithm):
    model = SingleLayerRNN(3, 4, 2, key=key)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    opt_state = OPTIM.init(eqx.filter(model, eqx.is_inexact_array))
    return model, graph, opt_state, algorithm.init(graph, model, state)


@pytest.mark.parametrize(
    "algorithm", [eqtrace.DRTRL(window=2), eqtrace.ESDRTRL(decay=0.8)], ids=["d_rtrl_window2", "es_d_rtrl"]
)
def test_resume_mid_sequence_is_bit_exact(tmp_path, algorithm):
    blocks, stop = 3, 2
    xs, targets = _data(blocks, 3, jax.random.key(1))

    model, graph, opt_state, traces = _start(jax.random.key(0), algorithm)
    straight = []
    for b in range(blocks):
        model, opt_state, traces, losses = train_block(
            graph, algorithm, model, opt_state, traces, xs[b], targets[b]
        )
        straight.append(losses)
        if b == stop - 1:
            path = tmp_path / "checkpoint.eqx"
            eqx.tree_serialise_leaves(path, (model, opt_state, traces))
    final = (model, opt_state, traces)

    # A fresh process would rebuild the skeleton (any key: only structure, shapes and dtypes count),
    # recompile the graph for it, and load the leaves into it.
    skeleton = _start(jax.random.key(99), algorithm)
    fresh_model, fresh_graph, *_ = skeleton
    assert not eqx.tree_equal(fresh_model, final[0])
    model, opt_state, traces = eqx.tree_deserialise_leaves(path, (fresh_model, skeleton[2], skeleton[3]))
    assert fresh_graph is not graph
    resumed = straight[:stop]
    for b in range(stop, blocks):
        model, opt_state, traces, losses = train_block(
            fresh_graph, algorithm, model, opt_state, traces, xs[b], targets[b]
        )
        resumed.append(losses)

    assert bool(eqx.tree_equal((model, opt_state, traces), final))
    assert bool(eqx.tree_equal(resumed, straight))
    assert not eqx.tree_equal(final[0], _start(jax.random.key(0), algorithm)[0])  # it trained


def test_stream_resumes_bit_exact(tmp_path):
    """A `Stream`'s carry (traces, gradient sum, optimiser state, step count) saves the same way,
    between two updates."""
    xs, targets = _data(1, 7, jax.random.key(2))
    xs, targets = xs[0], targets[0]
    model, graph, *_ = _start(jax.random.key(3), eqtrace.DRTRL())
    stream = eqtrace.Stream(graph, mse, OPTIM, every=3)
    step = eqx.filter_jit(stream.step)

    def run(params, carry, ts):
        for t in ts:
            params, carry, _, _ = step(params, carry, xs[t], targets[t])
        return params, carry

    final = run(model, stream.init(model, model.init_state()), range(7))
    half = run(model, stream.init(model, model.init_state()), range(4))
    assert int(half[1].count) == 1  # between two updates: a gradient sum in flight
    path = tmp_path / "stream.eqx"
    eqx.tree_serialise_leaves(path, half)

    other = SingleLayerRNN(3, 4, 2, key=jax.random.key(4))
    stream = eqtrace.Stream(
        eqtrace.compile_etrace_graph(other, xs[0], other.init_state()), mse, OPTIM, every=3
    )
    step = eqx.filter_jit(stream.step)
    loaded = eqx.tree_deserialise_leaves(path, (other, stream.init(other, other.init_state())))
    assert bool(eqx.tree_equal(loaded, half))
    assert bool(eqx.tree_equal(run(*loaded, range(4, 7)), final))


def test_graph_is_recompiled_not_pickled(tmp_path):
    model, graph, _, traces = _start(jax.random.key(5), eqtrace.DRTRL())
    with pytest.raises(TypeError, match=r"compile_etrace_graph\(model, x, state\)"):
        pickle.dumps(graph)
    # `eqx.tree_serialise_leaves` writes nothing for a graph (it holds no array), and loading gives
    # back the skeleton's own graph.
    eqx.tree_serialise_leaves(tmp_path / "graph.eqx", graph)
    assert (tmp_path / "graph.eqx").stat().st_size == 0
    # The recompiled graph steps traces made with the first one exactly as that one does.
    again = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    x, target = jnp.ones(3), jnp.ones(2)
    out = eqtrace.d_rtrl_step(graph, model, traces, x, target, mse)
    assert bool(eqx.tree_equal(eqtrace.d_rtrl_step(again, model, traces, x, target, mse), out))
    assert not bool(eqx.tree_equal(out[0], traces))
