"""Weight-shaped traces stepped a whole batch at a time (D-RTRL and SnAp-1 with `batched=True`):
per step, the same traces as each example alone and the batch mean of their gradients; and the
drivers' batch gradient against BPTT of the batch-mean loss where D-RTRL is exact."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
from eqtrace._algorithms._d_rtrl import batch_sum

from .helpers import assert_tree_allclose
from .models import TwoLayerGRU
from .test_d_rtrl import LeakyIntegrator
from .test_drivers import _batch_models


def mse(y, t):
    return jnp.sum((y - t) ** 2)


def _models():
    models = {name: model for name, (model, _) in _batch_models().items()}
    models["gru2"] = TwoLayerGRU(3, 4, 2, key=jax.random.key(7))
    shapes = {name: x_shape for name, (_, x_shape) in _batch_models().items()} | {"gru2": (3,)}
    return models, shapes


def _batch(model, x_shape, batch, T, key, state=None):
    """Time-major inputs and targets of a batch, and the batch's initial states."""
    state = model.init_state() if state is None else state
    kx, kt = jax.random.split(key)
    xs = jax.random.normal(kx, (T, batch) + x_shape)
    y0, _ = model(jnp.zeros(x_shape), state)
    targets = jax.random.normal(kt, (T, batch) + y0.shape)
    states = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), state)
    return xs, targets, states


@pytest.mark.parametrize("batch", [1, 5, 8, 19, 70])
def test_batch_sum_adds_every_example_once(batch):
    """Every staging of the sum (one stage; stages with a row left over) adds each example once."""
    k1, k2 = jax.random.split(jax.random.key(batch))
    a, b = jax.random.normal(k1, (batch, 3, 4)), jax.random.normal(k2, (batch, 1, 4))
    got = jax.jit(lambda a, b: batch_sum(lambda u, v: u * v + u, a, b))(a, b)
    assert got.shape == (3, 4)
    assert jnp.allclose(got, jnp.sum(a * b + a, axis=0), rtol=1e-12, atol=1e-12)


# SnAp-1 shares D-RTRL's batched step; its own blocks need one window to be checked batched.
RULES = [eqtrace.DRTRL(window=0), eqtrace.DRTRL(window=1), eqtrace.DRTRL(window=2), eqtrace.SnAp1()]


@pytest.mark.parametrize("rule", RULES, ids=["DRTRL0", "DRTRL1", "DRTRL2", "SnAp1"])
@pytest.mark.parametrize("name", ["rnn", "element_wise", "conv", "computed_weight", "gru2"])
def test_batched_step_equals_each_example_alone(name, rule):
    models, shapes = _models()
    model, batch, T = models[name], 11, 4
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(shapes[name]), model.init_state())
    xs, targets, states = _batch(model, shapes[name], batch, T, jax.random.key(1))
    batched = eqx.filter_jit(lambda tr, x, t: rule.step(graph, model, tr, x, t, mse, batched=True))
    single = eqx.filter_jit(
        jax.vmap(lambda tr, x, t: rule.step(graph, model, tr, x, t, mse), in_axes=(0, 0, 0))
    )
    traces_b = traces_s = jax.vmap(lambda s: rule.init(graph, model, s))(states)
    for t in range(T):
        traces_b, y_b, loss_b, grads_b = batched(traces_b, xs[t], targets[t])
        traces_s, y_s, loss_s, grads_s = single(traces_s, xs[t], targets[t])
        assert_tree_allclose(traces_b, traces_s)
        assert_tree_allclose((y_b, loss_b), (y_s, loss_s))
        assert_tree_allclose(grads_b, jax.tree.map(lambda g: jnp.mean(g, axis=0), grads_s))
    assert any(jnp.any(e != 0) for e in traces_b.eps)


@pytest.mark.parametrize("batch", [1, 9, 20])
def test_batch_grad_d_rtrl_equals_batch_mean_bptt_where_exact(batch):
    """A leaky integrator with a readout: D-RTRL is exact, so the batch gradient (contracted over
    the batch at every step) must be BPTT's of the batch-mean loss."""
    k1, k2 = jax.random.split(jax.random.key(2))
    model = LeakyIntegrator(jax.random.normal(k1, (3, 4)), eqtrace.nn.Linear(4, 2, key=k2))
    xs, targets, states = _batch(model, (3,), batch, 6, jax.random.key(3), jnp.zeros(4))
    xs, targets = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1)
    online = eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, targets, mse, algorithm="d_rtrl")
    bptt = eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, targets, mse)
    assert_tree_allclose(online, bptt)
    assert all(jnp.any(g != 0) for g in jax.tree.leaves(online[0]))


def test_batched_d_rtrl_keeps_one_weight_sized_gradient():
    """XLA's temp memory of the batch gradient: the per-example traces (held once, updated in
    place) and a weight-sized gradient, not a per-example gradient accumulator as well."""
    model = TwoLayerGRU(8, 32, 4, dtype=jnp.float32, key=jax.random.key(4))
    batch, T = 32, 10
    xs = jnp.zeros((batch, T, 8), jnp.float32)
    targets = jnp.zeros((batch, T, 4), jnp.float32)
    states = jax.vmap(lambda _: model.init_state())(jnp.arange(batch))

    def grad(model, states, xs, targets):
        return eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, targets, mse, algorithm="d_rtrl")

    _, _, traces = eqtrace.batch_grad(
        eqtrace.online_grad, model, states, xs, targets, mse, algorithm="d_rtrl", return_traces=True
    )
    trace_bytes = sum(e.nbytes for e in traces.eps)
    mem = jax.jit(grad).lower(model, states, xs, targets).compile().memory_analysis()
    assert mem is not None
    assert mem.temp_size_in_bytes < 1.5 * trace_bytes, (mem.temp_size_in_bytes, trace_bytes)
