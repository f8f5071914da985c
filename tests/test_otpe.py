"""OTPE against its oracles: the brute-force reference of its own approximation (postsynaptic traces
through the masked full hidden Jacobian, times the sensitivity at the mean past input), per step;
BPTT where OTTT is exact, and for a weight without input, whose sensitivity the postsynaptic trace
carries exactly through the neuron's own dynamics; the drivers under `eqx.filter_jit`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace

from .helpers import assert_tree_allclose, rule_steps
from .test_d_rtrl import _exact_models, _per_step_bptt, _sequence, mse
from .test_ottt import _detached_lif, check_drivers, presynaptic_reference, recurrent_alif
from .test_spiking import _inputs


def test_otpe_equals_brute_force_reference_per_step():
    model = recurrent_alif()
    state = model.init_state()
    xs, targets = _inputs(3, 2, 4, jax.random.key(6))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    reference = presynaptic_reference(graph, model, state, xs, targets, 0.7, "otpe")
    steps = rule_steps(eqtrace.OTPE(decay=0.7), graph, model, state, xs, targets, mse)
    for (_, grads), ref in zip(steps, reference, strict=True):
        assert_tree_allclose(jax.tree.leaves(grads), ref)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    # The postsynaptic traces carry the ALIF's own dynamics: OTTT's estimate differs.
    ottt = list(rule_steps(eqtrace.OTTT(decay=0.7), graph, model, state, xs, targets, mse))[-1][1]
    assert float(jnp.max(jnp.abs(ottt.layer.W.weight - grads.layer.W.weight))) > 1e-6


def test_otpe_equals_bptt_where_ottt_is_exact():
    model, decay = _detached_lif()
    state = model.init_state()
    xs, targets = _inputs(3, 2, 6, jax.random.key(3))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    otpe = rule_steps(eqtrace.OTPE(decay=decay), graph, model, state, xs, targets, mse)
    for t, (_, grads) in enumerate(otpe):
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_otpe_credits_a_time_constant_exactly_through_the_neurons_own_dynamics():
    """`v ← e^{-1/τ} v + x W - a`, `a ← 0.7 a + 0.3 tanh(v)`: the learnable `τ` goes through an
    operation without input, whose sensitivity is constant, so `f̄_t ⊙ ∂y/∂τ` is `∂h_t/∂τ` and OTPE's
    gradient of `τ` is BPTT's; OTTT's, which takes the state to be a leak, is not."""
    _, model, state = _exact_models(readout=True)[2]
    xs, targets = _sequence(2, 3, 5, jax.random.key(1))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    otpe = rule_steps(eqtrace.OTPE(decay=0.8), graph, model, state, xs, targets, mse)
    ottt = rule_steps(eqtrace.OTTT(decay=0.8), graph, model, state, xs, targets, mse)
    gap = 0.0
    for t, ((_, g_pe), (_, g_tt)) in enumerate(zip(otpe, ottt)):
        bptt = _per_step_bptt(model, state, xs, targets, t)
        assert_tree_allclose(g_pe.tau, bptt.tau)
        assert_tree_allclose(g_pe.readout, bptt.readout)
        gap = max(gap, float(jnp.max(jnp.abs(g_tt.tau - bptt.tau))))
    assert gap > 1e-4


def test_otpe_drivers_batch_native_under_filter_jit():
    model = recurrent_alif()
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    assert eqtrace.OTPE.batch_native
    check_drivers(eqtrace.OTPE(decay=0.6), model, state, graph, 3, 2)


def test_otpe_refuses_bad_options_and_foreign_traces():
    with pytest.raises(ValueError, match="decay"):
        eqtrace.OTPE(decay=-0.1)
    model, _ = _detached_lif()
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    ottt_traces = eqtrace.OTTT().init(graph, model, state)
    with pytest.raises(TypeError, match="OTPETraces"):
        eqx.filter_jit(eqtrace.OTPE().step)(graph, model, ottt_traces, jnp.zeros(3), jnp.zeros(2), mse)
