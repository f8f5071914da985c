"""SnAp-1 against a brute-force reference of the same approximation (full Jacobians of the step, not
cut at ETP inputs, masked to same-group, same-position entries), against D-RTRL where the two
sparsity patterns coincide, and against BPTT for its fidelity."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .brute_force import memory_as_traces, snap1_reference_step, window_reference
from .helpers import assert_tree_allclose, check_drivers_sum_steps, rule_steps, tree_allclose
from .models import StackedCells
from .test_d_rtrl import _random_steps, MODELS, mse, SpikingNet


# Models whose recurrence goes through ETP operations (where SnAp-1 and D-RTRL differ): a vanilla
# RNN, a GRU, two GRU layers, an LSTM, recurrent ALIF neurons, and a convolution before an RNN.
ETP_RECURRENT = ["single_layer_rnn", "GRUCell", "two_layer_gru", "LSTMCell", "recurrent_alif", "conv_rnn"]
# And one whose positions mix outside ETP operations only (SnAp-1 is D-RTRL there).
SNAP_MODELS = ETP_RECURRENT + ["mixing"]


@pytest.mark.parametrize("window", [0, 1])
@pytest.mark.parametrize("name", SNAP_MODELS)
def test_snap1_equals_brute_force_reference_per_step(name, window):
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 4)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    memory, ref_state = {}, state
    steps = rule_steps(eqtrace.SnAp1(window=window), graph, model, state, xs, targets, mse)
    for x, target, (traces, grads) in zip(xs, targets, steps):
        memory, ref_grads, ref_state = snap1_reference_step(
            graph, model, ref_state, x, target, mse, memory, window
        )
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        ref_traces, off_diagonal = memory_as_traces(graph, memory, model)
        assert off_diagonal == 0.0, "a traced relation has an entry off its position diagonal"
        assert_tree_allclose(list(traces.eps), ref_traces)
        assert_tree_allclose(traces.state, ref_state)
    # The recurrence through ETP operations reached the traces: they are not D-RTRL's.
    drtrl = list(rule_steps(eqtrace.DRTRL(window=window), graph, model, state, xs, targets, mse))[-1][0]
    assert tree_allclose(list(traces.eps), list(drtrl.eps)) == (name not in ETP_RECURRENT)


@pytest.mark.parametrize("name", ["two_layer_gru", "single_layer_rnn"])
def test_snap1_window_equals_brute_force_reference_per_step(name):
    """`window=3`: exact back-propagation through the last three steps, traces two steps behind."""
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 5)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    steps = rule_steps(eqtrace.SnAp1(window=3), graph, model, state, xs, targets, mse)
    reference = window_reference(graph, model, state, xs, targets, mse, 3, snap1_reference_step, {})
    for (traces, grads), (ref_grads, memory) in zip(steps, reference):
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        assert_tree_allclose(
            list(traces.eps),
            memory_as_traces(graph, memory, model)[0] if memory else [jnp.zeros_like(e) for e in traces.eps],
        )


# ------------------------------------------------------------------------------------------
# Where no ETP operation reads a hidden state of the group it feeds (position-diagonal models here),
# the full step Jacobian's per-position blocks are those with ETP outputs held fixed: SnAp-1 is
# D-RTRL.


def _position_diagonal_models():
    k = jax.random.split(jax.random.key(9), 3)
    return {
        "IndRNNCell": MODELS["IndRNNCell"],
        "feed_forward_lif": SpikingNet(
            enn.FeedForwardSpikingLayer(3, 5, neuron=enn.LIF(5, learn_tau=True), key=k[0]),
            enn.LeakyRateReadout(5, 2, key=k[1]),
        ),
    }


@pytest.mark.parametrize("window", [0, 1, 2])
@pytest.mark.parametrize("name", ["IndRNNCell", "feed_forward_lif"])
def test_snap1_is_d_rtrl_where_the_patterns_coincide(name, window):
    model = _position_diagonal_models()[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 5)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    snap = rule_steps(eqtrace.SnAp1(window=window), graph, model, state, xs, targets, mse)
    drtrl = rule_steps(eqtrace.DRTRL(window=window), graph, model, state, xs, targets, mse)
    for (s_traces, s_grads), (d_traces, d_grads) in zip(snap, drtrl):
        assert_tree_allclose(s_grads, d_grads)
        assert_tree_allclose(s_traces, d_traces)
    assert any(jnp.any(e != 0) for e in s_traces.eps)


# ------------------------------------------------------------------------------------------
# Fidelity: on a vanilla RNN and a GRU, SnAp-1's gradient is closer to BPTT's than D-RTRL's.


def _fidelity(make_cell, seeds, T=30, batch=8, n=8):
    """Relative error and cosine to BPTT of the batch-mean gradient over a sequence of length `T`,
    per rule, averaged over models built from `seeds`."""
    rules = {"bptt": None, "d_rtrl": eqtrace.DRTRL(), "snap1": eqtrace.SnAp1()}

    @eqx.filter_jit
    def grads(model, states, xs, targets):
        out = {"bptt": eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, targets, mse)[0]}
        for name, rule in rules.items():
            if rule is not None:
                out[name] = eqtrace.batch_grad(
                    eqtrace.online_grad, model, states, xs, targets, mse, algorithm=rule
                )[0]
        return {k: jax.flatten_util.ravel_pytree(g)[0] for k, g in out.items()}

    errors = {"d_rtrl": [], "snap1": []}
    cosines = {"d_rtrl": [], "snap1": []}
    for seed in seeds:
        k = jax.random.split(jax.random.key(seed), 4)
        model = StackedCells((make_cell(3, n, key=k[0]),), enn.Linear(n, 2, key=k[1]))
        states = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), model.init_state())
        xs = jax.random.normal(k[2], (batch, T, 3))
        targets = jax.random.normal(k[3], (batch, T, 2))
        g = grads(model, states, xs, targets)
        exact = g["bptt"]
        for name in errors:
            errors[name].append(float(jnp.linalg.norm(g[name] - exact) / jnp.linalg.norm(exact)))
            cosines[name].append(float(g[name] @ exact / (jnp.linalg.norm(g[name]) * jnp.linalg.norm(exact))))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {k: mean(v) for k, v in errors.items()}, {k: mean(v) for k, v in cosines.items()}


@pytest.mark.parametrize("cell", [enn.VanillaRNNCell, enn.GRUCell], ids=["vanilla_rnn", "gru"])
def test_snap1_is_closer_to_bptt_than_d_rtrl(cell):
    errors, cosines = _fidelity(cell, seeds=range(4))
    assert errors["snap1"] < errors["d_rtrl"], errors
    assert cosines["snap1"] > cosines["d_rtrl"], cosines


# ------------------------------------------------------------------------------------------
# Drivers and checks.


def test_online_grad_and_batch_grad_sum_the_reference_steps():
    model = MODELS["single_layer_rnn"]
    state = model.init_state()
    xs = jnp.stack([_random_steps(model, 4, seed=s)[0] for s in (10, 11)])
    targets = jnp.stack([_random_steps(model, 4, seed=s)[1] for s in (10, 11)])
    graph = eqtrace.compile_etrace_graph(model, xs[0, 0], state)

    treedef = jax.tree.structure(eqx.filter(model, eqx.is_inexact_array))

    def reference(xs, targets):
        memory, s = {}, state
        for x, target in zip(xs, targets):
            memory, g, s = snap1_reference_step(graph, model, s, x, target, mse, memory)
            yield jax.tree.unflatten(treedef, g)

    check_drivers_sum_steps(eqtrace.SnAp1(), model, state, xs, targets, mse, reference)


def test_a_window_as_long_as_the_sequence_is_bptt():
    model = MODELS["two_layer_gru"]
    state = model.init_state()
    xs, targets = _random_steps(model, 3, seed=8)
    grads, _ = eqtrace.online_grad(model, state, xs, targets, mse, algorithm=eqtrace.SnAp1(window=3))
    assert_tree_allclose(grads, eqtrace.bptt_grad(model, state, xs, targets, mse)[0])


def test_bad_options_and_traces():
    with pytest.raises(ValueError, match="`window`"):
        eqtrace.SnAp1(window=-1)
    model = MODELS["single_layer_rnn"]
    state = model.init_state()
    xs, targets = _random_steps(model, 1)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    rule = eqtrace.SnAp1()
    traces = rule.init(graph, model, state)
    with pytest.raises(ValueError, match="`traces` leaf"):  # one example's traces, stepped as a batch
        rule.step(graph, model, traces, xs[0], targets[0], mse, batched=True)
    other = MODELS["GRUCell"]
    other_traces = rule.init(eqtrace.compile_etrace_graph(other, xs[0], other.init_state()), other, state)
    with pytest.raises((TypeError, ValueError), match=r"SnAp1\(\)\.init"):
        rule.step(graph, model, other_traces, xs[0], targets[0], mse)
    assert rule.traces_relation(graph.hidden_param_op_relations[0])
    assert eqtrace.SnAp1.batch_native
