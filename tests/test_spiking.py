"""Spiking building blocks: surrogate spike functions, LIF/ALIF neurons, exponential synapses, leaky
readouts and spiking layers; their hidden groups; D-RTRL against BPTT (where exact) and against the
brute-force reference of its approximation."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqtrace
import eqtrace.nn as enn

from .brute_force import d_rtrl_reference_step, memory_as_traces
from .helpers import assert_tree_allclose
from .test_d_rtrl import _per_step_bptt, mse


# ------------------------------------------------------------------------------------------
# Surrogates


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


SURROGATES = [
    (enn.SigmoidSurrogate(3.0), lambda v: 3.0 * _sigmoid(3.0 * v) * (1 - _sigmoid(3.0 * v))),
    (enn.TriangleSurrogate(0.7), lambda v: np.maximum(0.0, 1 - np.abs(v) / 0.7) / 0.7),
    (enn.ArctanSurrogate(2.5), lambda v: 2.5 / (2 * (1 + (math.pi / 2 * 2.5 * v) ** 2))),
]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["sigmoid", "triangle", "arctan"])
def test_surrogate_forward_is_heaviside_and_grad_is_its_formula(index):
    surrogate, formula = SURROGATES[index]
    v = jnp.linspace(-2.0, 2.0, 81) + 0.013  # avoid v == 0 exactly
    s = surrogate(v)
    assert s.dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(s), (np.asarray(v) > 0).astype(np.float64))
    grad = jax.vmap(jax.grad(surrogate))(v)
    np.testing.assert_allclose(np.asarray(grad), formula(np.asarray(v)), rtol=1e-12, atol=1e-14)
    assert float(jnp.max(grad)) > 0
    # float32 in, float32 out, and the step at zero is strict.
    s32 = surrogate(jnp.array([-1.0, 0.0, 1.0], jnp.float32))
    assert s32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s32), [0.0, 0.0, 1.0])
    assert hash(surrogate) == hash(
        type(surrogate)(*[getattr(surrogate, f) for f in ("alpha", "width") if hasattr(surrogate, f)])
    )


def test_surrogate_rejects_bad_parameter():
    with pytest.raises(ValueError, match="alpha"):
        enn.SigmoidSurrogate(-1.0)
    with pytest.raises(ValueError, match="width"):
        enn.TriangleSurrogate(0.0)


# ------------------------------------------------------------------------------------------
# Neuron dynamics against plain-jnp references


def _currents(T, n, key):
    return jax.random.uniform(key, (T, n), minval=-0.2, maxval=1.2)


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_lif_equals_reference(reset):
    n, T, tau, v_th, v_reset = 5, 30, 4.0, 1.0, 0.1
    lif = enn.LIF(n, tau=tau, v_th=v_th, v_reset=v_reset, reset=reset, dt=0.5)
    currents = _currents(T, n, jax.random.key(0))
    alpha = math.exp(-0.5 / tau)
    V = np.zeros(n)
    state = lif.init_state()
    num_spikes = 0
    for t in range(T):
        s_prev = (V > v_th).astype(np.float64)
        if reset == "soft":
            V = alpha * V + np.asarray(currents[t]) - v_th * s_prev
        else:
            V = alpha * V * (1 - s_prev) + v_reset * s_prev + np.asarray(currents[t])
        state = lif(currents[t], state)
        np.testing.assert_allclose(np.asarray(state.V), V, rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(lif.spike(state)), (V > v_th).astype(np.float64))
        num_spikes += int((V > v_th).sum())
    assert num_spikes > 0


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_alif_equals_reference(reset):
    n, T, tau, tau_a, beta, v_th = 5, 40, 6.0, 15.0, 0.5, 0.8
    alif = enn.ALIF(n, tau=tau, tau_a=tau_a, beta=beta, v_th=v_th, reset=reset)
    currents = _currents(T, n, jax.random.key(1))
    alpha, rho = math.exp(-1 / tau), math.exp(-1 / tau_a)
    V, a = np.zeros(n), np.zeros(n)
    state = alif.init_state()
    for t in range(T):
        thr = v_th + beta * a
        s_prev = (V > thr).astype(np.float64)
        if reset == "soft":
            V = alpha * V + np.asarray(currents[t]) - thr * s_prev
        else:
            V = alpha * V * (1 - s_prev) + np.asarray(currents[t])
        a = rho * a + s_prev
        state = alif(currents[t], state)
        np.testing.assert_allclose(np.asarray(state.V), V, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(state.a), a, rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(alif.spike(state)), (V > v_th + beta * a).astype(np.float64))
    assert a.max() > 0  # the adaptation was exercised


def test_neuron_input_checks():
    lif = enn.LIF(3)
    with pytest.raises(ValueError, match="`I`"):
        lif(jnp.zeros(4), lif.init_state())
    with pytest.raises(TypeError, match="dtype"):
        lif(jnp.zeros(3, jnp.float32), lif.init_state())
    with pytest.raises(ValueError, match="reset"):
        enn.LIF(3, reset="zero")
    with pytest.raises(ValueError, match="hidden_size"):
        enn.RecurrentSpikingLayer(2, 3, neuron=enn.LIF(4), key=jax.random.key(0))


def test_exp_synapse_and_leaky_readout_equal_reference():
    syn = enn.ExpSynapse(3, tau_syn=2.0)
    readout = enn.LeakyRateReadout(3, 2, tau=3.0, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (6, 3))
    g, r = np.zeros(3), np.zeros(2)
    s_syn, s_out = syn.init_state(), readout.init_state()
    w, b = np.asarray(readout.W.weight), np.asarray(readout.W.bias)
    for x in xs:
        g = math.exp(-0.5) * g + np.asarray(x)
        r = math.exp(-1 / 3) * r + (1 - math.exp(-1 / 3)) * (np.asarray(x) @ w + b)
        s_syn, s_out = syn(x, s_syn), readout(x, s_out)
        np.testing.assert_allclose(np.asarray(syn.current(s_syn)), g, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(s_out.r), r, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Models


class SpikingNet(eqx.Module):
    """`layer` (feed-forward or recurrent spiking) → spikes → `out` (a Linear or a LeakyRateReadout);
    optionally plus a LeakyRateReadout `rate` of the input itself, added to the output."""

    layer: eqx.Module
    out: eqx.Module
    rate: enn.LeakyRateReadout | None

    def __call__(self, x, state):
        new = {"layer": self.layer(x, state["layer"])}
        spikes = self.layer.spike(new["layer"])
        if isinstance(self.out, enn.LeakyRateReadout):
            new["out"] = self.out(spikes, state["out"])
            y = new["out"].r
        else:
            y = self.out(spikes)
        if self.rate is not None:
            new["rate"] = self.rate(x, state["rate"])
            y = y + new["rate"].r
        return y, new

    def init_state(self):
        state = {"layer": self.layer.init_state()}
        if isinstance(self.out, enn.LeakyRateReadout):
            state["out"] = self.out.init_state()
        if self.rate is not None:
            state["rate"] = self.rate.init_state()
        return state


class SynapticLIF(eqx.Module):
    """Linear → ExpSynapse → LIF → Linear readout."""

    W: enn.Linear
    syn: enn.ExpSynapse
    lif: enn.LIF
    out: enn.Linear

    def __call__(self, x, state):
        syn = self.syn(self.W(x), state["syn"])
        lif = self.lif(self.syn.current(syn), state["lif"])
        return self.out(self.lif.spike(lif)), {"syn": syn, "lif": lif}

    def init_state(self):
        return {"syn": self.syn.init_state(), "lif": self.lif.init_state()}


def _net(kind, *, key, n_in=3, n=4, n_out=2, neuron=None, leaky_out=False, rate=False):
    k1, k2, k3 = jax.random.split(key, 3)
    neuron = enn.LIF(n) if neuron is None else neuron
    layer_cls = enn.FeedForwardSpikingLayer if kind == "ff" else enn.RecurrentSpikingLayer
    layer = layer_cls(n_in, n, neuron=neuron, key=k1)
    out = enn.LeakyRateReadout(n, n_out, key=k2) if leaky_out else enn.Linear(n, n_out, key=k2)
    return SpikingNet(layer, out, enn.LeakyRateReadout(n_in, n_out, key=k3) if rate else None)


def _relations(graph):
    return {r.weight_path: r for r in graph.hidden_param_op_relations}


# ------------------------------------------------------------------------------------------
# Hidden groups


def test_alif_state_is_one_group():
    model = _net("ff", neuron=enn.ALIF(4), key=jax.random.key(0))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    assert len(graph.hidden_groups) == 1
    assert set(graph.hidden_groups[0].hidden_paths) == {("layer", "V"), ("layer", "a")}
    assert graph.hidden_groups[0].num_state == 2
    rel = _relations(graph)
    assert rel[("layer", "W", "weight")].hidden_groups == (graph.hidden_groups[0],)


def test_lif_state_is_its_own_group_and_leaky_readout_another():
    model = _net("rec", leaky_out=True, key=jax.random.key(0))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    # The readout's matmul separates the readout's state from the neurons'.
    assert [g.hidden_paths for g in graph.hidden_groups] == [(("layer", "V"),), (("out", "r"),)]
    rel = _relations(graph)
    assert [g.index for g in rel[("out", "W", "weight")].hidden_groups] == [1]
    assert [g.index for g in rel[("layer", "W", "weight")].hidden_groups] == [0]


def test_synapse_joins_the_neuron_group():
    k = jax.random.split(jax.random.key(0), 2)
    model = SynapticLIF(enn.Linear(3, 4, key=k[0]), enn.ExpSynapse(4), enn.LIF(4), enn.Linear(4, 2, key=k[1]))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    assert len(graph.hidden_groups) == 1
    assert set(graph.hidden_groups[0].hidden_paths) == {("syn", "g"), ("lif", "V")}
    assert _relations(graph)[("W", "weight")].hidden_groups == (graph.hidden_groups[0],)


def test_learnable_tau_is_an_element_wise_relation():
    model = _net("ff", neuron=enn.ALIF(4, learn_tau=True), key=jax.random.key(0))
    assert model.layer.neuron.tau.shape == (4,)
    assert enn.LIF(4).tau is None
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    rel = _relations(graph)[("layer", "neuron", "tau")]
    assert rel.primitive is eqtrace.etp_element_wise_p
    assert rel.hidden_groups == (graph.hidden_groups[0],)


# ------------------------------------------------------------------------------------------
# D-RTRL


def _inputs(n_in, n_out, T, key):
    k1, k2 = jax.random.split(key)
    return 3.0 * jax.random.normal(k1, (T, n_in)), jax.random.normal(k2, (T, n_out))


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_d_rtrl_equals_bptt_per_step_feed_forward_lif(reset):
    """D-RTRL is exact here, so it must equal BPTT at every step.

    Model: Linear → LIF (learnable `tau`) → spikes → plain `Linear` readout, plus a
    `LeakyRateReadout` of the *input* added to the output. The LIF state is one group whose
    recurrence is element-wise (leak and reset are position-wise; no weight feeds spikes back), and
    `W` and `tau` reach `V` element-wise, so its diagonal trace is exact; the Linear readout has no
    state (exact same-step gradient). The rate readout is a second group, fed only by the input, so
    its weights' traces are exact too and no path joins the two groups across time.

    (A `LeakyRateReadout` fed by the spikes would not be exact: D-RTRL drops the path from the LIF
    weights through the readout's own state across time.)
    """
    neuron = enn.LIF(4, tau=5.0, v_th=0.5, reset=reset, learn_tau=True, surrogate=enn.ArctanSurrogate())
    model = _net("ff", neuron=neuron, rate=True, key=jax.random.key(2))
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    assert len(graph.hidden_groups) == 2
    T = 6
    xs, targets = _inputs(3, 2, T, jax.random.key(3))
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    s, num_spikes, nonzero = state, 0, None
    for t in range(T):
        traces, y, loss, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
        _, s = model(xs[t], s)
        num_spikes += int(jnp.sum(model.layer.spike(s["layer"])))
        step_nonzero = [bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads)]
        nonzero = (
            step_nonzero if nonzero is None else [a or b for a, b in zip(nonzero, step_nonzero, strict=True)]
        )
    assert num_spikes > 0
    # Every leaf (`tau` included, through the surrogate) got a non-zero gradient at some step.
    assert all(nonzero)


def test_d_rtrl_equals_brute_force_reference_recurrent_alif():
    """Recurrent ALIF layer into a LeakyRateReadout: D-RTRL is approximate here, and must equal the
    brute-force reference of the same approximation at every step."""
    neuron = enn.ALIF(4, tau=5.0, tau_a=10.0, beta=0.3, v_th=0.5, learn_tau=True)
    model = _net("rec", neuron=neuron, leaky_out=True, key=jax.random.key(5))
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    assert [len(g.hidden_paths) for g in graph.hidden_groups] == [2, 1]
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    memory, ref_state = {}, state
    xs, targets = _inputs(3, 2, 5, jax.random.key(6))
    num_spikes = 0
    for x, target in zip(xs, targets, strict=True):
        traces, y, loss, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = d_rtrl_reference_step(graph, model, ref_state, x, target, mse, memory)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        ref_traces, off_diagonal = memory_as_traces(graph, memory, model)
        assert off_diagonal == 0.0, "a traced relation has an entry off its position diagonal"
        assert_tree_allclose(list(traces.eps), ref_traces)
        num_spikes += int(jnp.sum(model.layer.spike(ref_state["layer"])))
    assert num_spikes > 0
    assert all(jnp.any(g != 0) for g in jax.tree.leaves(grads))


def test_d_rtrl_is_approximate_with_a_leaky_readout_of_spikes():
    """The counter-case of the exact test above: with a `LeakyRateReadout` reading the spikes, the
    LIF weights also reach the loss through the readout's state across time, a path that D-RTRL's
    per-group traces drop, so D-RTRL and BPTT must differ there (while the readout's own weights
    stay exact: they reach only `r`, whose recurrence is element-wise)."""
    model = _net("ff", neuron=enn.LIF(4, tau=5.0, v_th=0.5), leaky_out=True, key=jax.random.key(2))
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    xs, targets = _inputs(3, 2, 4, jax.random.key(3))
    traces = eqtrace.d_rtrl_init(graph, model, state)
    gap = 0.0
    for t in range(4):
        traces, _, _, grads = eqtrace.d_rtrl_step(graph, model, traces, xs[t], targets[t], mse)
        bptt = _per_step_bptt(model, state, xs, targets, t)
        assert_tree_allclose(grads.out, bptt.out)
        gap = max(gap, float(jnp.max(jnp.abs(grads.layer.W.weight - bptt.layer.W.weight))))
    assert gap > 1e-3
