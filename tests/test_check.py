"""`eqtrace.check_gradient`: its statuses come from the graph, its numbers from BPTT and the online rule."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqtrace
import eqtrace.nn as enn
from eqtrace._compiler._compile import key_to_path

from .models import SingleLayerRNN


def mse(y, t):
    return jnp.sum((y - t) ** 2)


class IndRNNModel(eqx.Module):
    """An IndRNN layer read out by a Linear: one group, position-wise recurrence (D-RTRL is exact)."""

    rnn: enn.IndRNNCell
    out: enn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.rnn = enn.IndRNNCell(3, 5, activation=jnp.tanh, dtype=jnp.float64, key=k1)
        self.out = enn.Linear(5, 2, dtype=jnp.float64, key=k2)

    def __call__(self, x, state):
        state = self.rnn(x, state)
        return self.out(state.h), state

    def init_state(self):
        return self.rnn.init_state()


class UsedTwice(eqx.Module):
    """`W` goes through a tagged matmul and a plain `@`; `unused` reaches nothing."""

    w: jax.Array
    u: jax.Array
    w_out: jax.Array
    unused: jax.Array

    def __call__(self, x, h):
        h = jnp.tanh(eqtrace.matmul(x, self.w) + x @ self.w + eqtrace.element_wise(self.u) * h)
        return eqtrace.matmul(h, self.w_out), h


class ConvLeaky(eqx.Module):
    """A leaky layer fed by a convolution: its kernel is shared across positions."""

    k: jax.Array
    u: jax.Array

    def __call__(self, x, h):
        h = jnp.tanh(eqtrace.conv(x, self.k) + eqtrace.element_wise(self.u) * h)
        return jnp.sum(h, axis=0), h


def sequence(key, t, x_shape, y_shape):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (t,) + x_shape), jax.random.normal(ky, (t,) + y_shape)


def used_twice():
    k = jax.random.split(jax.random.key(3), 3)
    model = UsedTwice(
        0.5 * jax.random.normal(k[0], (3, 5)),
        jnp.full(5, 0.6),
        jax.random.normal(k[1], (5, 2)),
        jnp.ones(4),
    )
    return model, jnp.zeros(5), *sequence(k[2], 6, (3,), (2,))


def vanilla_rnn():
    model = SingleLayerRNN(3, 5, 2, dtype=jnp.float64, key=jax.random.key(1))
    return model, model.init_state(), *sequence(jax.random.key(2), 6, (3,), (2,))


def independent(grads, reference):
    """Per leaf path: (cosine, relative error, |g|, |g_bptt|), computed here from two gradient trees;
    and the same for the whole model under the key `None`."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    flat_ref = jax.tree_util.tree_flatten_with_path(reference)[0]
    for (p, g), (q, r) in zip(flat, flat_ref, strict=True):
        assert p == q
        out[key_to_path(p)] = (np.asarray(g).ravel(), np.asarray(r).ravel())
    out[None] = tuple(np.concatenate([v[i] for v in list(out.values())]) for i in (0, 1))
    stats = {}
    for path, (g, r) in out.items():
        if not np.any(r):
            stats[path] = (None, None, float(np.sqrt(np.dot(g, g))), 0.0)
            continue
        cos = float(np.dot(g, r) / np.sqrt(np.dot(g, g) * np.dot(r, r)))
        err = float(np.sqrt(np.sum((g - r) ** 2) / np.sum(r**2)))
        stats[path] = (cos, err, float(np.sqrt(np.dot(g, g))), float(np.sqrt(np.dot(r, r))))
    return stats


@pytest.mark.parametrize("window", [0, 1, 3])
def test_exact_model_every_row_is_exact(window):
    model = IndRNNModel(key=jax.random.key(0))
    xs, targets = sequence(jax.random.key(1), 8, (3,), (2,))
    check = eqtrace.check_gradient(model, model.init_state(), xs, targets, mse, window=window, verbose=False)
    assert len(check.rows) == 5
    for row in check.rows + (check.total,):
        assert row.norm_bptt > 0
        assert abs(row.cosine - 1) < 1e-9, row
        assert row.relative_error < 1e-9, row
    assert check.min_cosine > 1 - 1e-9
    assert check.max_relative_error < 1e-9
    assert check[("rnn", "u")].status == "traced"
    assert check[("rnn", "W", "weight")].status == "traced"
    readout = check[("out", "weight")]
    assert readout.status == ("window only" if window > 1 else "same-step only")
    assert readout.reason == "non_temporal"


def test_vanilla_rnn_window_zero():
    model, state, xs, targets = vanilla_rnn()
    check = eqtrace.check_gradient(model, state, xs, targets, mse, window=0, verbose=False)
    recurrent = check[("rnn", "W", "weight")]
    assert recurrent.status == "traced"
    assert recurrent.cosine < 0.99
    assert recurrent.relative_error > 0.01
    assert "D = 0" in recurrent.detail
    for path in [("out", "weight"), ("out", "bias")]:
        readout = check[path]
        assert readout.status == "same-step only"
        assert readout.reason == "non_temporal"
        assert readout.detail == next(
            w.detail
            for w in eqtrace.compile_etrace_graph(model, xs[0], state).excluded_weights
            if w.weight_path == path
        )
        assert abs(readout.cosine - 1) < 1e-9
    assert check.min_cosine == min(r.cosine for r in check.rows) <= recurrent.cosine
    assert check.total.cosine < 1 - 1e-6


def test_vanilla_rnn_a_longer_window_is_closer():
    model, state, xs, targets = vanilla_rnn()
    errors = [
        eqtrace.check_gradient(model, state, xs, targets, mse, window=k, verbose=False).total.relative_error
        for k in (0, 1, 3, len(xs))
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[3] < 1e-9  # a window as long as the sequence is BPTT


def test_weight_used_twice_is_partly_traced():
    model, state, xs, targets = used_twice()
    # Without inference the plain `@` stays an untraced use of `w`.
    graph = eqtrace.compile_etrace_graph(model, xs[0], state, infer_etp_ops=False)
    check = eqtrace.check_gradient(model, state, xs, targets, mse, graph=graph, verbose=False)
    row = check[("w",)]
    assert row.status == "partly traced"
    assert row.reason == "untraced_use"
    assert [(w.weight_path, w.detail) for w in graph.partly_traced_weights] == [(("w",), row.detail)]
    assert check[("u",)].status == "traced"
    assert check[("w_out",)].reason == "non_temporal"


def test_zero_bptt_gradient_is_reported():
    model, state, xs, targets = used_twice()
    check = eqtrace.check_gradient(model, state, xs, targets, mse, window=2, verbose=False)
    row = check[("unused",)]
    assert row.status == "window only"
    assert row.reason == "no_etp_op"
    assert row.bptt_is_zero and row.norm == 0.0
    assert row.cosine is None and row.relative_error is None
    assert check.min_cosine == min(r.cosine for r in check.rows if r.path != ("unused",))
    line = next(line for line in str(check).splitlines() if line.startswith("('unused',)"))
    assert "BPTT gradient is zero" in line


@pytest.mark.parametrize("algorithm, exact", [("d_rtrl", True), ("es_d_rtrl", False)])
def test_shared_kernel(algorithm, exact):
    """D-RTRL keeps a per-position trace of the kernel, exact on this position-wise recurrence;
    ES-D-RTRL's factorised trace of it is not."""
    key = jax.random.key(4)
    model = ConvLeaky(0.5 * jax.random.normal(key, (2, 1, 3)), jnp.full((2, 6), 0.7))
    xs, targets = sequence(key, 5, (1, 6), (6,))
    check = eqtrace.check_gradient(model, jnp.zeros((2, 6)), xs, targets, mse, algorithm, verbose=False)
    assert (check[("k",)].status, check[("k",)].reason) == ("traced", None)
    assert (check[("k",)].relative_error < 1e-9) == exact
    assert abs(check[("u",)].cosine - 1) < 1e-9


@pytest.mark.parametrize(
    "model_and_data, algorithm, options",
    [
        (vanilla_rnn, "d_rtrl", {"window": 0}),
        (vanilla_rnn, "es_d_rtrl", {"window": 2, "decay": 0.5}),
        (used_twice, "pp_prop", {"normalise": False}),
        (used_twice, "d_rtrl", {"window": 1}),
    ],
)
def test_numbers_match_bptt_and_online_grad(model_and_data, algorithm, options):
    model, state, xs, targets = model_and_data()
    check = eqtrace.check_gradient(model, state, xs, targets, mse, algorithm, verbose=False, **options)
    grads, _ = eqtrace.online_grad(model, state, xs, targets, mse, algorithm, **options)
    reference, _ = eqtrace.bptt_grad(model, state, xs, targets, mse)
    stats = independent(grads, reference)
    assert [r.path for r in check.rows] == [p for p in stats if p is not None]
    for row in check.rows + (check.total,):
        want = stats[row.path]
        if want[3] == 0.0:
            assert row.bptt_is_zero and row.cosine is None and row.relative_error is None
            assert row.norm == pytest.approx(want[2], abs=1e-15)
            continue
        got = (row.cosine, row.relative_error, row.norm, row.norm_bptt)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    rule = {"d_rtrl": eqtrace.DRTRL, "es_d_rtrl": eqtrace.ESDRTRL, "pp_prop": eqtrace.ESDRTRL}[algorithm]
    assert check.algorithm == rule(**options)
    assert check.num_steps == xs.shape[0]


def test_printed_table(capsys):
    model, state, xs, targets = vanilla_rnn()
    check = eqtrace.check_gradient(model, state, xs, targets, mse, window=0)
    printed = capsys.readouterr().out
    assert printed == str(check) + "\n"
    for path in ["('rnn', 'W', 'weight')", "('rnn', 'W', 'bias')", "('out', 'weight')", "('out', 'bias')"]:
        assert path in printed
    assert "whole model" in printed
    assert "window=0" in printed
    readout_line = next(line for line in printed.splitlines() if line.startswith("('out', 'weight')"))
    assert "same-step only" in readout_line and "non_temporal" in readout_line
    assert f"{check[('rnn', 'W', 'weight')].cosine:.6f}" in printed

    eqtrace.check_gradient(model, state, xs, targets, mse, window=0, verbose=False)
    assert capsys.readouterr().out == ""


def test_record_is_immutable_and_indexable():
    model, state, xs, targets = vanilla_rnn()
    check = eqtrace.check_gradient(model, state, xs, targets, mse, verbose=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.rows = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.total.cosine = 1.0  # type: ignore[misc]
    with pytest.raises(KeyError, match="no_such"):
        check[("no_such",)]
    assert hash(check.total) == hash(dataclasses.replace(check.total))


def test_precompiled_graph_and_bad_arguments():
    model, state, xs, targets = vanilla_rnn()
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    with_graph = eqtrace.check_gradient(model, state, xs, targets, mse, graph=graph, verbose=False)
    without = eqtrace.check_gradient(model, state, xs, targets, mse, verbose=False)
    assert with_graph == without
    with pytest.raises(ValueError, match="`algorithm`"):
        eqtrace.check_gradient(model, state, xs, targets, mse, "bptt", verbose=False)
    with pytest.raises(ValueError, match="`window`"):
        eqtrace.check_gradient(model, state, xs, targets, mse, window=-1, verbose=False)
    ind = IndRNNModel(key=jax.random.key(0))
    other = eqtrace.compile_etrace_graph(ind, xs[0], ind.init_state())
    with pytest.raises((ValueError, TypeError)):
        eqtrace.check_gradient(model, state, xs, targets, mse, graph=other, verbose=False)


def test_labels_under_exact_and_trace_free_rules():
    model, state, xs, targets = vanilla_rnn()
    exact = eqtrace.check_gradient(model, state, xs, targets, mse, eqtrace.RTRL(), verbose=False)
    assert {r.status for r in exact.rows} == {"traced"} and exact.min_cosine > 1 - 1e-9
    truncated = eqtrace.check_gradient(
        model, state, xs, targets, mse, eqtrace.TruncatedBPTT(2), verbose=False
    )
    rnn = truncated[("rnn", "W", "weight")]
    assert (rnn.status, rnn.reason) == ("window only", "no_trace_kept") and rnn.cosine < 1 - 1e-6
    assert truncated[("out", "weight")].reason == "non_temporal"
