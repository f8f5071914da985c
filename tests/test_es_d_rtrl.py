"""ES-D-RTRL (pp_prop) against a brute-force reference of the same estimator on every model, and
against D-RTRL where the factorisation is exact."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace

from .brute_force import es_d_rtrl_reference_step, output_traces, window_reference
from .helpers import assert_tree_allclose, tree_allclose
from .test_d_rtrl import _exact_models, _random_steps, LeakyIntegrator, MODELS, mse


# Every model with the default options; the older learning signal (window 0) and the unnormalised
# input trace on a few with several groups, states or positions.
ES_CASES = [(name, 1, True) for name in sorted(MODELS)] + [
    ("two_layer_gru", 0, True),
    ("recurrent_alif", 0, True),
    ("conv_leaky", 0, True),
    ("LSTMCell", 0, True),
    ("two_layer_gru", 1, False),
    ("adaptive_neurons", 1, False),
]


@pytest.mark.parametrize("name, window, normalise", ES_CASES)
def test_es_d_rtrl_equals_brute_force_reference_per_step(name, window, normalise):
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 4)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    step = eqx.filter_jit(eqtrace.es_d_rtrl_step)
    traces = eqtrace.es_d_rtrl_init(graph, model, state, decay=0.7, window=window, normalise=normalise)
    memory, ref_state = {"x": {}, "f": {}}, state
    for x, target in zip(xs, targets):
        traces, y, loss, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = es_d_rtrl_reference_step(
            graph, model, ref_state, x, target, mse, memory, 0.7, window, normalise
        )
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        ref_f, off_diagonal = output_traces(graph, memory)
        assert off_diagonal == 0.0
        assert_tree_allclose(list(traces.f_bar), ref_f)
        assert_tree_allclose(list(traces.x_bar), [memory["x"][e] for e in sorted(memory["x"])])
        assert_tree_allclose(traces.state, ref_state)


@pytest.mark.parametrize("name", ["two_layer_gru", "conv_leaky"])
def test_es_d_rtrl_window_equals_brute_force_reference_per_step(name):
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 5)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    step = eqx.filter_jit(eqtrace.es_d_rtrl_step)
    traces = eqtrace.es_d_rtrl_init(graph, model, state, decay=0.7, window=3)
    reference_step = functools.partial(es_d_rtrl_reference_step, decay=0.7)
    memory = {"x": {}, "f": {}}
    reference = window_reference(graph, model, state, xs, targets, mse, 3, reference_step, memory)
    for x, target, (ref_grads, _) in zip(xs, targets, reference):
        traces, y, loss, grads = step(graph, model, traces, x, target, mse)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)


def test_equals_d_rtrl_with_decay_zero_and_no_recurrence():
    """`D = 0`: the state forgets its past, both traces hold only the current step."""

    class FeedForward(eqx.Module):
        w: jax.Array
        readout: eqtrace.nn.Linear

        def __call__(self, x, h):
            h = jnp.tanh(eqtrace.matmul(x, self.w))
            return self.readout(h), h

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    model = FeedForward(jax.random.normal(k1, (3, 4)), eqtrace.nn.Linear(4, 2, key=k2))
    xs, ts = jax.random.normal(k3, (6, 3)), jax.random.normal(k2, (6, 2))
    g_es, _ = eqtrace.online_grad(model, jnp.zeros(4), xs, ts, mse, algorithm="es_d_rtrl", decay=0.0)
    g_d, _ = eqtrace.online_grad(model, jnp.zeros(4), xs, ts, mse, algorithm="d_rtrl")
    assert_tree_allclose(g_es, g_d)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["leaky", "elementwise_rnn", "two_state"])
def test_equals_d_rtrl_and_bptt_in_the_rank_one_case(index):
    """A constant input: the normalised input trace is `x` itself whatever the decay, so `x̄ ⊗ f̄` is
    D-RTRL's trace exactly, and on these models D-RTRL is exact."""
    _, model, state = _exact_models(True)[index]
    xs = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (3,)), (6, 3))
    ts = jax.random.normal(jax.random.key(2), (6, 2))
    g_es, l_es = eqtrace.online_grad(model, state, xs, ts, mse, algorithm="pp_prop", decay=0.9)
    g_d, _ = eqtrace.online_grad(model, state, xs, ts, mse, algorithm="d_rtrl")
    g_b, l_b = eqtrace.bptt_grad(model, state, xs, ts, mse)
    assert_tree_allclose(g_es, g_d)
    assert_tree_allclose(g_es, g_b)
    assert_tree_allclose(l_es, l_b)


def test_decay_changes_the_gradient():
    model = LeakyIntegrator(jax.random.normal(jax.random.key(3), (3, 4)), None)
    xs, ts = jax.random.normal(jax.random.key(4), (6, 3)), jax.random.normal(jax.random.key(5), (6, 4))
    grads = [
        eqtrace.online_grad(model, jnp.zeros(4), xs, ts, mse, algorithm="es_d_rtrl", decay=d)[0]
        for d in (0.0, 0.5, 0.9)
    ]
    assert not tree_allclose(grads[0], grads[1])
    assert not tree_allclose(grads[1], grads[2])


def test_trace_memory_is_inputs_plus_outputs():
    """Per traced operation: the input's size, plus `N·S` per reached group."""
    model = MODELS["LSTMCell"]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    traces = eqtrace.es_d_rtrl_init(graph, model, model.init_state())
    n_ops = len({r.eqn_index for r in graph.hidden_param_op_relations})
    assert [a.shape for a in traces.x_bar] == [(3 + 4,)] * n_ops
    assert [a.shape for a in traces.f_bar] == [(4, 2)] * n_ops


def test_bad_decay():
    model = MODELS["GRUCell"]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    with pytest.raises(ValueError, match=r"`decay` must be a number in \[0, 1\], got 1.5"):
        eqtrace.es_d_rtrl_init(graph, model, model.init_state(), decay=1.5)
