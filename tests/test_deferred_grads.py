"""ES-D-RTRL's deferred weight gradients: the drivers keep the factors of the weights of `x @ W`
and contract them in chunks of steps; what they return must be the sum of the public steps'
dense gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn
from eqtrace._algorithms import _drivers

from .helpers import assert_tree_allclose, check_drivers_sum_steps, rule_steps
from .models import AdaptiveNeurons, StackedCells


def mse(y, t):
    return jnp.sum((y - t) ** 2)


class SharedWeight(eqx.Module):
    """A recurrent layer whose input weight is also used by untagged operations: by a plain `@` that
    reaches the hidden state, and by one that reaches the output only."""

    w_in: jax.Array
    w_rec: jax.Array
    out: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(eqtrace.matmul(x, self.w_in) + eqtrace.matmul(h, self.w_rec) + 0.3 * (x @ self.w_in) * h)
        return self.out(h) + jnp.sum(jnp.sin(self.w_in)), h

    def init_state(self):
        return jnp.zeros(self.w_rec.shape[0], self.w_rec.dtype)


N_IN, N_OUT, BATCH = 3, 2, 2


def _model(name):
    k = jax.random.split(jax.random.key(0), 3)
    if name == "gru":
        cell = enn.GRUCell(N_IN, 4, dtype=jnp.float64, key=k[0])
        return StackedCells((cell,), enn.Linear(4, N_OUT, dtype=jnp.float64, key=k[1]))
    if name == "adaptive_neurons":
        return AdaptiveNeurons(
            jax.random.normal(k[0], (N_IN, 4)), jnp.linspace(2.0, 4.0, 4), jax.random.normal(k[1], (4, N_OUT))
        )
    return SharedWeight(
        0.5 * jax.random.normal(k[0], (N_IN, 4)),
        0.5 * jax.random.normal(k[1], (4, 4)),
        enn.Linear(4, N_OUT, dtype=jnp.float64, key=k[2]),
    )


def _sequences(time):
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (BATCH, time, N_IN)), jax.random.normal(ky, (BATCH, time, N_OUT))


# Rows per step: 2 for a traced weight (`x_t`, `x̂_t`), times the batch when batched. With 12 rows
# a contraction, the chunks are (T = 7) 4 + 3 steps unbatched and 3 + 3 + 1 batched: the shorter
# last chunk runs; T = 8 is 4 + 4 and 2 + 2 + 2 + 2.
ROWS = 12


def test_chunks_cover_the_sequence(monkeypatch):
    monkeypatch.setattr(_drivers, "CONTRACTION_ROWS", ROWS)
    assert [_drivers._chunk_length(rows, 7) for rows in (2, 2 * BATCH)] == [4, 3]
    assert [_drivers._chunk_length(rows, 8) for rows in (2, 2 * BATCH)] == [4, 2]
    monkeypatch.setattr(_drivers, "CONTRACTION_ROWS", 256)
    assert _drivers._chunk_length(2, 100) == 100  # capped by the sequence
    assert _drivers._chunk_length(2, 1000) == 125  # a divisor near 128
    assert _drivers._chunk_length(2, 997) == 125  # no divisor: 7 chunks of 125 and one of 122
    assert _drivers._chunk_length(64, 100) == 4
    assert _drivers._chunk_length(1000, 100) == 1


@pytest.mark.parametrize("name", ["gru", "shared_weight", "adaptive_neurons"])
def test_deferred_weights(name):
    """Window 0 and 1 defer exactly the weights used only as the `w` of `etp_matmul` (traced or a
    readout's); window 2 defers none. The dense gradients are `None` there."""
    model = _model(name)
    xs, targets = _sequences(1)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, xs[0, 0], state)
    expected = {
        "gru": {("cells", 0, w, "weight") for w in ("Wz", "Wr", "Wh")} | {("out", "weight")},
        "shared_weight": {("w_rec",), ("out", "weight")},
        "adaptive_neurons": {("w",), ("w_out",)},
    }[name]
    for window in (0, 1, 2):
        rule = eqtrace.ESDRTRL(window=window)
        traces = rule.init(graph, model, state)
        *_, grads, factors = rule.deferred_step(graph, model, traces, xs[0, 0], targets[0, 0], mse)
        paths = {graph.module_info.weight_paths[f.weight_index] for f in factors}
        assert paths == (expected if window <= 1 else set())
        weights = jax.tree.leaves(eqx.filter(model, eqx.is_array))
        flat = jax.tree.structure(eqx.filter(model, eqx.is_array)).flatten_up_to(grads)
        assert {graph.module_info.weight_paths[i] for i, g in enumerate(flat) if g is None} == paths
        for f in factors:
            assert f.left.shape[1:] == weights[f.weight_index].shape[:1]
            assert f.right.shape[1:] == weights[f.weight_index].shape[1:]


CASES = [
    ("gru", 0, 7, True),
    ("gru", 1, 7, True),
    ("gru", 1, 8, False),
    ("gru", 2, 7, True),
    ("shared_weight", 0, 8, True),
    ("shared_weight", 1, 7, True),
    ("shared_weight", 2, 7, True),
    ("adaptive_neurons", 1, 7, True),
]


@pytest.mark.parametrize("name, window, time, normalise", CASES)
def test_drivers_sum_the_public_steps(name, window, time, normalise, monkeypatch):
    """`online_grad` and `batch_grad` equal the sum (and batch mean) of `es_d_rtrl_step`'s dense
    gradients, run step by step: deferred (windows 0, 1) and dense (window 2), the sequence in
    whole chunks or with a shorter last one."""
    monkeypatch.setattr(_drivers, "CONTRACTION_ROWS", ROWS)
    model = _model(name)
    xs, targets = _sequences(time)
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, xs[0, 0], state)
    rule = eqtrace.ESDRTRL(decay=0.7, normalise=normalise, window=window)

    def steps(xs, targets):
        return (g for _, g in rule_steps(rule, graph, model, state, xs, targets, mse))

    check_drivers_sum_steps(rule, model, state, xs, targets, mse, steps)


@pytest.mark.parametrize(
    "rule",
    [eqtrace.ESDRTRL(window=0), eqtrace.ESDRTRL(window=1), eqtrace.ESDRTRL(window=0, exact_step=False)],
    ids=["window0", "window1", "estimated_step"],
)
@pytest.mark.parametrize("batched", [False, True])
def test_continuing_with_traces_equals_one_call(rule, batched, monkeypatch):
    """A sequence in two calls (`return_traces=True`, then `traces=`) gives one call's gradients
    and losses, though each call cuts its chunks at other steps than the one call."""
    monkeypatch.setattr(_drivers, "CONTRACTION_ROWS", ROWS)
    model = _model("gru")
    xs, targets = _sequences(9)
    state = model.init_state()
    if batched:
        state = jax.tree.map(lambda a: jnp.broadcast_to(a, (BATCH,) + a.shape), state)
        run = eqx.filter_jit(lambda *a, **k: eqtrace.batch_grad(eqtrace.online_grad, *a, **k))
        part = lambda a, lo, hi: a[:, lo:hi]  # noqa: E731
    else:
        xs, targets = xs[0], targets[0]
        run = eqx.filter_jit(eqtrace.online_grad)
        part = lambda a, lo, hi: a[lo:hi]  # noqa: E731
    whole, losses = run(model, state, xs, targets, mse, algorithm=rule)
    # Chunks (see `ROWS`): 3 + 3 + 3 steps in one call; 4 then 5 unbatched, 2 + 2 then 3 + 2 batched.
    first, first_losses, traces = run(
        model, state, part(xs, 0, 4), part(targets, 0, 4), mse, algorithm=rule, return_traces=True
    )
    assert (traces.window, traces.exact_step) == (rule.window, rule.exact_step)  # the options travel
    second, second_losses = run(
        model, None, part(xs, 4, 9), part(targets, 4, 9), mse, algorithm=rule, traces=traces
    )
    assert_tree_allclose(jax.tree.map(jnp.add, first, second), whole)
    assert_tree_allclose(jnp.concatenate([first_losses, second_losses]), losses)
