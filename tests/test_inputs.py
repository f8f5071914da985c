"""Bad or unusual inputs: each is refused with an error that names the argument, or works and matches
BPTT."""

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace

from .helpers import assert_tree_allclose


def mse(y, t):
    return jnp.sum((y - t) ** 2)


class Leaky(eqx.Module):
    """`h ← 0.8 h + f(x W)`: one group with a diagonal recurrence and an element-wise tail, so
    D-RTRL is exact, and so is ES-D-RTRL for a constant input with decay 0."""

    w: jax.Array
    activation: Callable = eqx.field(static=True, default=jnp.tanh)

    def __call__(self, x, h):
        h = 0.8 * h + self.activation(eqtrace.matmul(x, self.w))
        return h[:2], h

    def init_state(self):
        return jnp.zeros(self.w.shape[1], self.w.dtype)


class OtherLeaky(eqx.Module):
    """`Leaky`'s fields and shapes, another step."""

    w: jax.Array
    activation: Callable = eqx.field(static=True, default=jnp.tanh)

    def __call__(self, x, h):
        h = 0.5 * h + self.activation(eqtrace.matmul(x, self.w))
        return h[:2], h

    def init_state(self):
        return jnp.zeros(self.w.shape[1], self.w.dtype)


class NoisyLeaky(eqx.Module):
    """`Leaky` with noise drawn each step from a PRNG key carried in the state."""

    w: jax.Array

    def __call__(self, x, state):
        h, key = state
        key, sub = jax.random.split(key)
        h = 0.8 * h + jnp.tanh(eqtrace.matmul(x, self.w)) + 0.5 * jax.random.normal(sub, h.shape, h.dtype)
        return h[:2], (h, key)

    def init_state(self):
        return jnp.zeros(self.w.shape[1], self.w.dtype), jax.random.key(0)


class Decaying(eqx.Module):
    """`h ← a ⊙ h + x W` with a decay per unit."""

    w: jax.Array
    a: jax.Array

    def __call__(self, x, h):
        h = self.a * h + eqtrace.matmul(x, self.w)
        return h[:2], h

    def init_state(self):
        return jnp.zeros_like(self.a)


k1, k2 = jax.random.split(jax.random.key(0))


def _leaky(n=4, key_scale=1.0, **kwargs):
    return Leaky(key_scale * jax.random.normal(k1, (3, n)), **kwargs)


def _constant_sequence(T, batch=None):
    lead = (T,) if batch is None else (batch, T)
    xs = jnp.broadcast_to(jax.random.normal(k2, (3,)), lead + (3,))
    return xs, jax.random.normal(jax.random.fold_in(k2, 1), lead + (2,))


def test_bptt_refuses_a_non_scalar_loss_as_online_grad_does():
    model = _leaky()
    xs, ts = _constant_sequence(4)
    for grad_fn in (eqtrace.bptt_grad, eqtrace.online_grad):
        with pytest.raises(ValueError, match=r"`loss_fn\(y, target\)` must return a scalar array"):
            grad_fn(model, model.init_state(), xs, ts, lambda y, t: (y - t) ** 2)


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
def test_an_empty_sequence_gives_zero_gradients_as_bptt(algorithm):
    model = _leaky()
    xs, ts = _constant_sequence(0)
    ref, ref_losses = eqtrace.bptt_grad(model, model.init_state(), xs, ts, mse)
    grads, losses = eqtrace.online_grad(model, model.init_state(), xs, ts, mse, algorithm=algorithm)
    assert losses.shape == ref_losses.shape == (0,)
    assert_tree_allclose(grads, ref)
    assert not jnp.any(ref.w)
    xs, ts = _constant_sequence(0, batch=3)
    states = jnp.zeros((3, 4))
    ref, ref_losses = eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, ts, mse)
    grads, losses = eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, ts, mse, algorithm=algorithm)
    assert losses.shape == ref_losses.shape == (0,)
    assert_tree_allclose(grads, ref)


def test_sequence_leaves_without_a_time_axis():
    model = _leaky()
    xs, ts = _constant_sequence(5)
    for grad_fn in (eqtrace.online_grad, eqtrace.bptt_grad):
        with pytest.raises(ValueError, match=r"`xs` leaf at \(\) has shape \(\), with no leading time axis"):
            grad_fn(model, model.init_state(), jnp.float64(1.0), ts, mse)
        with pytest.raises(ValueError, match=r"`targets` leaf at \('t',\) has shape \(\)"):
            grad_fn(model, model.init_state(), xs, {"t": jnp.float64(1.0)}, mse)
        with pytest.raises(ValueError, match=r"`xs` and `targets` must share their leading \(time\) axis"):
            grad_fn(model, model.init_state(), xs[0], ts, mse)
    # With a compiled graph, one step of `xs` is checked against the compiled input.
    graph = eqtrace.compile_etrace_graph(model, xs[0], model.init_state())
    with pytest.raises(ValueError, match=r"lacks its leading time axis: it must be shaped \(T, \*\(3,\)\)"):
        eqtrace.online_grad(model, model.init_state(), xs[0], ts[:3], mse, graph=graph)
    xs, ts = _constant_sequence(5, batch=2)
    with pytest.raises(ValueError, match=r"`xs` and `targets` must share their leading \(batch, time\) axes"):
        eqtrace.batch_grad(eqtrace.online_grad, model, jnp.zeros((2, 4)), xs[:, 0], ts, mse)


def test_prng_key_in_the_state_is_carried_untraced_and_gradients_equal_bptt():
    model = NoisyLeaky(jax.random.normal(k1, (3, 4)))
    state = (jnp.zeros(4), jax.random.key(7))
    xs, ts = _constant_sequence(6)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    assert graph.untraced_hidden_paths == ((1,),)
    ref, ref_losses = eqtrace.bptt_grad(model, state, xs, ts, mse)
    # The noise is live: another key gives another gradient.
    other, _ = eqtrace.bptt_grad(model, (jnp.zeros(4), jax.random.key(8)), xs, ts, mse)
    assert not jnp.allclose(other.w, ref.w)
    for algorithm, options in (("d_rtrl", {}), ("es_d_rtrl", {"decay": 0.0})):
        grads, losses = eqtrace.online_grad(model, state, xs, ts, mse, algorithm=algorithm, **options)
        assert_tree_allclose(grads, ref)
        assert_tree_allclose(losses, ref_losses)
    states = (jnp.zeros((3, 4)), jax.random.split(jax.random.key(9), 3))
    xs, ts = _constant_sequence(6, batch=3)
    ref, ref_losses = eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, ts, mse)
    for algorithm, options in (("d_rtrl", {}), ("es_d_rtrl", {"decay": 0.0})):
        grads, losses = eqtrace.batch_grad(
            eqtrace.online_grad, model, states, xs, ts, mse, algorithm=algorithm, **options
        )
        assert_tree_allclose(grads, ref)
        assert_tree_allclose(losses, ref_losses)


def test_complex_weights_and_states_are_refused_at_compile_time():
    model = _leaky()
    complex_model = eqx.tree_at(lambda m: m.w, model, model.w.astype(jnp.complex128))
    with pytest.raises(TypeError, match=r"`model` leaf at \('w',\) is complex128"):
        eqtrace.compile_etrace_graph(complex_model, jnp.zeros(3), model.init_state())
    with pytest.raises(TypeError, match=r"`state` leaf at \(\) is complex128"):
        eqtrace.compile_etrace_graph(model, jnp.zeros(3), jnp.zeros(4, jnp.complex128))


def test_a_state_of_the_wrong_size_is_named():
    model = Decaying(jax.random.normal(k1, (3, 16)), jnp.linspace(0.1, 0.9, 16))
    xs, ts = _constant_sequence(4)
    small = jnp.zeros(8)
    expected = r"`state` leaf at \(\) has shape \(8,\), but `model.init_state\(\)` makes it \(16,\)"
    for grad_fn in (eqtrace.online_grad, eqtrace.bptt_grad):
        with pytest.raises(ValueError, match=expected):
            grad_fn(model, small, xs, ts, mse)
    with pytest.raises(ValueError, match=expected):
        eqtrace.compile_etrace_graph(model, xs[0], small)
    graph = eqtrace.compile_etrace_graph(model, xs[0], model.init_state())
    with pytest.raises(ValueError, match=r"`state` leaf \(\) has float64\[8\], but the graph was compiled"):
        eqtrace.online_grad(model, small, xs, ts, mse, graph=graph)


def test_numpy_float64_state_without_x64_is_converted_consistently():
    """Without x64, NumPy's float64 arrays compute as float32 in JAX: the graph, its run-time checks
    and BPTT all agree (a subprocess, as the test suite turns x64 on)."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, eqtrace
        from tests.test_inputs import Leaky, mse
        assert not jax.config.jax_enable_x64
        rng = np.random.default_rng(0)
        model = Leaky(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
        state = np.zeros(4)
        xs, ts = np.broadcast_to(rng.normal(size=3), (5, 3)), rng.normal(size=(5, 2))
        graph = eqtrace.compile_etrace_graph(model, xs[0], state)
        assert graph.module_info.hidden_avals[0].dtype == jnp.float32
        ref, ref_losses = eqtrace.bptt_grad(model, state, xs, ts, mse)
        for algorithm, options in (("d_rtrl", {}), ("es_d_rtrl", {"decay": 0.0})):
            for g in (None, graph):
                grads, losses = eqtrace.online_grad(
                    model, state, xs, ts, mse, algorithm=algorithm, graph=g, **options
                )
                assert grads.w.dtype == jnp.float32
                assert np.allclose(grads.w, ref.w, rtol=1e-4, atol=1e-5), (grads.w, ref.w)
                assert np.allclose(losses, ref_losses, rtol=1e-4)
        y, new_state = eqtrace.D_RTRL(model).compile_graph(xs[0], state)(xs[0], state)
        assert new_state.dtype == jnp.float32
        print("ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_ENABLE_X64": "0", "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize(
    "grad_fn, options",
    [
        (eqtrace.bptt_grad, {}),
        (eqtrace.online_grad, {"algorithm": "d_rtrl"}),
        (eqtrace.online_grad, {"algorithm": "es_d_rtrl"}),
    ],
)
def test_batch_grad_names_states_missing_their_batch_axis(grad_fn, options):
    model = _leaky()
    xs, ts = _constant_sequence(5, batch=3)
    with pytest.raises(ValueError, match=r"`states` leaf at \(\) has shape \(4,\): missing batch axis"):
        eqtrace.batch_grad(grad_fn, model, model.init_state(), xs, ts, mse, **options)


def test_traces_of_the_right_count_but_wrong_shapes():
    model, small = _leaky(16), _leaky(8)
    x, t = _constant_sequence(1)
    x, t = x[0], t[0]
    graph = eqtrace.compile_etrace_graph(model, x, model.init_state())
    small_graph = eqtrace.compile_etrace_graph(small, x, small.init_state())
    wrong = eqtrace.d_rtrl_init(small_graph, small, small.init_state())
    assert len(wrong.eps) == len(eqtrace.d_rtrl_init(graph, model, model.init_state()).eps) == 1
    wrong = eqx.tree_at(lambda tr: tr.state, wrong, model.init_state())
    expected = r"`traces` leaf \['eps'\]\[0\] has float64\[3, 8, 1\], .* need float64\[3, 16, 1\]"
    with pytest.raises(ValueError, match=expected):
        eqtrace.d_rtrl_step(graph, model, wrong, x, t, mse)
    wrong = eqtrace.es_d_rtrl_init(small_graph, small, small.init_state())
    wrong = eqx.tree_at(lambda tr: tr.state, wrong, model.init_state())
    with pytest.raises(ValueError, match=r"`traces` leaf \['f_bar'\]\[0\] has float64\[8, 1\]"):
        eqtrace.es_d_rtrl_step(graph, model, wrong, x, t, mse)
    batched = jax.vmap(lambda s: eqtrace.es_d_rtrl_init(small_graph, small, s))(jnp.zeros((2, 8)))
    batched = eqx.tree_at(lambda tr: tr.state, batched, jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match=r"`traces` leaf \['f_bar'\]\[0\] has float64\[2, 8, 1\]"):
        eqtrace.es_d_rtrl_step(graph, model, batched, jnp.stack([x, x]), jnp.stack([t, t]), mse, batched=True)


def test_a_graph_compiled_for_another_model_is_refused():
    model = _leaky()
    xs, ts = _constant_sequence(4)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    # A graph of the same structure, compiled for other weights, is the model's own graph.
    twin = Leaky(2.0 * model.w)
    grads, _ = eqtrace.online_grad(twin, state, xs, ts, mse, graph=graph)
    assert_tree_allclose(grads, eqtrace.bptt_grad(twin, state, xs, ts, mse)[0])
    relu = _leaky(activation=jax.nn.relu)
    other = OtherLeaky(model.w)
    for wrong in (relu, other):
        for run in (
            lambda m: eqtrace.online_grad(m, state, xs, ts, mse, graph=graph),
            lambda m: eqtrace.online_grad(m, state, xs, ts, mse, "es_d_rtrl", graph=graph),
            lambda m: eqtrace.batch_grad(
                eqtrace.online_grad, m, jnp.zeros((1, 4)), xs[None], ts[None], mse, graph=graph
            ),
        ):
            with pytest.raises(ValueError, match=r"`graph` was compiled for another model: `model` has"):
                run(wrong)
    algo = eqtrace.D_RTRL(model).compile_graph(xs[0], state)
    swapped = eqx.tree_at(lambda a: a.model, algo, relu)
    traces = algo.init_traces(state)
    for call in (
        lambda: swapped(xs[0], state),
        lambda: swapped.init_traces(state),
        lambda: swapped.step(traces, xs[0], ts[0], mse),
        lambda: swapped.online_grad(state, xs, ts, mse),
    ):
        with pytest.raises(ValueError, match=r"`graph` was compiled for another model.*compile_etrace_graph"):
            call()


def test_graphs_are_recompiled_not_pickled():
    model = _leaky()
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    algo = eqtrace.D_RTRL(model).compile_graph(jnp.zeros(3))
    for obj in (graph, algo):
        with pytest.raises(TypeError, match=r"cannot be pickled.*`eqtrace.compile_etrace_graph\(model"):
            pickle.dumps(obj)
    assert copy.deepcopy(graph) is graph and copy.copy(graph) is graph
    assert copy.deepcopy(algo).graph is algo.graph
    # The model is saved; a graph recompiled for the loaded model runs as the original.
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, model)
    buffer.seek(0)
    restored = eqx.tree_deserialise_leaves(buffer, _leaky(key_scale=0.0))
    again = eqtrace.compile_etrace_graph(restored, jnp.zeros(3), restored.init_state())
    x, state = jnp.ones(3), 0.1 * jnp.ones(4)
    assert_tree_allclose(
        eqtrace.CompiledAlgorithm(restored, again, eqtrace.DRTRL())(x, state), model(x, state)
    )
