"""RFLO against its oracles: a brute-force reference of its own approximation (a constant-leak
trace of the instantaneous `∂q_t/∂W` from full Jacobians, times the learning signal through `B` by
`jax.grad`), per step, on a recurrent LIF network, whose step Jacobian is not the leak; e-prop and
D-RTRL on RFLO's own leaky rate network, where the model's blocks are the leak; BPTT on a leaky layer
without recurrent connections; the drivers under `eqx.filter_jit`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqtrace
import eqtrace.nn as enn
from eqtrace._compiler._run import unflatten_step_outputs

from .brute_force import _flat, _group_rows, _run, _step_parts, memory_as_traces
from .helpers import assert_tree_allclose, rule_steps
from .test_d_rtrl import _per_step_bptt, mse
from .test_ottt import check_drivers
from .test_spiking import _inputs, _net


class LeakyRateRNN(eqx.Module):
    """Murray's network: `h_t = (1 - 1/τ) h_{t-1} + (1/τ) tanh([x_t; h_{t-1}] W + b)`, read by a
    stateless `Linear`; without `recurrent`, `W` reads `x_t` only."""

    W: enn.Linear
    out: enn.Linear
    tau: float = eqx.field(static=True)
    recurrent: bool = eqx.field(static=True)

    def __init__(self, n_in, n, n_out, *, tau, recurrent=True, key):
        k1, k2 = jax.random.split(key)
        self.W = enn.Linear(n_in + n if recurrent else n_in, n, key=k1)
        self.out = enn.Linear(n, n_out, key=k2)
        self.tau, self.recurrent = tau, recurrent

    def __call__(self, x, h):
        u = jnp.concatenate([x, h]) if self.recurrent else x
        h = (1 - 1 / self.tau) * h + (1 / self.tau) * jnp.tanh(self.W(u))
        return self.out(h), h


def _rate_net(recurrent=True):
    return LeakyRateRNN(3, 4, 2, tau=4.0, recurrent=recurrent, key=jax.random.key(1)), jnp.zeros(4)


@pytest.mark.parametrize("feedback", ["symmetric", "random"])
def test_rflo_is_eprop_on_its_own_network(feedback):
    """In RFLO's network the blocks `D_t` with ETP outputs held fixed are the leak `1 - 1/τ`: RFLO with
    `tau=τ`, RFLO with `tau=None` and e-prop are one rule there (with symmetric feedback, also
    D-RTRL with `window=0`)."""
    model, state = _rate_net()
    xs, targets = _inputs(3, 2, 5, jax.random.key(2))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    rules = [
        eqtrace.RFLO(tau=4.0, feedback=feedback, seed=3),
        eqtrace.RFLO(feedback=feedback, seed=3),
        eqtrace.EProp(feedback=feedback, seed=3),
    ]
    if feedback == "symmetric":
        rules.append(eqtrace.DRTRL(window=0))
    runs = [list(rule_steps(rule, graph, model, state, xs, targets, mse)) for rule in rules]
    for steps in zip(*runs, strict=True):
        (traces, grads), *others = steps
        for other_traces, other_grads in others:
            assert_tree_allclose(other_grads, grads)
            assert_tree_allclose(list(other_traces.eps), list(traces.eps))
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    # Not BPTT: the recurrent path through `W` is dropped.
    bptt = _per_step_bptt(model, state, xs, targets, len(xs) - 1)
    assert float(jnp.max(jnp.abs(grads.W.weight - bptt.W.weight))) > 1e-6


def test_rflo_equals_bptt_on_a_leaky_layer_without_recurrence():
    model, state = _rate_net(recurrent=False)
    xs, targets = _inputs(3, 2, 5, jax.random.key(2))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    steps = rule_steps(eqtrace.RFLO(tau=4.0, feedback="symmetric"), graph, model, state, xs, targets, mse)
    for t, (_, grads) in enumerate(steps):
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
    # With another time constant the trace is off.
    wrong = list(
        rule_steps(eqtrace.RFLO(tau=2.0, feedback="symmetric"), graph, model, state, xs, targets, mse)
    )
    bptt = _per_step_bptt(model, state, xs, targets, len(xs) - 1)
    assert float(jnp.max(jnp.abs(wrong[-1][1].W.weight - bptt.W.weight))) > 1e-4


def _reference(graph, model, state, xs, targets, leak, feedback_matrix):
    """RFLO per step from full Jacobians: `p_t = leak · p_{t-1} + I_t`, with `I_t = ∂q_t/∂W` by
    `jax.jacfwd` (ETP inputs cut, rows of the weight's groups); the gradient is the exact same-step
    gradient plus `δ̃_t p_t - δ_t I_t`, `δ_t = ∂L_t/∂q_t` and `δ̃_t` the same with `B` in place of the
    readout weight and the loss `⟨∂L_t/∂y_t, y_t⟩` (symmetric: `δ̃ = δ`)."""
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    hid_index = {p: i for i, p in enumerate(graph.module_info.hidden_paths)}
    memory, out = {}, []
    for x, target in zip(xs, targets, strict=True):
        weights, xs_, hidden, offsets, _, _, grads = _step_parts(graph, model, state, x, target, mse)
        shapes = [hidden[hid_index[p]].shape for p in graph.hidden_perturb.hidden_paths]

        def signal(weights, loss):
            def of_perturbation(flat_p):
                adds = [flat_p[offsets[k] : offsets[k + 1]].reshape(s) for k, s in enumerate(shapes)]
                return loss(unflatten_step_outputs(graph, _run(graph, weights, xs_, hidden, add=adds)[0])[0])

            return jax.grad(of_perturbation)(jnp.zeros(offsets[-1]))

        delta = signal(weights, lambda y: mse(y, target))
        tilde = delta
        if feedback_matrix is not None:
            y = model(x, state)[0]
            g_y = jax.grad(mse)(y, target)
            swapped = list(weights)
            swapped[index[("out", "weight")]] = feedback_matrix
            tilde = signal(swapped, lambda y: jnp.vdot(g_y, y))
        for r, rel in enumerate(graph.hidden_param_op_relations):
            w = weights[index[rel.weight_path]]
            rows = _group_rows(graph, offsets, rel.hidden_groups, len(delta))

            def q_of_weight(wv):
                over = {(rel.eqn_index, rel.operand_index): wv.reshape(w.shape)}
                return _flat(_run(graph, weights, xs_, hidden, cut=True, weight_override=over)[1])

            instant = jnp.where(rows[:, None], jax.jacfwd(q_of_weight)(jnp.ravel(w)), 0.0)
            memory[r] = leak * memory.get(r, jnp.zeros_like(instant)) + instant
            g = index[rel.weight_path]
            grads[g] = grads[g] + (tilde @ memory[r] - delta @ instant).reshape(w.shape)
        state = model(x, state)[1]
        out.append((grads, memory_as_traces(graph, memory, model)[0]))
    return out


@pytest.mark.parametrize("feedback", ["symmetric", "random"])
def test_rflo_equals_brute_force_reference_recurrent_lif(feedback):
    """A recurrent LIF layer (learnable time constants) with a stateless readout: its step Jacobian
    holds the reset and the leak `e^{-1/5}`, RFLO's trace the leak `1 - 1/5` only."""
    neuron = enn.LIF(4, tau=5.0, v_th=0.5, learn_tau=True)
    model = _net("rec", neuron=neuron, key=jax.random.key(5))
    state = model.init_state()
    xs, targets = _inputs(3, 2, 4, jax.random.key(6))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    rule = eqtrace.RFLO(tau=5.0, feedback=feedback, seed=1)
    traces = rule.init(graph, model, state)
    reference = _reference(graph, model, state, xs, targets, 0.8, traces.feedback)
    live = None
    for (traces, grads), (ref_grads, ref_traces) in zip(
        rule_steps(rule, graph, model, state, xs, targets, mse), reference
    ):
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        assert_tree_allclose(list(traces.eps), ref_traces)
        nonzero = [bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads)]
        live = nonzero if live is None else [a or b for a, b in zip(live, nonzero, strict=True)]
    assert all(live)  # every leaf got a non-zero gradient at some step (the readout: when it spikes)
    eprop = list(rule_steps(eqtrace.EProp(feedback=feedback, seed=1), graph, model, state, xs, targets, mse))[
        -1
    ][1]
    assert not np.allclose(eprop.layer.W.weight, grads.layer.W.weight)


def test_rflo_drivers_under_filter_jit():
    model, state = _rate_net()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    check_drivers(eqtrace.RFLO(tau=4.0, seed=2), model, state, graph, 3, 2)


def test_rflo_refuses_bad_options_and_foreign_traces():
    with pytest.raises(ValueError, match="tau"):
        eqtrace.RFLO(tau=0.5)
    with pytest.raises(ValueError, match="feedback"):
        eqtrace.RFLO(feedback="transpose")
    model, state = _rate_net()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    traces = eqtrace.RFLO(feedback="symmetric").init(graph, model, state)
    with pytest.raises(ValueError, match="seed"):
        eqtrace.RFLO(seed=4).step(graph, model, traces, jnp.zeros(3), jnp.zeros(2), mse)
    # A leaky readout is a hidden state: no stateless readout weight for `B` to replace.
    leaky = _net("rec", leaky_out=True, key=jax.random.key(0))
    leaky_graph = eqtrace.compile_etrace_graph(leaky, jnp.zeros(3), leaky.init_state())
    with pytest.raises(ValueError, match="readout weight"):
        eqtrace.RFLO().init(leaky_graph, leaky, leaky.init_state())
    assert eqtrace.RFLO(feedback="symmetric").init(leaky_graph, leaky, leaky.init_state()).feedback is None
