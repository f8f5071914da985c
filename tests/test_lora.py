"""`eqtrace.lora_matmul` and `eqtrace.nn.LoRALinear`: low-rank adapters trained online, the base
frozen; both adapters are traced (checked against BPTT where the traces are exact, and against the
brute-force references)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose
from .op_checks import _d_rtrl_step, _es_d_rtrl_step, check_brute_force, check_transparent, mse, per_step_bptt


def _normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def test_lora_matmul_is_transparent():
    args = [_normal(0, 3), _normal(1, 3, 2), _normal(2, 2, 4)]
    check_transparent(
        lambda x, a, b: eqtrace.lora_matmul(x, a, b, 0.5),
        lambda x, a, b: 0.5 * ((x @ a) @ b),
        args,
        eqtrace.etp_lora_matmul_p,
    )


class LoRARNN(eqx.Module):
    inp: enn.LoRALinear
    readout: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(0.7 * h + self.inp(x))
        return self.readout(h), h


def _model():
    k = jax.random.split(jax.random.key(0), 3)
    model = LoRARNN(
        enn.LoRALinear(3, 4, 2, alpha=4.0, dtype=jnp.float64, key=k[0]),
        enn.Linear(4, 2, dtype=jnp.float64, key=k[1]),
    )
    # A trained-looking adapter: B away from its initial zero, so that A's gradient is not zero.
    return eqx.tree_at(lambda m: m.inp.lora_b, model, 0.5 * _normal(3, 2, 4)), jnp.zeros(4, jnp.float64)


def test_layer_values_and_frozen_base():
    model, h0 = _model()
    layer, x = model.inp, _normal(4, 3)
    assert layer.scale == 2.0
    assert_tree_allclose(layer(x), x @ layer.weight + layer.bias + 2.0 * (x @ layer.lora_a) @ layer.lora_b)
    fresh = enn.LoRALinear(3, 4, 2, dtype=jnp.float64, key=jax.random.key(1))
    assert_tree_allclose(fresh(x), x @ fresh.weight + fresh.bias)  # B starts at zero
    graph = eqtrace.compile_etrace_graph(model, x, h0, filter_spec=enn.lora_adapters_only(model))
    assert set(graph.frozen_weights) == {("inp", "weight"), ("inp", "bias")}
    traced = {r.weight_path: r.position_diagonal for r in graph.hidden_param_op_relations}
    assert traced == {("inp", "lora_a"): False, ("inp", "lora_b"): True}


def test_frozen_base_is_excluded_without_a_filter_spec():
    """Without a `filter_spec`, the base still enters through `stop_gradient` only: it is in no
    relation (no trace), excluded as `stop_gradient`, and its gradient is zero as BPTT's."""
    model, h0 = _model()
    xs, targets = _normal(11, 3, 3), _normal(12, 3, 2)
    graph = eqtrace.compile_etrace_graph(model, xs[0], h0)
    assert {r.weight_path for r in graph.hidden_param_op_relations} == {("inp", "lora_a"), ("inp", "lora_b")}
    reasons = {e.weight_path: e.reason for e in graph.excluded_weights}
    assert reasons[("inp", "weight")] == reasons[("inp", "bias")] == "stop_gradient"
    check = eqtrace.check_gradient(model, h0, xs, targets, mse, graph=graph, verbose=False)
    for path in [("inp", "weight"), ("inp", "bias")]:
        assert check[path].reason == "stop_gradient" and check[path].norm == check[path].norm_bptt == 0.0


def test_d_rtrl_traces_b_exactly_per_step():
    """`B` is position-diagonal: its D-RTRL gradient equals BPTT's at every step."""
    model, h0 = _model()
    xs, targets = _normal(5, 5, 3), _normal(6, 5, 2)
    graph = eqtrace.compile_etrace_graph(model, xs[0], h0, filter_spec=enn.lora_adapters_only(model))
    traces = eqtrace.d_rtrl_init(graph, model, h0)
    for t in range(len(xs)):
        traces, _, _, grads = _d_rtrl_step(graph, model, traces, xs[t], targets[t], mse)
        exact = per_step_bptt(model, h0, xs, targets, t)
        assert_tree_allclose(grads.inp.lora_b, exact.inp.lora_b)
    # The frozen base gets no gradient at all; BPTT's through `stop_gradient` is zero.
    assert grads.inp.weight is None and grads.inp.bias is None
    assert not bool(jnp.any(exact.inp.weight)) and not bool(jnp.any(exact.inp.bias))
    assert bool(jnp.any(grads.inp.lora_a != 0))


def test_es_d_rtrl_traces_both_adapters_exactly_for_a_constant_input():
    """With a constant input ES-D-RTRL's factorised trace is exact for both `A` and `B`."""
    model, h0 = _model()
    xs, targets = jnp.broadcast_to(_normal(7, 3), (5, 3)), _normal(8, 5, 2)
    graph = eqtrace.compile_etrace_graph(model, xs[0], h0, filter_spec=enn.lora_adapters_only(model))
    traces = eqtrace.es_d_rtrl_init(graph, model, h0, 0.9)
    for t in range(len(xs)):
        traces, _, _, grads = _es_d_rtrl_step(graph, model, traces, xs[t], targets[t], mse)
        exact = per_step_bptt(model, h0, xs, targets, t)
        assert_tree_allclose((grads.inp.lora_a, grads.inp.lora_b), (exact.inp.lora_a, exact.inp.lora_b))
    # Beyond the first step, the same-step gradient alone is not the answer: the traces carry it.
    same_step = eqx.filter_grad(lambda m: mse(m(xs[-1], traces.state)[0], targets[-1]))(model)
    assert not bool(jnp.allclose(same_step.inp.lora_a, grads.inp.lora_a))


def test_brute_force_references():
    model, h0 = _model()
    check_brute_force(
        model, h0, _normal(9, 3, 3), _normal(10, 3, 2), live=lambda g: [g.inp.lora_a, g.inp.lora_b, g.readout]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(weight=jnp.ones((4, 3))), "weight"),
        (dict(bias=jnp.ones(3)), "bias"),
        (dict(alpha=-1.0), "alpha"),
    ],
)
def test_bad_layer_arguments(kwargs, match):
    args = dict(in_features=3, out_features=4, rank=2, key=jax.random.key(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        enn.LoRALinear(args.pop("in_features"), args.pop("out_features"), args.pop("rank"), **args)


def test_bad_op_arguments():
    with pytest.raises((ValueError, TypeError), match="do not chain|rank"):
        eqtrace.lora_matmul(jnp.ones(3), jnp.ones((3, 2)), jnp.ones((3, 4)))
