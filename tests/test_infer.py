"""Untagged `eqx.nn` models: the compiler infers their ETP operations, and they train online."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn
from eqtrace._compiler import run_step

from .brute_force import d_rtrl_reference_step, es_d_rtrl_reference_step
from .helpers import assert_tree_allclose


def mse(y, t):
    return jnp.sum((y - t) ** 2)


class Net(eqx.Module):
    """`encoder → cell → readout`, for any cell `cell(x, state) -> state` (`eqx.nn` or `eqtrace.nn`)."""

    encoder: eqx.Module
    cell: eqx.Module
    readout: eqx.Module

    def __call__(self, x, state):
        state = self.cell(self.encoder(x), state)
        h = state[0] if isinstance(state, tuple) else getattr(state, "h", state)
        return self.readout(h), state

    def init_state(self):
        if hasattr(self.cell, "init_state"):
            return self.cell.init_state()
        z = jnp.zeros(self.cell.hidden_size)
        return (z, z) if isinstance(self.cell, eqx.nn.LSTMCell) else z


class Decay(eqx.Module):
    """`h ← a ⊙ h + Linear(x)`, `y = Linear(h)`; tagged or not."""

    w_in: jax.Array
    a: jax.Array
    w_out: jax.Array
    tagged: bool = eqx.field(static=True)

    def __call__(self, x, h):
        if self.tagged:
            h = eqtrace.element_wise(self.a) * h + eqtrace.matmul(x, self.w_in)
            return eqtrace.matmul(jnp.tanh(h), self.w_out), h
        return jnp.tanh(self.a * h + x @ self.w_in) @ self.w_out, self.a * h + x @ self.w_in

    def init_state(self):
        return jnp.zeros(self.a.shape)


class LinearDecay(eqx.Module):
    """Untagged `eqx.nn.Linear` layers around an untagged `a * h` recurrence."""

    encoder: eqx.nn.Linear
    a: jax.Array
    readout: eqx.nn.Linear

    def __call__(self, x, h):
        h = self.a * h + self.encoder(x)
        return self.readout(jnp.tanh(h)), h

    def init_state(self):
        return jnp.zeros(self.a.shape)


def _cosine(a, b) -> float:
    a, b = (jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)]) for t in (a, b))
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _sequence(key, n_in, n_out=1, steps=6):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (steps, n_in)), jax.random.normal(ky, (steps, n_out))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_unmodified_eqx_cells_train_online_as_well_as_their_eqtrace_equivalents(kind):
    """An `eqx.nn.MLP` encoder, an `eqx.nn` cell and an `eqx.nn.Linear` readout, untouched, train
    online: every leaf gets a gradient, as close to BPTT as the `eqtrace.nn` cell's (the two GRUs
    differ in where the reset gate applies: fidelity is compared, not weights)."""
    k = jax.random.split(jax.random.key(0), 4)
    cells = {"gru": (eqx.nn.GRUCell, enn.GRUCell), "lstm": (eqx.nn.LSTMCell, enn.LSTMCell)}[kind]
    xs, targets = _sequence(k[3], 3)
    fidelity = {}
    for cell in cells:
        model = Net(eqx.nn.MLP(3, 4, 5, 1, key=k[0]), cell(4, 4, key=k[1]), eqx.nn.Linear(4, 1, key=k[2]))
        bptt = eqtrace.bptt_grad(model, model.init_state(), xs, targets, mse)[0]
        graph = eqtrace.compile_etrace_graph(model, xs[0])
        if cell is cells[0]:  # the `eqx.nn` model: every relation is inferred
            assert all(r.inferred for r in graph.hidden_param_op_relations)
        for algorithm in ("d_rtrl", "es_d_rtrl"):
            grads, _ = eqtrace.online_grad(
                model, model.init_state(), xs, targets, mse, algorithm, graph=graph
            )
            for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
                assert float(jnp.max(jnp.abs(g))) > 1e-6, (cell, algorithm, jax.tree_util.keystr(path))
            fidelity[cell, algorithm] = _cosine(grads, bptt)
    for algorithm in ("d_rtrl", "es_d_rtrl"):
        ours, theirs = fidelity[cells[0], algorithm], fidelity[cells[1], algorithm]
        assert ours > 0.95 and ours > theirs - 0.01, (algorithm, ours, theirs)


class TaggedConv(eqx.Module):
    conv: eqx.nn.Conv1d

    def __call__(self, x):
        return jnp.ravel(eqtrace.conv(x, self.conv.weight, padding="VALID") + self.conv.bias)


def test_unmodified_conv_front_end_trains_online_as_a_tagged_one():
    """An `eqx.nn.Conv1d` kernel is inferred as `eqtrace.conv`'s: the same graph and gradients as
    with the kernel tagged, and every leaf gets a gradient."""
    k = jax.random.split(jax.random.key(7), 4)
    conv = eqx.nn.Conv1d(1, 2, 3, key=k[0])
    cell, readout = eqx.nn.GRUCell(8, 3, key=k[1]), eqx.nn.Linear(3, 1, key=k[2])
    inferred = Net(eqx.nn.Sequential([conv, eqx.nn.Lambda(jnp.ravel)]), cell, readout)
    tagged = Net(TaggedConv(conv), cell, readout)
    xs = jax.random.normal(k[3], (6, 1, 6))
    targets = jnp.sin(jnp.cumsum(xs[:, 0, :1], axis=0))
    graphs = [eqtrace.compile_etrace_graph(m, xs[0]) for m in (inferred, tagged)]
    reasons = [
        {w.weight_path[-1]: w.reason for w in g.excluded_weights if w.weight_path[0] == "encoder"}
        for g in graphs
    ]
    assert reasons[0] == reasons[1] == {"weight": "via_other_etp_op", "bias": "no_etp_op"}
    grads = [
        eqtrace.online_grad(m, m.init_state(), xs, targets, mse, "es_d_rtrl", graph=g)[0]
        for m, g in zip((inferred, tagged), graphs)
    ]
    for path, g in jax.tree_util.tree_flatten_with_path(grads[0])[0]:
        assert float(jnp.max(jnp.abs(g))) > 1e-6, jax.tree_util.keystr(path)
    assert_tree_allclose(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), rtol=1e-12, atol=1e-12)


def test_linear_layers_around_untagged_decay_are_exact_per_step():
    """D-RTRL is exact on one position-wise group with an element-wise tail: so it is on the
    untagged model, step by step (each step's gradient against BPTT's increment)."""
    k = jax.random.split(jax.random.key(1), 4)
    model = LinearDecay(
        eqx.nn.Linear(3, 4, key=k[0]),
        jax.random.uniform(k[1], (4,), minval=0.3, maxval=0.9),
        eqx.nn.Linear(4, 2, key=k[2]),
    )
    xs, targets = _sequence(k[3], 3, 2, steps=4)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    assert {r.weight_path for r in graph.hidden_param_op_relations} == {
        ("encoder", "weight"),
        ("encoder", "bias"),
        ("a",),
    }
    assert all(r.inferred and r.position_diagonal for r in graph.hidden_param_op_relations)
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    previous = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
    for t in range(len(xs)):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        total = eqtrace.bptt_grad(model, state, xs[: t + 1], targets[: t + 1], mse)[0]
        assert_tree_allclose(grads, jax.tree.map(jnp.subtract, total, previous))
        previous = total


class StoppedDecay(eqx.Module):
    """`h ← a ⊙ h + sg(a) ⊙ (x @ w_in) + sg(b)`, untagged (`sg`: `stop_gradient`)."""

    w_in: jax.Array
    a: jax.Array
    b: jax.Array

    def __call__(self, x, h):
        sg = jax.lax.stop_gradient
        h = self.a * h + sg(self.a) * (x @ self.w_in) + sg(self.b)
        return jnp.tanh(h)[:2], h


def test_nothing_is_inferred_through_stop_gradient():
    """A weight reached only through `stop_gradient` is excluded and keeps no trace; a weight also
    used directly is traced for that use only. D-RTRL stays exact per step against BPTT."""
    k = jax.random.split(jax.random.key(4), 4)
    model = StoppedDecay(
        jax.random.normal(k[0], (3, 4)), jax.random.uniform(k[1], (4,), minval=0.3, maxval=0.9), jnp.ones(4)
    )
    xs, targets = _sequence(k[3], 3, 2, steps=4)
    state = jnp.zeros(4)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    assert sorted(r.weight_path for r in graph.hidden_param_op_relations) == [("a",), ("w_in",)]
    [b] = [e for e in graph.excluded_weights if e.weight_path == ("b",)]
    assert b.reason == "stop_gradient" and "stop_gradient" in b.detail
    step = eqx.filter_jit(eqtrace.d_rtrl_step)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    assert len(traces.eps) == 2
    previous = jax.tree.map(jnp.zeros_like, model)
    for t in range(len(xs)):
        traces, _, _, grads = step(graph, model, traces, xs[t], targets[t], mse)
        total = eqtrace.bptt_grad(model, state, xs[: t + 1], targets[: t + 1], mse)[0]
        assert_tree_allclose(grads, jax.tree.map(jnp.subtract, total, previous))
        previous = total
    assert not bool(jnp.any(grads.b)) and bool(jnp.all(grads.a[:2] != 0))  # read: `h[:2]`


def _decay_pair():
    k = jax.random.split(jax.random.key(2), 3)
    w_in, a, w_out = (
        jax.random.normal(k[0], (3, 4)),
        jax.random.uniform(k[1], (4,)),
        jax.random.normal(k[2], (4, 2)),
    )
    return Decay(w_in, a, w_out, tagged=True), Decay(w_in, a, w_out, tagged=False)


def _relation_fields(graph):
    return [
        (
            r.weight_path,
            r.primitive,
            tuple(g.hidden_paths for g in r.hidden_groups),
            r.operand_index,
            r.y_shape,
            r.position_diagonal,
            r.input_axes,
            r.position_pad,
        )
        for r in graph.hidden_param_op_relations
    ]


def test_inferred_and_tagged_models_give_the_same_graph_and_gradients():
    tagged, untagged = _decay_pair()
    xs, targets = _sequence(jax.random.key(3), 3, 2, steps=6)
    g_tagged = eqtrace.compile_etrace_graph(tagged, xs[0])
    g_untagged = eqtrace.compile_etrace_graph(untagged, xs[0])
    assert _relation_fields(g_tagged) == _relation_fields(g_untagged)
    assert [(w.weight_path, w.reason) for w in g_tagged.excluded_weights] == [
        (w.weight_path, w.reason) for w in g_untagged.excluded_weights
    ]
    assert not any(r.inferred for r in g_tagged.hidden_param_op_relations)
    assert all(r.inferred for r in g_untagged.hidden_param_op_relations)
    for algorithm in ("d_rtrl", "es_d_rtrl"):
        got = eqtrace.online_grad(untagged, untagged.init_state(), xs, targets, mse, algorithm)[0]
        want = eqtrace.online_grad(tagged, tagged.init_state(), xs, targets, mse, algorithm)[0]
        assert_tree_allclose(jax.tree.leaves(got), jax.tree.leaves(want), rtol=1e-12, atol=1e-12)


def test_inference_off_keeps_only_tagged_operations():
    tagged, untagged = _decay_pair()
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="no ETP operation .and `infer_etp_ops=False`"):
        eqtrace.compile_etrace_graph(untagged, x, infer_etp_ops=False)
    on = eqtrace.compile_etrace_graph(tagged, x)
    off = eqtrace.compile_etrace_graph(tagged, x, infer_etp_ops=False)
    assert _relation_fields(on) == _relation_fields(off)

    class Mixed(eqx.Module):  # a tagged recurrence behind an untagged input layer
        encoder: eqx.nn.Linear
        a: jax.Array

        def __call__(self, x, h):
            h = eqtrace.element_wise(self.a) * h + self.encoder(x)
            return h, h

    model = Mixed(eqx.nn.Linear(3, 4, key=jax.random.key(4)), jnp.full((4,), 0.5))
    h0 = jnp.zeros(4)
    off = eqtrace.compile_etrace_graph(model, x, h0, infer_etp_ops=False)
    assert [r.weight_path for r in off.hidden_param_op_relations] == [("a",)]
    assert {w.weight_path: w.reason for w in off.excluded_weights} == {
        ("encoder", "weight"): "no_etp_op",
        ("encoder", "bias"): "no_etp_op",
    }
    on = eqtrace.compile_etrace_graph(model, x, h0)
    assert {r.weight_path: r.inferred for r in on.hidden_param_op_relations} == {
        ("a",): False,
        ("encoder", "weight"): True,
        ("encoder", "bias"): True,
    }
    assert "(inferred)" in str(on) and "(inferred)" not in str(off)
    assert '{{"etp_inferred_linear (inferred)"}}' in on.to_mermaid()
    assert 'label="etp_inferred_linear (inferred)"' in on.to_dot()


def test_nothing_to_infer_is_an_error():
    class Summed(eqx.Module):  # its weight reaches the state only through a sum: nothing to trace
        w: jax.Array

        def __call__(self, x, h):
            h = jnp.tanh(h) * jnp.sum(self.w)
            return h, h

    with pytest.raises(ValueError, match="no ETP operation and none could be inferred"):
        eqtrace.compile_etrace_graph(Summed(jnp.ones(3)), jnp.zeros(3), jnp.zeros(2))


def _small_gru():
    k = jax.random.split(jax.random.key(5), 3)
    model = Net(eqx.nn.Identity(), eqx.nn.GRUCell(2, 2, key=k[0]), eqx.nn.Linear(2, 1, key=k[1]))
    return model, _sequence(k[2], 2, steps=2)


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
def test_inferred_gru_equals_brute_force_reference_per_step(algorithm):
    """The fused gates of `eqx.nn.GRUCell`, computed part by part, against the same approximation
    from full Jacobians."""
    model, (xs, targets) = _small_gru()
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    parts = [r for r in graph.hidden_param_op_relations if r.weight_path == ("cell", "weight_ih")]
    assert [r.position_pad for r in parts] == [((0, 4), (0, 0)), ((2, 2), (0, 0)), ((4, 0), (0, 0))]
    if algorithm == "d_rtrl":
        step = eqx.filter_jit(eqtrace.d_rtrl_step)
        traces = eqtrace.d_rtrl_init(graph, model, state)
        # Each gate's trace holds its own rows of the fused weights only (2 of 6), not the whole.
        assert {e.shape[0] for e in traces.eps} == {2}
        memory, reference = {}, d_rtrl_reference_step
    else:
        step = eqx.filter_jit(eqtrace.es_d_rtrl_step)
        traces = eqtrace.es_d_rtrl_init(graph, model, state, decay=0.7)
        memory, reference = {"x": {}, "f": {}}, functools.partial(es_d_rtrl_reference_step, decay=0.7)
    ref_state = state
    for x, target in zip(xs, targets):
        traces, _, _, grads = step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = reference(graph, model, ref_state, x, target, mse, memory)
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
        assert_tree_allclose(traces.state, ref_state)


def test_inferred_step_has_the_models_values_and_derivatives():
    """The rewritten step (part-by-part products, tagged leaves) computes what the model computes,
    with the same JVP and VJP, batched or not."""
    model, (xs, _) = _small_gru()
    h = jax.random.normal(jax.random.key(6), (2,))
    graph = eqtrace.compile_etrace_graph(model, xs[0], h)

    def ours(m, x, h):
        return run_step(graph, m, x, h)

    def theirs(m, x, h):
        return m(x, h)

    assert_tree_allclose(ours(model, xs[0], h), theirs(model, xs[0], h))
    tangents = jax.tree.map(jnp.ones_like, (eqx.filter(model, eqx.is_array), xs[0], h))
    jvp = [eqx.filter_jvp(f, (model, xs[0], h), tangents)[1] for f in (ours, theirs)]
    assert_tree_allclose(*jvp)
    vjp = [eqx.filter_vjp(f, model, xs[0], h)[1](theirs(model, xs[0], h)) for f in (ours, theirs)]
    assert_tree_allclose(*jax.tree.map(lambda t: jax.tree.leaves(eqx.filter(t, eqx.is_array)), vjp))
    batched = [jax.vmap(f, in_axes=(None, 0, None))(model, xs, h) for f in (ours, theirs)]
    assert_tree_allclose(*batched)
