"""Freezing weights with a `filter_spec`, as for `eqx.partition`: frozen leaves get no trace and a
`None` gradient, and the trainable leaves get the gradients they get without freezing."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
import pytest

import eqtrace

from .helpers import assert_tree_allclose


class GRUModel(eqx.Module):
    rnn: eqtrace.nn.GRUCell
    out: eqtrace.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.rnn = eqtrace.nn.GRUCell(3, 4, dtype=jnp.float64, key=k1)
        self.out = eqtrace.nn.Linear(4, 2, dtype=jnp.float64, key=k2)

    def __call__(self, x, state):
        state = self.rnn(x, state)
        return self.out(state.h), state

    def init_state(self):
        return self.rnn.init_state()


def loss_fn(y, target):
    return jnp.sum((y - target) ** 2)


def _setup(T=5):
    model = GRUModel(key=jax.random.key(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(k1, (T, 3), jnp.float64)
    targets = jax.random.normal(k2, (T, 2), jnp.float64)
    # Freeze the gate weights (not their biases) and the readout's bias.
    filter_spec = jtu.tree_map(eqx.is_inexact_array, model)
    filter_spec = eqx.tree_at(
        lambda m: (m.rnn.Wz.weight, m.rnn.Wr.weight, m.rnn.Wh.weight, m.out.bias),
        filter_spec,
        replace=(False, False, False, False),
    )
    return model, model.init_state(), xs, targets, filter_spec


FROZEN = [("rnn", "Wz", "weight"), ("rnn", "Wr", "weight"), ("rnn", "Wh", "weight"), ("out", "bias")]


def _frozen_is_none(grads, model):
    """`grads` has `None` exactly at the frozen leaves (and at no trainable one)."""
    for path in FROZEN:
        assert _get(grads, path) is None, path
    trainable = eqx.filter(model, eqx.is_inexact_array)
    assert len(jtu.tree_leaves(grads)) == len(jtu.tree_leaves(trainable)) - len(FROZEN)


def _restrict(grads, frozen_grads):
    """`grads` with `None` where `frozen_grads` has `None`."""
    return jtu.tree_map(
        lambda f, g: None if f is None else g, frozen_grads, grads, is_leaf=lambda x: x is None
    )


@pytest.mark.parametrize(
    "algorithm",
    [eqtrace.DRTRL(window=2), eqtrace.ESDRTRL(decay=0.7), eqtrace.SnAp1()],
    ids=lambda a: repr(a),
)
def test_trainable_gradients_equal_unfrozen(algorithm):
    model, state, xs, targets, filter_spec = _setup()
    full, full_losses = eqtrace.online_grad(model, state, xs, targets, loss_fn, algorithm)
    frozen, losses = eqtrace.online_grad(
        model, state, xs, targets, loss_fn, algorithm, filter_spec=filter_spec
    )
    _frozen_is_none(frozen, model)
    assert_tree_allclose(frozen, _restrict(full, frozen))
    assert_tree_allclose(losses, full_losses)


def test_rtrl_frozen_equals_bptt_frozen():
    # RTRL is exact: with leaves frozen, it equals BPTT's gradient of the trainable part (the
    # gradient `eqx.filter_grad` gives over `eqx.partition(model, filter_spec)`).
    model, state, xs, targets, filter_spec = _setup()
    online, _ = eqtrace.online_grad(
        model, state, xs, targets, loss_fn, eqtrace.RTRL(), filter_spec=filter_spec
    )
    diff, static = eqx.partition(model, filter_spec)

    @eqx.filter_grad
    def reference(diff, static):
        m = eqx.combine(diff, static)

        def body(s, xt):
            y, s = m(xt[0], s)
            return s, loss_fn(y, xt[1])

        return jnp.sum(jax.lax.scan(body, state, (xs, targets))[1])

    assert_tree_allclose(online, reference(diff, static), rtol=1e-9, atol=1e-12)
    bptt, _ = eqtrace.bptt_grad(model, state, xs, targets, loss_fn, filter_spec=filter_spec)
    _frozen_is_none(bptt, model)
    assert_tree_allclose(online, bptt, rtol=1e-9, atol=1e-12)


def test_frozen_leaves_have_no_traces_per_step():
    model, state, xs, targets, filter_spec = _setup(T=3)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    frozen_graph = eqtrace.compile_etrace_graph(model, xs[0], state, filter_spec=filter_spec)
    assert frozen_graph.frozen_weights == tuple(FROZEN)
    rel_paths = {r.weight_path for r in frozen_graph.hidden_param_op_relations}
    assert not rel_paths & set(FROZEN)
    # The reset gate reaches `h` through the candidate's matmul only: in no relation, but listed.
    traced, reset = {FROZEN[0], FROZEN[2]}, FROZEN[1]
    assert {r.weight_path for r in graph.hidden_param_op_relations} - rel_paths == traced
    assert reset in {w.weight_path for w in graph.excluded_weights}
    assert reset not in {w.weight_path for w in frozen_graph.excluded_weights}
    assert "Frozen weights" in str(frozen_graph)

    traces = eqtrace.d_rtrl_init(graph, model, state)
    frozen_traces = eqtrace.d_rtrl_init(frozen_graph, model, state)
    size = lambda t: sum(a.size for a in jtu.tree_leaves(t.eps))  # noqa: E731
    # The two traced (7, 4) gate weights, one state each, are no longer traced.
    assert size(traces) - size(frozen_traces) == 2 * 7 * 4
    for x, target in zip(xs, targets):
        traces, y, loss, grads = eqtrace.d_rtrl_step(graph, model, traces, x, target, loss_fn)
        frozen_traces, y2, loss2, frozen_grads = eqtrace.d_rtrl_step(
            frozen_graph, model, frozen_traces, x, target, loss_fn
        )
        _frozen_is_none(frozen_grads, model)
        assert_tree_allclose(frozen_grads, _restrict(grads, frozen_grads))
        assert_tree_allclose((y2, loss2), (y, loss))

    # ES-D-RTRL keeps input and output traces per traced operation (the `Wz` and `Wh` matmuls):
    # with their weights frozen, their biases keep them; with both frozen, they go.
    es = eqtrace.es_d_rtrl_init(graph, model, state)
    es_frozen = eqtrace.es_d_rtrl_init(frozen_graph, model, state)
    assert len(es_frozen.f_bar) == len(es.f_bar) and len(es_frozen.x_bar) == len(es.x_bar)
    readout_spec = eqx.tree_at(
        lambda m: (m.rnn.Wz.bias, m.rnn.Wr.bias, m.rnn.Wh.bias),
        filter_spec,
        replace=(False, False, False),
    )
    readout_only = eqtrace.compile_etrace_graph(model, xs[0], state, filter_spec=readout_spec)
    es_none = eqtrace.es_d_rtrl_init(readout_only, model, state)
    assert len(es.x_bar) == len(es.f_bar) == 2
    assert es_none.x_bar == () and es_none.f_bar == ()


def test_batch_grad_and_check_gradient():
    model, state, xs, targets, filter_spec = _setup(T=4)
    batch = 3
    xs_b = jnp.stack([xs, 2 * xs, -xs])
    targets_b = jnp.stack([targets] * batch)
    states = jtu.tree_map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), state)
    algorithm = eqtrace.ESDRTRL()  # batch-native: the whole batch at each step
    full, _ = eqtrace.batch_grad(
        eqtrace.online_grad, model, states, xs_b, targets_b, loss_fn, algorithm=algorithm
    )
    frozen, _ = eqtrace.batch_grad(
        eqtrace.online_grad,
        model,
        states,
        xs_b,
        targets_b,
        loss_fn,
        algorithm=algorithm,
        filter_spec=filter_spec,
    )
    _frozen_is_none(frozen, model)
    assert_tree_allclose(frozen, _restrict(full, frozen))
    bptt, _ = eqtrace.batch_grad(
        eqtrace.bptt_grad, model, states, xs_b, targets_b, loss_fn, filter_spec=filter_spec
    )
    _frozen_is_none(bptt, model)

    rtrl = eqtrace.check_gradient(
        model, state, xs, targets, loss_fn, eqtrace.RTRL(), verbose=False, filter_spec=filter_spec
    )
    assert {r.path for r in rtrl.rows}.isdisjoint(FROZEN)
    assert len(rtrl.rows) == len(jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))) - len(FROZEN)
    assert rtrl.max_relative_error < 1e-9


def test_filter_jit_and_optax():
    model, state, xs, targets, filter_spec = _setup()
    optim = optax.adam(1e-2)
    params = eqx.filter(model, filter_spec)
    opt_state = optim.init(params)

    def train_step(model, opt_state):
        grads, losses = eqtrace.online_grad(model, state, xs, targets, loss_fn, filter_spec=filter_spec)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, filter_spec))
        return eqx.apply_updates(model, updates), opt_state, jnp.sum(losses)

    jitted = eqx.filter_jit(train_step)
    m_eager, s_eager, loss0 = train_step(model, opt_state)
    m_jit, s_jit = model, opt_state
    for _ in range(3):
        m_jit, s_jit, loss = jitted(m_jit, s_jit)
    assert float(loss) < float(loss0)
    # Frozen leaves are untouched; trainable ones moved; one jitted step equals the eager one.
    for path in FROZEN:
        assert jnp.array_equal(_get(m_jit, path), _get(model, path)), path
    assert not jnp.array_equal(m_jit.out.weight, model.out.weight)
    assert not jnp.array_equal(m_jit.rnn.Wz.bias, model.rnn.Wz.bias)
    assert_tree_allclose(
        eqx.filter(jitted(model, opt_state)[0], eqx.is_array), eqx.filter(m_eager, eqx.is_array)
    )


def _get(tree, path):
    for k in path:
        tree = getattr(tree, k)
    return tree


def test_clear_errors():
    model, state, xs, targets, filter_spec = _setup()
    graph = eqtrace.compile_etrace_graph(model, xs[0], state, filter_spec=filter_spec)
    diff, _ = eqx.partition(model, filter_spec)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    with pytest.raises(ValueError, match=r"`params` has no array at .*trainable part of `eqx.partition"):
        eqtrace.d_rtrl_step(graph, diff, traces, xs[0], targets[0], loss_fn)
    with pytest.raises(ValueError, match="`filter_spec` freezes the leaves"):
        eqtrace.online_grad(model, state, xs, targets, loss_fn, graph=graph, filter_spec=eqx.is_inexact_array)
    with pytest.raises(ValueError, match="`filter_spec` must be a callable or a pytree of bools"):
        eqtrace.online_grad(model, state, xs, targets, loss_fn, filter_spec=[True, False])
    # Traces made for the unfrozen graph do not fit the frozen one.
    unfrozen = eqtrace.d_rtrl_init(eqtrace.compile_etrace_graph(model, xs[0], state), model, state)
    with pytest.raises(TypeError, match="made for another graph"):
        eqtrace.d_rtrl_step(graph, model, unfrozen, xs[0], targets[0], loss_fn)
