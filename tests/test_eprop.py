"""e-prop against its oracles: BPTT on a feed-forward LIF layer (exact there), D-RTRL with `window=0`
on a recurrent LIF/ALIF layer with a stateless readout (the same sum there), and a brute-force
reference of e-prop itself (D-RTRL's traces from `eqtrace.d_rtrl_step`, the learning signal by
`jax.grad` of the model's own readout), for random feedback and filtered traces; all per step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose, check_drivers_sum_steps
from .models import StackedCells
from .test_d_rtrl import _per_step_bptt, mse
from .test_spiking import _inputs, _net


def _recurrent(neuron_kind, *, leaky_out=False, key=5):
    if neuron_kind == "lif":
        neuron = enn.LIF(4, tau=5.0, v_th=0.5, learn_tau=True)
    else:
        neuron = enn.ALIF(4, tau=5.0, tau_a=10.0, beta=0.3, v_th=0.5, learn_tau=True)
    return _net("rec", neuron=neuron, leaky_out=leaky_out, key=jax.random.key(key))


def _count_spikes(model, state, xs):
    n = 0
    for x in xs:
        _, state = model(x, state)
        n += int(jnp.sum(model.layer.spike(state["layer"])))
    return n


@pytest.mark.parametrize("neuron", ["lif", "alif"])
def test_eprop_equals_d_rtrl_window_0_recurrent_layer(neuron):
    """With a stateless Linear readout of the current spikes, the loss reads the layer only through
    its new state, so D-RTRL's `window=0` sum `grads_same_step + δ_t D_t ε_{t-1}` is e-prop's
    `δ_t · ε_t`: equal at every step (the recurrent weights included, whose ETP path both drop)."""
    model = _recurrent(neuron)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    T = 6
    xs, targets = _inputs(3, 2, T, jax.random.key(6))
    assert _count_spikes(model, state, xs) > 0
    eprop, drtrl = eqtrace.EProp(), eqtrace.DRTRL(window=0)
    e_step, d_step = eqx.filter_jit(eprop.step), eqx.filter_jit(drtrl.step)
    e_tr, d_tr = eprop.init(graph, model, state), drtrl.init(graph, model, state)
    gap = 0.0
    for t in range(T):
        e_tr, y, loss, grads = e_step(graph, model, e_tr, xs[t], targets[t], mse)
        d_tr, y_d, loss_d, grads_d = d_step(graph, model, d_tr, xs[t], targets[t], mse)
        assert_tree_allclose((y, loss, grads), (y_d, loss_d, grads_d))
        assert_tree_allclose(list(e_tr.eps), list(d_tr.eps))
        bptt = _per_step_bptt(model, state, xs, targets, t)
        gap = max(gap, float(jnp.max(jnp.abs(grads.layer.W.weight - bptt.layer.W.weight))))
    # Not BPTT: the recurrent connections are not back-propagated through.
    assert gap > 1e-6
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_eprop_equals_bptt_per_step_feed_forward_lif(reset):
    neuron = enn.LIF(4, tau=5.0, v_th=0.5, reset=reset, learn_tau=True, surrogate=enn.ArctanSurrogate())
    model = _net("ff", neuron=neuron, key=jax.random.key(2))
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    T = 6
    xs, targets = _inputs(3, 2, T, jax.random.key(3))
    assert _count_spikes(model, state, xs) > 0
    rule = eqtrace.EProp()
    step = eqx.filter_jit(rule.step)
    traces = rule.init(graph, model, state)
    live = None
    for t in range(T):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, _per_step_bptt(model, state, xs, targets, t))
        nonzero = [bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads)]
        live = nonzero if live is None else [a or b for a, b in zip(live, nonzero, strict=True)]
    assert all(live)  # every leaf got a non-zero gradient at some step


def _group_stack(tree, group):
    """The leaves of a gradient w.r.t. the model state at `group`'s hidden paths, stacked on a last
    state axis (the layout of the traces' state axis)."""
    leaves = []
    for path in group.hidden_paths:
        node = tree
        for name in path:
            node = node[name] if isinstance(node, dict) or isinstance(name, int) else getattr(node, name)
        leaves.append(node)
    return jnp.stack(leaves, axis=-1)


def _reference_grads(graph, model, feedback_matrix, kappa, state, xs, targets):
    """e-prop per step, naively: D-RTRL's current traces `ε_t` from `eqtrace.d_rtrl_step`, filtered
    in a Python loop (`ē_t = κ ē_{t-1} + ε_t`), times `δ_t = ∂L_t/∂h_t` from `jax.grad` of the model's
    own readout (with `B` in place of its weight for random feedback); the readout's exact gradient."""
    traces = eqtrace.d_rtrl_init(graph, model, state)
    pairs = [
        (rel, g)
        for rel in graph.hidden_param_op_relations
        if rel.position_diagonal
        for g in rel.hidden_groups
    ]
    (group,) = graph.hidden_groups
    filtered = None
    out = []
    for x, target in zip(xs, targets, strict=True):
        traces, y, _, _ = eqtrace.d_rtrl_step(graph, model, traces, x, target, mse)
        new = traces.state
        eps = list(traces.eps)
        filtered = (
            eps if (filtered is None or kappa is None) else [kappa * f + e for f, e in zip(filtered, eps)]
        )
        if feedback_matrix is None:
            delta_tree = jax.grad(lambda s: mse(model.out(model.layer.spike(s["layer"])), target))(new)
        else:
            g_y = jax.grad(mse)(y, target)
            readout = eqx.tree_at(lambda o: o.weight, model.out, feedback_matrix)
            delta_tree = jax.grad(lambda s: jnp.vdot(g_y, readout(model.layer.spike(s["layer"]))))(new)
        delta = _group_stack(delta_tree, group)
        grads = {}
        for (rel, g), e in zip(pairs, filtered):
            assert g is group
            sig = jnp.expand_dims(delta, rel.input_axes)
            grads[rel.weight_path] = jnp.sum(sig * e, axis=-1)
        spikes = model.layer.spike(new["layer"])
        readout_grad = jax.grad(lambda o: mse(o(spikes), target))(model.out)
        grads[("out", "weight")] = readout_grad.weight
        grads[("out", "bias")] = readout_grad.bias
        out.append(grads)
    return out


@pytest.mark.parametrize("kappa", [None, 0.8], ids=["unfiltered", "filtered"])
@pytest.mark.parametrize("feedback", ["symmetric", "random"])
def test_eprop_equals_brute_force_reference_recurrent_alif(feedback, kappa):
    model = _recurrent("alif")
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    T = 6
    xs, targets = _inputs(3, 2, T, jax.random.key(6))
    rule = eqtrace.EProp(feedback=feedback, kappa=kappa, seed=3)
    traces = rule.init(graph, model, state)
    if feedback == "random":
        assert traces.feedback.shape == model.out.weight.shape
        assert float(jnp.max(jnp.abs(traces.feedback - model.out.weight))) > 1e-2
    reference = _reference_grads(graph, model, traces.feedback, kappa, state, xs, targets)
    step = eqx.filter_jit(rule.step)
    paths = graph.module_info.weight_paths
    for t in range(T):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        flat = dict(zip(paths, jax.tree.leaves(grads), strict=True))
        assert set(flat) == set(reference[t]), "every leaf has a reference"
        assert_tree_allclose(flat, reference[t])
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_random_feedback_changes_the_recurrent_gradients_not_the_readouts():
    model = _recurrent("lif")
    state = model.init_state()
    xs, targets = _inputs(3, 2, 8, jax.random.key(6))
    sym, _ = eqtrace.online_grad(model, state, xs, targets, mse, algorithm=eqtrace.EProp())
    rnd, _ = eqtrace.online_grad(model, state, xs, targets, mse, algorithm=eqtrace.EProp(feedback="random"))
    assert_tree_allclose(rnd.out, sym.out)
    # `W` reads the input and the previous spikes (`[x_t, z_{t-1}] W`); `tau` is the neurons' leak.
    for a, b in [(rnd.layer.W.weight, sym.layer.W.weight), (rnd.layer.neuron.tau, sym.layer.neuron.tau)]:
        assert float(jnp.max(jnp.abs(a - b))) > 1e-6
    other, _ = eqtrace.online_grad(
        model, state, xs, targets, mse, algorithm=eqtrace.EProp(feedback="random", seed=1)
    )
    assert float(jnp.max(jnp.abs(other.layer.W.weight - rnd.layer.W.weight))) > 1e-6


def test_drivers_sum_the_steps_under_filter_jit():
    model = _recurrent("alif")
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    B, T = 3, 5
    keys = jax.random.split(jax.random.key(9), B)
    xs, targets = jax.vmap(lambda k: _inputs(3, 2, T, k))(keys)
    rule = eqtrace.EProp(feedback="random", kappa=0.7)

    def steps(xs, targets):
        traces = rule.init(graph, model, state)
        for x, target in zip(xs, targets):
            traces, _, _, g = rule.step(graph, model, traces, x, target, mse)
            yield g

    check_drivers_sum_steps(rule, model, state, xs, targets, mse, steps)


def test_bad_options_and_models_are_refused():
    with pytest.raises(ValueError, match="feedback"):
        eqtrace.EProp(feedback="transpose")
    with pytest.raises(ValueError, match="kappa"):
        eqtrace.EProp(kappa=1.5)
    # A leaky readout is a hidden state: no stateless readout weight for `B` to replace.
    model = _recurrent("lif", leaky_out=True)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), state)
    with pytest.raises(ValueError, match="readout"):
        eqtrace.EProp(feedback="random").init(graph, model, state)
    # Traces of one rule are refused by another's step.
    traces = eqtrace.EProp(kappa=0.5).init(graph, model, state)
    with pytest.raises(ValueError, match="options"):
        eqtrace.EProp().step(graph, model, traces, jnp.zeros(3), jnp.zeros(2), mse)
    # Filtered traces on a group that computes `h_t` from its new `c_t` within the step.
    lstm = StackedCells((enn.LSTMCell(3, 4, key=jax.random.key(0)),), enn.Linear(4, 2, key=jax.random.key(1)))
    lstm_graph = eqtrace.compile_etrace_graph(lstm, jnp.zeros(3), lstm.init_state())
    with pytest.raises(ValueError, match="kappa"):
        eqtrace.EProp(kappa=0.5).init(lstm_graph, lstm, lstm.init_state())


@pytest.mark.parametrize("feedback", ["symmetric", "random"])
def test_eprop_on_a_chained_group_counts_each_path_once(feedback):
    """An LSTM computes `h_t = o ⊙ tanh(c_t)` from its new `c_t` within the step, so `δ_c` already
    holds the path through `h_t`: paired with the traces, it must go back through the blocks that hold
    `h_t` fixed. Oracle, per step: D-RTRL's traces `ε_t` (total `∂h_t/∂W`) times `∂L_t/∂(h_t, c_t)`
    by `jax.grad` of the readout (which reads `h_t` only), the readout's exact gradient; and
    `DRTRL(window=0)`, the same sum on one layer with a stateless readout (symmetric feedback). With
    random feedback the oracle's signal is `jax.grad` of `⟨∂L_t/∂y, h_t B + b⟩`."""
    f64 = jnp.float64
    k = jax.random.split(jax.random.key(11), 3)
    model = StackedCells((enn.LSTMCell(3, 4, dtype=f64, key=k[0]),), enn.Linear(4, 2, dtype=f64, key=k[1]))
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3, f64), state)
    assert graph.hidden_perturb.chained
    (group,) = graph.hidden_groups
    T = 4
    xs = jax.random.normal(k[2], (T, 3), f64)
    targets = jnp.sin(jnp.arange(T * 2, dtype=f64)).reshape(T, 2)
    pairs = [
        (rel, g)
        for rel in graph.hidden_param_op_relations
        if rel.position_diagonal
        for g in rel.hidden_groups
    ]
    rule, drtrl = eqtrace.EProp(feedback=feedback, seed=2), eqtrace.DRTRL(window=0)
    tr, d_tr, ref_tr = rule.init(graph, model, state), drtrl.init(graph, model, state), None
    ref_tr = eqtrace.d_rtrl_init(graph, model, state)
    paths = graph.module_info.weight_paths
    for t in range(T):
        tr, _, _, grads = rule.step(graph, model, tr, xs[t], targets[t], mse)
        d_tr, _, _, grads_d = drtrl.step(graph, model, d_tr, xs[t], targets[t], mse)
        ref_tr, _, _, _ = eqtrace.d_rtrl_step(graph, model, ref_tr, xs[t], targets[t], mse)
        new = ref_tr.state
        if feedback == "symmetric":
            delta_tree = jax.grad(lambda s: mse(model.out(s[0].h), targets[t]))(new)
        else:
            g_y = jax.grad(mse)(model.out(new[0].h), targets[t])
            readout_b = eqx.tree_at(lambda o: o.weight, model.out, tr.feedback)
            delta_tree = jax.grad(lambda s: jnp.vdot(g_y, readout_b(s[0].h)))(new)
        delta = _group_stack(delta_tree, group)
        reference = {}
        for (rel, _), e in zip(pairs, ref_tr.eps, strict=True):
            reference[rel.weight_path] = jnp.sum(jnp.expand_dims(delta, rel.input_axes) * e, axis=-1)
        readout = jax.grad(lambda o: mse(o(new[0].h), targets[t]))(model.out)
        reference[("out", "weight")], reference[("out", "bias")] = readout.weight, readout.bias
        flat = dict(zip(paths, jax.tree.leaves(grads), strict=True))
        assert set(flat) == set(reference)
        assert_tree_allclose(flat, reference, rtol=1e-9, atol=1e-12)
        if feedback == "symmetric":
            assert_tree_allclose(grads, grads_d, rtol=1e-9, atol=1e-12)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
