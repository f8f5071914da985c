"""The drivers' contract: pure, `vmap`-able, a static graph, memory flat in the sequence length."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
from eqtrace._algorithms._d_rtrl import instant_trace
from eqtrace._ops import etp_op_of

from .helpers import assert_tree_allclose
from .models import SingleLayerRNN, TwoLayerGRU


def mse(y, t):
    return jnp.sum((y - t) ** 2)


def _data(T, key, n_in=3, n_out=2, batch=None):
    lead = (T,) if batch is None else (batch, T)
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, lead + (n_in,)), jax.random.normal(k2, lead + (n_out,))


def test_grads_have_the_structure_of_the_inexact_model():
    model = TwoLayerGRU(3, 4, 2, key=jax.random.key(0))
    xs, ts = _data(5, jax.random.key(1))
    for fn in (eqtrace.online_grad, eqtrace.bptt_grad):
        grads, losses = fn(model, model.init_state(), xs, ts, mse)
        assert jax.tree.structure(grads) == jax.tree.structure(eqx.filter(model, eqx.is_inexact_array))
        assert losses.shape == (5,)


class ScaledWeight(eqx.Module):
    """A relation (the bias) on an operation whose other weight operand is computed in the step."""

    w: jax.Array
    b: jax.Array
    out: eqtrace.nn.Linear

    def __call__(self, x, h):
        h = 0.6 * h + eqtrace.matmul(x, 2.0 * self.w, self.b)
        return self.out(jnp.tanh(h)), h

    def init_state(self):
        return jnp.zeros(4)


def _batch_models():
    from .models import AdaptiveNeurons
    from .test_d_rtrl import ConvLeaky

    k = jax.random.split(jax.random.key(2), 6)
    return {
        "rnn": (SingleLayerRNN(3, 4, 2, key=k[0]), (3,)),
        "element_wise": (
            AdaptiveNeurons(
                jax.random.normal(k[1], (3, 4)), jnp.linspace(2.0, 4.0, 4), jax.random.normal(k[2], (4, 2))
            ),
            (3,),
        ),
        "conv": (
            ConvLeaky(eqtrace.nn.Conv1d(2, 3, kernel_size=3, key=k[3]), eqtrace.nn.Linear(15, 2, key=k[4])),
            (2, 5),
        ),
        "computed_weight": (
            ScaledWeight(jax.random.normal(k[5], (3, 4)), jnp.ones(4), eqtrace.nn.Linear(4, 2, key=k[0])),
            (3,),
        ),
    }


@pytest.mark.parametrize(
    "algorithm", ["d_rtrl", "es_d_rtrl", eqtrace.ESDRTRL(decay=0.5, window=2), "bptt"], ids=str
)
@pytest.mark.parametrize("name", ["rnn", "element_wise", "conv", "computed_weight"])
def test_batch_grad_is_the_mean_of_single_sequences(name, algorithm):
    """The batched drivers (a whole batch per step; BPTT of the batch-mean loss) must equal the mean
    of single runs."""
    model, x_shape = _batch_models()[name]
    kx, kt = jax.random.split(jax.random.key(3))
    xs = jax.random.normal(kx, (3, 6) + x_shape)
    ts = jax.random.normal(kt, (3, 6, 2))
    states = jax.vmap(lambda _: model.init_state())(jnp.arange(3))
    if algorithm == "bptt":
        grad_fn, kwargs = eqtrace.bptt_grad, {}
    else:
        grad_fn, kwargs = eqtrace.online_grad, {"algorithm": algorithm}
    grads, losses = eqtrace.batch_grad(grad_fn, model, states, xs, ts, mse, **kwargs)
    singles = [grad_fn(model, model.init_state(), xs[b], ts[b], mse, **kwargs) for b in range(3)]
    mean = jax.tree.map(lambda *g: sum(g) / 3, *[g for g, _ in singles])
    assert_tree_allclose(grads, mean)
    assert_tree_allclose(losses, sum(l for _, l in singles) / 3)


def test_d_rtrl_step_with_a_static_graph_traces_once():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(4))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    count = []

    @eqx.filter_jit
    def step(graph, model, traces, x, t):
        count.append(None)
        return eqtrace.d_rtrl_step(graph, model, traces, x, t, mse)

    traces = eqtrace.d_rtrl_init(graph, model, model.init_state())
    xs, ts = _data(4, jax.random.key(5))
    for x, t in zip(xs, ts):
        traces, y, loss, grads = step(graph, model, traces, x, t)
    assert len(count) == 1
    assert jnp.isfinite(loss)


def test_online_grad_under_filter_jit_and_unknown_algorithm():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(6))
    xs, ts = _data(4, jax.random.key(7))
    g_jit, _ = eqx.filter_jit(eqtrace.online_grad)(model, model.init_state(), xs, ts, mse)
    g, _ = eqtrace.online_grad(model, model.init_state(), xs, ts, mse)
    assert_tree_allclose(g_jit, g)
    with pytest.raises(ValueError, match=r"`algorithm` must be a rule object .* or one of"):
        eqtrace.online_grad(model, model.init_state(), xs, ts, mse, algorithm="nope")


def test_loss_must_be_a_scalar():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(8))
    xs, ts = _data(2, jax.random.key(9))
    with pytest.raises(ValueError, match=r"`loss_fn\(y, target\)` must return a scalar"):
        eqtrace.online_grad(model, model.init_state(), xs, ts, lambda y, t: (y - t) ** 2)


def _temp_bytes(fn, model, T):
    xs, ts = _data(T, jax.random.key(10))
    compiled = jax.jit(lambda xs, ts: fn(model, model.init_state(), xs, ts, mse)).lower(xs, ts).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_online_memory_does_not_grow_with_sequence_length():
    model = SingleLayerRNN(3, 16, 2, key=jax.random.key(11))
    online = [_temp_bytes(eqtrace.online_grad, model, T) for T in (50, 500)]
    bptt = [_temp_bytes(eqtrace.bptt_grad, model, T) for T in (50, 500)]
    assert online[1] == online[0]
    assert bptt[1] > 5 * bptt[0]


@pytest.mark.parametrize(
    "make",
    [
        lambda k: (jax.random.normal(k, (3,)), jax.random.normal(k, (3, 4)), None, 1),
        lambda k: (jax.random.normal(k, (3,)), jax.random.normal(k, (3, 4)), jax.random.normal(k, (4,)), 2),
        lambda k: (None, jax.random.normal(k, (4,)), None, 0),
    ],
    ids=["matmul_weight", "matmul_bias", "element_wise"],
)
def test_trace_rule_agrees_with_the_jacobian_of_the_op(make):
    """The instantaneous trace term of a weight equals `∂y/∂W` (from `jax.jacfwd` of the op's
    implementation) contracted with `∂h/∂y`, and is position-diagonal."""
    x, w, b, j = make(jax.random.key(12))
    if x is None:
        prim, operands, params = eqtrace.etp_element_wise_p, [w], {"fn": jnp.sin}
    else:
        prim, operands, params = eqtrace.etp_matmul_p, [x, w] + ([b] if b is not None else []), {}
    op = etp_op_of(prim)
    d_f = jax.random.normal(jax.random.key(13), (4, 2))  # two states
    jac = jax.jacfwd(lambda wj: op.impl(*operands[:j], wj, *operands[j + 1 :], **params))(operands[j])
    expected = jnp.einsum("o...,os->...s", jac, d_f)
    assert_tree_allclose(instant_trace(prim, params, operands, j, d_f), expected)
    # Position-diagonal: the weight's trailing axis is the output position.
    off = jac * (1 - jnp.eye(4, dtype=jac.dtype)).reshape((4,) + (1,) * (jac.ndim - 2) + (4,))
    assert jnp.all(off == 0)


@pytest.mark.parametrize("front, kwargs", [(eqtrace.D_RTRL, {}), (eqtrace.pp_prop, {"decay": 0.3})])
def test_braintrace_style_front_learns_like_the_functions(front, kwargs):
    model = TwoLayerGRU(3, 4, 2, key=jax.random.key(14))
    xs, ts = _data(5, jax.random.key(15))
    algo = front(model, **kwargs).compile_graph(xs[0])
    name = "d_rtrl" if front is eqtrace.D_RTRL else "es_d_rtrl"
    grads, losses = algo.online_grad(model.init_state(), xs, ts, mse)
    ref, ref_losses = eqtrace.online_grad(model, model.init_state(), xs, ts, mse, algorithm=name, **kwargs)
    assert_tree_allclose(grads, ref)
    assert_tree_allclose(losses, ref_losses)
    traces = algo.init_traces(model.init_state())
    total = None
    for x, t in zip(xs, ts):
        traces, _, _, g = algo.step(traces, x, t, mse)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    assert_tree_allclose(total, ref)


def test_integer_state_and_weight_leaves_are_carried_untraced():
    """An integer step counter in the state and an integer leaf in the model: both pass through,
    are listed as untraced, and the float leaves still match BPTT where D-RTRL is exact."""

    class Counting(eqx.Module):
        w: jax.Array
        mask: jax.Array  # integer leaf: not trainable

        def __call__(self, x, state):
            h, n = state
            h = 0.7 * h + eqtrace.matmul(x, self.w) * self.mask.astype(h.dtype)
            return h, (h, n + 1)

        def init_state(self):
            return jnp.zeros(4), jnp.zeros((), jnp.int32)

    model = Counting(jax.random.normal(jax.random.key(16), (3, 4)), jnp.array([1, 0, 1, 1]))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    assert graph.untraced_hidden_paths == ((1,),)
    assert [g.hidden_paths for g in graph.hidden_groups] == [((0,),)]
    xs, ts = _data(5, jax.random.key(17), n_out=4)
    grads, _ = eqtrace.online_grad(model, model.init_state(), xs, ts, mse)
    ref, _ = eqtrace.bptt_grad(model, model.init_state(), xs, ts, mse)
    assert grads.mask is None and ref.mask is None
    assert_tree_allclose(grads, ref)


def test_bad_sequences_and_traces():
    model = TwoLayerGRU(3, 4, 2, key=jax.random.key(18))
    xs, ts = _data(5, jax.random.key(19))
    with pytest.raises(ValueError, match=r"`xs` and `targets` must share their leading \(time\) axis"):
        eqtrace.online_grad(model, model.init_state(), xs, ts[:4], mse)
    graph = eqtrace.compile_etrace_graph(model, xs[0], model.init_state())
    other = eqtrace.compile_etrace_graph(
        SingleLayerRNN(3, 4, 2, key=jax.random.key(20)),
        xs[0],
        {"rnn": eqtrace.nn.VanillaRNNState(h=jnp.zeros(4))},
    )
    wrong = eqtrace.d_rtrl_init(
        other,
        SingleLayerRNN(3, 4, 2, key=jax.random.key(20)),
        {"rnn": eqtrace.nn.VanillaRNNState(h=jnp.zeros(4))},
    )
    with pytest.raises(TypeError, match=r"`traces` must be the `DRTRLTraces`"):
        eqtrace.d_rtrl_step(graph, model, wrong, xs[0], ts[0], mse)
    # Traces of the other algorithm: a type error that names `traces` (raised by the annotation
    # check under the test suite's runtime type checking, or by the step itself without it).
    es = eqtrace.es_d_rtrl_init(graph, model, model.init_state())
    with pytest.raises(TypeError, match=r"`traces` must be the `DRTRLTraces`|parameter 'traces'"):
        eqtrace.d_rtrl_step(graph, model, es, xs[0], ts[0], mse)
    with pytest.raises(TypeError, match=r"`traces` must be the `ESDRTRLTraces`|parameter 'traces'"):
        eqtrace.es_d_rtrl_step(graph, model, wrong, xs[0], ts[0], mse)
    with pytest.raises(ValueError, match=r"`params` does not have the structure"):
        eqtrace.d_rtrl_init(graph, SingleLayerRNN(3, 4, 2, key=jax.random.key(20)), model.init_state())


def test_graphs_are_compiled_once_per_structure():
    from eqtrace._algorithms import _drivers

    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(21))
    first = _drivers.graph_for(model, jnp.zeros(3), model.init_state())
    again = _drivers.graph_for(
        SingleLayerRNN(3, 4, 2, key=jax.random.key(22)), jnp.ones(3), model.init_state()
    )
    other = _drivers.graph_for(
        SingleLayerRNN(3, 5, 2, key=jax.random.key(23)),
        jnp.zeros(3),
        {"rnn": eqtrace.nn.VanillaRNNState(h=jnp.zeros(5))},
    )
    assert again is first and other is not first
    assert len(_drivers._GRAPHS) <= _drivers._MAX_GRAPHS


def test_rule_objects_and_shorthand_strings_agree():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(30))
    xs, ts = _data(5, jax.random.key(31))
    state = model.init_state()
    for rule, name, options in [
        (eqtrace.DRTRL(window=2), "d_rtrl", {"window": 2}),
        (eqtrace.ESDRTRL(decay=0.5, normalise=False), "pp_prop", {"decay": 0.5, "normalise": False}),
    ]:
        g_rule, _ = eqx.filter_jit(eqtrace.online_grad)(model, state, xs, ts, mse, rule)
        g_name, _ = eqtrace.online_grad(model, state, xs, ts, mse, name, **options)
        assert_tree_allclose(g_rule, g_name)
    # The rule's own init and step are the pure functions of the same name.
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    rule = eqtrace.ESDRTRL(decay=0.3)
    traces = rule.init(graph, model, state)
    assert traces.decay == 0.3 and traces.window == 1
    _, _, _, g = rule.step(graph, model, traces, xs[0], ts[0], mse)
    _, _, _, g_fn = eqtrace.es_d_rtrl_step(graph, model, traces, xs[0], ts[0], mse)
    assert_tree_allclose(g, g_fn)


def test_bad_rules_and_options():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(32))
    xs, ts = _data(3, jax.random.key(33))
    with pytest.raises(ValueError, match="`window` must be an integer >= 0"):
        eqtrace.DRTRL(window=-1)
    with pytest.raises(ValueError, match=r"`decay` must be a number in \[0, 1\]"):
        eqtrace.ESDRTRL(decay=2.0)
    with pytest.raises(ValueError, match="set them as its fields"):
        eqtrace.online_grad(model, model.init_state(), xs, ts, mse, eqtrace.DRTRL(), window=2)
    with pytest.raises(TypeError, match=r"`d_rtrl` takes the options \['window'\], got unknown \['decay'\]"):
        eqtrace.online_grad(model, model.init_state(), xs, ts, mse, "d_rtrl", decay=0.5)
