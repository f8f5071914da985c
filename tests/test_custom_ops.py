"""ETP operations defined with `eqtrace.register_etp_op`: they compile, get traced, and their
online gradients equal BPTT (where exact) and the brute-force references."""

import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .op_checks import check_brute_force, check_d_rtrl_equals_bptt, check_transparent


def _scaled_matmul(x, w, *, scale):
    return scale * (x @ w)


scaled_matmul = eqtrace.register_etp_op(
    "test_scaled_matmul",
    _scaled_matmul,
    has_input=True,
    position_diagonal=lambda x_shape, w_shape: len(x_shape) == 1,
)


def _gated(x, w, g):
    # Every output reads all of `g`: `g` is shared across positions.
    return (x @ w) * jax.nn.sigmoid(jnp.sum(g))


gated = eqtrace.register_etp_op(
    "test_gated", _gated, has_input=True, input_axes=lambda j, x, w, g: (0,) if j == 1 else None
)


def _normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def test_custom_op_is_transparent():
    args = [_normal(0, 3), _normal(1, 3, 4)]
    check_transparent(
        lambda x, w: scaled_matmul(x, w, scale=0.5),
        lambda x, w: _scaled_matmul(x, w, scale=0.5),
        args,
        scaled_matmul.primitive,
    )
    args = [_normal(0, 3), _normal(1, 3, 4), _normal(2, 2)]
    check_transparent(gated, _gated, args, gated.primitive)


class Leaky(eqx.Module):
    w: jax.Array
    readout: enn.Linear

    def __call__(self, x, h):
        h = 0.8 * h + jnp.tanh(scaled_matmul(x, self.w, scale=0.5))
        return self.readout(h), h


def _leaky():
    k = jax.random.split(jax.random.key(0), 2)
    model = Leaky(jax.random.normal(k[0], (3, 4), jnp.float64), enn.Linear(4, 2, dtype=jnp.float64, key=k[1]))
    return model, jnp.zeros(4, jnp.float64), _normal(3, 5, 3), _normal(4, 5, 2)


def test_custom_op_is_found_and_traced():
    model, h0, xs, _ = _leaky()
    graph = eqtrace.compile_etrace_graph(model, xs[0], h0)
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("w",)]
    assert rel.primitive is scaled_matmul.primitive
    assert rel.position_diagonal and rel.input_axes == (0,)
    assert "test_scaled_matmul" in eqtrace._compiler._show.format_graph(graph)


def test_custom_op_d_rtrl_equals_bptt_per_step():
    check_d_rtrl_equals_bptt(*_leaky())


def test_custom_op_brute_force_references():
    model, h0, xs, targets = _leaky()
    check_brute_force(model, h0, xs[:2], targets[:2])


class Gated(eqx.Module):
    w: jax.Array
    g: jax.Array
    readout: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(0.7 * h + gated(x, self.w, self.g))
        return self.readout(h), h


def test_custom_op_with_a_shared_weight_matches_the_references():
    k = jax.random.split(jax.random.key(5), 3)
    model = Gated(_normal(6, 3, 4), _normal(7, 2), enn.Linear(4, 2, dtype=jnp.float64, key=k[2]))
    graph = check_brute_force(model, jnp.zeros(4, jnp.float64), _normal(8, 3, 3), _normal(9, 3, 2))
    diagonal = {r.weight_path: r.position_diagonal for r in graph.hidden_param_op_relations}
    assert diagonal == {("w",): True, ("g",): False}


def test_wrong_layout_is_an_error_at_compile_time():
    bad = eqtrace.register_etp_op(
        "test_bad_layout", _scaled_matmul, has_input=True, input_axes=lambda j, x, w, **_: (1,)
    )

    class Model(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            h = 0.5 * h + bad(x, self.w, scale=1.0)
            return h, h

    model = Model(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="test_bad_layout.*must be the output's"):
        eqtrace.compile_etrace_graph(model, jnp.ones(3), jnp.zeros(4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="", impl=_gated, has_input=True), "name"),
        (dict(name="x", impl=3, has_input=True), "impl"),
        (dict(name="x", impl=_gated, has_input=1), "has_input"),
        (dict(name="x", impl=_gated, has_input=True, position_diagonal=1), "position_diagonal"),
        (
            dict(name="x", impl=_gated, has_input=True, position_diagonal=len, input_axes=len),
            "not both",
        ),
    ],
)
def test_bad_registration(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        eqtrace.register_etp_op(kwargs.pop("name"), kwargs.pop("impl"), **kwargs)


def test_docs_example_runs(capsys):
    page = pathlib.Path(__file__).parent.parent / "docs" / "api" / "ops.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
    out = capsys.readouterr().out
    assert "scaled_matmul" in out
    assert float(out.strip().rsplit(" ", 1)[-1]) < 1e-9
