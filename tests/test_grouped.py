"""`eqtrace.nn.GroupedLinear`: independent maps per group, a position-diagonal weight whose D-RTRL
trace is exact per position (against BPTT, per step) and the brute-force references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose
from .op_checks import check_brute_force, check_d_rtrl_equals_bptt


class Populations(eqx.Module):
    """`G` populations, each with its own input map and leaky tanh units."""

    inp: enn.GroupedLinear
    readout: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(0.6 * h + self.inp(x))
        return self.readout(h.reshape(-1)), h


def _model():
    k = jax.random.split(jax.random.key(0), 4)
    model = Populations(
        enn.GroupedLinear(2, 3, 4, dtype=jnp.float64, key=k[0]), enn.Linear(8, 2, dtype=jnp.float64, key=k[1])
    )
    xs = jax.random.normal(k[2], (5, 2, 3), jnp.float64)
    targets = jax.random.normal(k[3], (5, 2), jnp.float64)
    return model, jnp.zeros((2, 4), jnp.float64), xs, targets


def test_values_are_a_matmul_per_group():
    model, _, xs, _ = _model()
    layer = model.inp
    want = jnp.stack([xs[0, g] @ layer.weight[g] + layer.bias[g] for g in range(2)])
    assert_tree_allclose(layer(xs[0]), want)
    assert layer.weight.shape == (2, 3, 4) and layer.bias.shape == (2, 4)
    assert enn.GroupedLinear(2, 3, 4, use_bias=False, key=jax.random.key(0)).bias is None


def test_weight_is_position_diagonal():
    model, h0, xs, _ = _model()
    graph = eqtrace.compile_etrace_graph(model, xs[0], h0)
    axes = {r.weight_path: r.input_axes for r in graph.hidden_param_op_relations if r.position_diagonal}
    assert axes == {("inp", "weight"): (1,), ("inp", "bias"): ()}


def test_d_rtrl_equals_bptt_per_step():
    check_d_rtrl_equals_bptt(*_model())


def test_brute_force_references():
    model, h0, xs, targets = _model()
    check_brute_force(model, h0, xs[:3], targets[:3])


def test_bad_input_shape():
    model, _, _, _ = _model()
    with pytest.raises(ValueError, match=r"`x` must have shape \(2, 3\)"):
        model.inp(jnp.ones((3, 3), jnp.float64))
