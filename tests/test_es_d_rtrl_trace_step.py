"""ES-D-RTRL with `exact_step=False` (braintrace's single-step pp_prop): the step's own term estimated
by the traces after the step. Against a brute-force reference of the same estimator per step, against
D-RTRL and BPTT where the estimate is exact, and the drivers against the public steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn
from eqtrace._algorithms import _drivers

from .brute_force import es_d_rtrl_reference_step, output_traces
from .helpers import assert_tree_allclose, bptt_step_grads, check_drivers_sum_steps, rule_steps, tree_allclose
from .test_d_rtrl import _exact_models, _input_for, MODELS, mse
from .test_deferred_grads import _model, _sequences, ROWS


RULE = eqtrace.ESDRTRL(decay=0.7, window=0, exact_step=False)


class TwoUses(eqx.Module):
    """A weight used only by `eqtrace.matmul`, by one equation that reaches the hidden state (traced)
    and by one that reaches the output only (untraced: it keeps its exact same-step term)."""

    w: jax.Array
    u: jax.Array
    out: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(eqtrace.matmul(x, self.w) + self.u * h)
        return self.out(h + 0.5 * eqtrace.matmul(x, self.w)), h

    def init_state(self):
        return jnp.zeros(self.w.shape[1], self.w.dtype)


def _two_uses():
    k = jax.random.split(jax.random.key(5), 3)
    return TwoUses(
        jax.random.normal(k[0], (3, 4)), jax.random.uniform(k[1], (4,)), enn.Linear(4, 2, key=k[2])
    )


_EXACT = {name: (model, state) for name, model, state in _exact_models(True)}
# The IndRNN and the two-state neuron (whose adaptation reads the new `v`) with Linear readouts, a
# GRU, an LSTM (whose `h_t` reads its new `c_t`: each path must count once), spiking and convolutional
# models, and a weight with an untraced equation.
CASES = {
    "indrnn": _EXACT["elementwise_rnn"],
    "two_state": _EXACT["two_state"],
    "gru": (MODELS["GRUCell"], MODELS["GRUCell"].init_state()),
    "lstm": (MODELS["LSTMCell"], MODELS["LSTMCell"].init_state()),
    "two_layer_gru": (MODELS["two_layer_gru"], MODELS["two_layer_gru"].init_state()),
    "adaptive_neurons": (MODELS["adaptive_neurons"], MODELS["adaptive_neurons"].init_state()),
    "recurrent_lif_learnable_tau": (
        MODELS["recurrent_lif_learnable_tau"],
        MODELS["recurrent_lif_learnable_tau"].init_state(),
    ),
    "conv_leaky": (MODELS["conv_leaky"], MODELS["conv_leaky"].init_state()),
    "two_uses": (_two_uses(), _two_uses().init_state()),
}


def _steps(model, state, n):
    make_x = _input_for(model)
    xs = jnp.stack([make_x(k) for k in jax.random.split(jax.random.key(4), n)])
    y = jax.eval_shape(model, xs[0], state)[0]
    return xs, jax.random.normal(jax.random.key(5), (n,) + y.shape)


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_brute_force_reference_per_step(name, normalise):
    model, state = CASES[name]
    xs, targets = _steps(model, state, 4)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    step = eqx.filter_jit(eqtrace.es_d_rtrl_step)
    traces = eqtrace.es_d_rtrl_init(graph, model, state, 0.7, normalise=normalise, window=0, exact_step=False)
    memory, ref_state = {"x": {}, "f": {}}, state
    for x, target in zip(xs, targets):
        traces, y, loss, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = es_d_rtrl_reference_step(
            graph, model, ref_state, x, target, mse, memory, 0.7, 0, normalise, exact_step=False
        )
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        assert_tree_allclose(list(traces.f_bar), output_traces(graph, memory)[0])
        assert_tree_allclose(list(traces.x_bar), [memory["x"][e] for e in sorted(memory["x"])])
        assert_tree_allclose(traces.state, ref_state)
    # The estimate is not the exact step's: the default mode gives other gradients.
    exact = eqtrace.ESDRTRL(decay=0.7, window=0, normalise=normalise)
    *_, exact_grads = [g for _, g in rule_steps(exact, graph, model, state, xs, targets, mse)]
    assert not tree_allclose(grads, exact_grads)


@pytest.mark.parametrize("name", ["leaky", "elementwise_rnn", "two_state"])
def test_equals_d_rtrl_and_bptt_for_a_constant_input(name):
    """A constant input: `x̂_t = x`, so `x̂_t ⊗ f̄_t` is D-RTRL's trace `ε_t`, and `δ_t · ε_t` is
    D-RTRL's window-0 gradient where the loss reads only `h_t`; on these models that is BPTT's."""
    model, state = _EXACT[name]
    xs = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (3,)), (6, 3))
    ts = jax.random.normal(jax.random.key(2), (6, 2))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    estimate = [g for _, g in rule_steps(RULE, graph, model, state, xs, ts, mse)]
    d_rtrl = [g for _, g in rule_steps(eqtrace.DRTRL(window=0), graph, model, state, xs, ts, mse)]
    bptt = bptt_step_grads(model, state, xs, ts, mse)
    for t, (g_es, g_d) in enumerate(zip(estimate, d_rtrl)):
        assert_tree_allclose(g_es, g_d)
        assert_tree_allclose(g_es, jax.tree.map(lambda a: a[t], bptt))
    assert all(jnp.any(g != 0) for g in jax.tree.leaves(estimate[-1]))


@pytest.mark.parametrize(
    "name, time", [("gru", 7), ("gru", 8), ("shared_weight", 7), ("adaptive_neurons", 8)]
)
def test_drivers_sum_the_public_steps(name, time, monkeypatch):
    """`online_grad` and `batch_grad` (the weights of `x @ W` deferred as factors, in whole chunks or
    with a shorter last one) equal the sum and batch mean of `es_d_rtrl_step`'s dense gradients."""
    monkeypatch.setattr(_drivers, "CONTRACTION_ROWS", ROWS)
    model = _model(name)
    xs, targets = _sequences(time)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, xs[0, 0], state)

    def steps(xs, targets):
        return (g for _, g in rule_steps(RULE, graph, model, state, xs, targets, mse))

    check_drivers_sum_steps(RULE, model, state, xs, targets, mse, steps)


def test_deferred_rows_replace_the_same_step_rows():
    """A traced equation gives one row per step (`x̂_t`, `Σ f̄_t δ_t`), not the exact step's `x_t`
    beside it; the untraced equation of the same weight keeps its `x_t` row."""
    model = _two_uses()
    state = model.init_state()
    x = jnp.ones(3)
    graph = eqtrace.compile_etrace_graph(model, x, state)
    traces = RULE.init(graph, model, state)
    *_, factors = RULE.deferred_step(graph, model, traces, x, jnp.zeros(2), mse)
    paths = graph.module_info.weight_paths
    rows = {paths[f.weight_index]: f.left.shape[0] for f in factors}
    assert rows == {("w",): 2, ("out", "weight"): 1}
    exact = eqtrace.ESDRTRL(window=0)
    *_, factors = exact.deferred_step(graph, model, exact.init(graph, model, state), x, jnp.zeros(2), mse)
    assert {paths[f.weight_index]: f.left.shape[0] for f in factors} == {("w",): 3, ("out", "weight"): 1}


def test_shorthand():
    model = _model("gru")
    xs, targets = _sequences(5)
    state = model.init_state()
    g_rule, _ = eqtrace.online_grad(model, state, xs[0], targets[0], mse, algorithm=RULE)
    g_str, _ = eqtrace.online_grad(
        model, state, xs[0], targets[0], mse, algorithm="pp_prop", decay=0.7, window=0, exact_step=False
    )
    assert_tree_allclose(g_str, g_rule)


@pytest.mark.parametrize("window", [1, 2])
def test_needs_window_zero(window):
    model = MODELS["GRUCell"]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    match = rf"`exact_step=False`.*needs `window=0`, got `window={window}`"
    with pytest.raises(ValueError, match=match):
        eqtrace.ESDRTRL(window=window, exact_step=False)
    with pytest.raises(ValueError, match=match):
        eqtrace.es_d_rtrl_init(graph, model, model.init_state(), window=window, exact_step=False)
    eqtrace.ESDRTRL(window=0, exact_step=False)  # accepted
