"""ETP operations are transparent: same values, derivatives, batching and compiled code as untagged JAX."""

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import pytest

import eqtrace

from .helpers import assert_tree_allclose


# ---------------------------------------------------------------------------------------------------------
# Untagged references, written from the documented semantics (not from eqtrace's implementation).


def dense_ref(x, w, b=None):
    y = x @ w
    return y if b is None else y + jnp.broadcast_to(b, y.shape)


def conv_ref(x, w, b=None, *, stride=1, padding="SAME"):
    n = w.ndim - 2
    y = lax.conv_general_dilated(x[None], w, window_strides=(stride,) * n, padding=padding)[0]
    return y if b is None else y + b.reshape((-1,) + (1,) * n)


def decay(w):
    return jnp.exp(-0.5 / w)


# ---------------------------------------------------------------------------------------------------------
# Cases: (id, tagged function, untagged reference, argument shapes, the ETP primitive it binds).


class Case:
    def __init__(self, name: str, tagged: Callable, ref: Callable, shapes: tuple, primitive: Any):
        self.name = name
        self.tagged = tagged
        self.ref = ref
        self.shapes = shapes
        self.primitive = primitive

    def args(self, seed: int = 0) -> tuple[jax.Array, ...]:
        keys = jr.split(jr.key(seed), len(self.shapes))
        # Positive values keep `decay` well away from its singularity at 0.
        return tuple(
            jr.uniform(k, s, jnp.float64, minval=0.5, maxval=1.5)
            for k, s in zip(keys, self.shapes, strict=True)
        )

    def __repr__(self):
        return self.name


def _conv_case(dims: int, padding: str, stride: int, bias: bool) -> Case:
    spatial = (9,) * dims
    kernel = (3,) * dims
    shapes = ((2, *spatial), (4, 2, *kernel)) + (((4,),) if bias else ())
    return Case(
        f"conv{dims}d-{padding}-stride{stride}" + ("-bias" if bias else ""),
        lambda *a: eqtrace.conv(*a, stride=stride, padding=padding),
        lambda *a: conv_ref(*a, stride=stride, padding=padding),
        shapes,
        eqtrace.etp_conv_p,
    )


CASES = [
    Case("matmul-vector", eqtrace.matmul, dense_ref, ((3,), (3, 5)), eqtrace.etp_matmul_p),
    Case("matmul-vector-bias", eqtrace.matmul, dense_ref, ((3,), (3, 5), (5,)), eqtrace.etp_matmul_p),
    Case("matmul-matrix-bias", eqtrace.matmul, dense_ref, ((2, 3), (3, 5), (5,)), eqtrace.etp_matmul_p),
    *[
        _conv_case(d, p, s, bias)
        for d in (1, 2)
        for p in ("SAME", "VALID")
        for s in (1, 2)
        for bias in (False, True)
    ],
    Case(
        "element_wise-decay",
        lambda w: eqtrace.element_wise(w, decay),
        decay,
        ((4, 3),),
        eqtrace.etp_element_wise_p,
    ),
]
MATMUL_CASES = [c for c in CASES if c.primitive is eqtrace.etp_matmul_p]
INPUT_CASES = [c for c in CASES if c.primitive is not eqtrace.etp_element_wise_p]


def loss(fn):
    """A scalar, non-linear function of `fn`'s output, so that gradients are not trivially constant."""
    return lambda *a: jnp.sum(jnp.sin(fn(*a)) ** 2)


def primitives_in(jaxpr) -> list:
    """Every primitive in a (closed) jaxpr, recursing into sub-jaxprs (jit, scan, custom rules, ...)."""
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn.primitive)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                    found.extend(primitives_in(sub))
    return found


def binds(fn, *args, primitive) -> bool:
    return any(p is primitive for p in primitives_in(jax.make_jaxpr(fn)(*args)))


# ---------------------------------------------------------------------------------------------------------
# Values and tags.


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_value(case):
    args = case.args()
    out = case.tagged(*args)
    assert out.dtype == jnp.float64
    assert_tree_allclose(out, case.ref(*args))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_tagged_jaxpr_binds_primitive_and_reference_does_not(case):
    args = case.args()
    assert binds(case.tagged, *args, primitive=case.primitive)
    assert not binds(case.ref, *args, primitive=case.primitive)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jit(case):
    args = case.args()
    assert_tree_allclose(jax.jit(case.tagged)(*args), case.ref(*args))
    assert binds(jax.jit(case.tagged), *args, primitive=case.primitive)


# ---------------------------------------------------------------------------------------------------------
# Derivatives, against the untagged reference.


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_grad(case):
    args = case.args()
    argnums = tuple(range(len(args)))
    got = jax.grad(loss(case.tagged), argnums=argnums)(*args)
    want = jax.grad(loss(case.ref), argnums=argnums)(*args)
    assert_tree_allclose(got, want)
    assert all(bool(jnp.any(g != 0)) for g in got)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jit_grad(case):
    args = case.args()
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss(case.tagged), argnums=argnums))(*args)
    assert_tree_allclose(got, jax.grad(loss(case.ref), argnums=argnums)(*args))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jvp(case):
    args = case.args(0)
    tangents = case.args(1)
    got = jax.jvp(case.tagged, args, tangents)
    want = jax.jvp(case.ref, args, tangents)
    assert_tree_allclose(got, want)


@pytest.mark.parametrize("jac", [jax.jacfwd, jax.jacrev], ids=["jacfwd", "jacrev"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jacobian(case, jac):
    args = case.args()
    argnums = tuple(range(len(args)))
    got = jac(case.tagged, argnums=argnums)(*args)
    want = jac(case.ref, argnums=argnums)(*args)
    assert_tree_allclose(got, want)


@pytest.mark.parametrize("case", [CASES[1], CASES[-1]], ids=repr)
def test_second_order(case):
    args = case.args()
    argnums = tuple(range(len(args)))
    assert_tree_allclose(
        jax.hessian(loss(case.tagged), argnums=argnums)(*args),
        jax.hessian(loss(case.ref), argnums=argnums)(*args),
    )


# ---------------------------------------------------------------------------------------------------------
# Batching.


@pytest.mark.parametrize("case", INPUT_CASES, ids=repr)
def test_vmap_input_only_keeps_tag(case):
    x, *weights = case.args()
    xs = jnp.stack([x, 2 * x, -x])
    tagged = jax.vmap(case.tagged, in_axes=(0,) + (None,) * len(weights))
    ref = jax.vmap(case.ref, in_axes=(0,) + (None,) * len(weights))
    assert_tree_allclose(tagged(xs, *weights), ref(xs, *weights))
    assert binds(tagged, xs, *weights, primitive=case.primitive)


@pytest.mark.parametrize("case", INPUT_CASES, ids=repr)
def test_vmap_input_axis_1(case):
    x, *weights = case.args()
    xs = jnp.stack([x, 2 * x], axis=-1)
    tagged = jax.vmap(case.tagged, in_axes=(-1,) + (None,) * len(weights))
    ref = jax.vmap(case.ref, in_axes=(-1,) + (None,) * len(weights))
    assert_tree_allclose(tagged(xs, *weights), ref(xs, *weights))


def _batchings(case) -> list[tuple[int | None, ...]]:
    """`in_axes` that batch the weights (an ensemble of layers), with or without the input."""
    n = len(case.shapes)
    if case.primitive is eqtrace.etp_element_wise_p:
        return [(0,)]
    return sorted({(0,) * n, (None,) + (0,) * (n - 1), (None, 0) + (None,) * (n - 2)}, key=str)


# Every dense and element-wise case; convolutions in one and two dimensions, with and without bias.
_ENSEMBLE_CASES = [
    c
    for c in CASES
    if c.primitive is not eqtrace.etp_conv_p
    or c.name in ("conv1d-SAME-stride1", "conv2d-SAME-stride1-bias", "conv2d-VALID-stride2-bias")
]
WEIGHT_BATCHINGS = [(case, in_axes) for case in _ENSEMBLE_CASES for in_axes in _batchings(case)]


def _batched_args(case, in_axes, seed=0):
    return [a if ax is None else jnp.stack([a, 0.5 * a + 1]) for a, ax in zip(case.args(seed), in_axes)]


@pytest.mark.parametrize("case, in_axes", WEIGHT_BATCHINGS, ids=str)
def test_vmap_weights_batched_keeps_tag(case, in_axes):
    args = _batched_args(case, in_axes)
    tagged, ref = jax.vmap(case.tagged, in_axes=in_axes), jax.vmap(case.ref, in_axes=in_axes)
    assert_tree_allclose(tagged(*args), ref(*args))
    assert binds(tagged, *args, primitive=case.primitive)
    assert binds(jax.jit(tagged), *args, primitive=case.primitive)


@pytest.mark.parametrize("case, in_axes", WEIGHT_BATCHINGS, ids=str)
def test_vmap_weights_batched_jvp_and_vjp(case, in_axes):
    args, tangents = _batched_args(case, in_axes, 0), _batched_args(case, in_axes, 1)
    tagged, ref = jax.vmap(case.tagged, in_axes=in_axes), jax.vmap(case.ref, in_axes=in_axes)
    assert_tree_allclose(jax.jvp(tagged, args, tangents), jax.jvp(ref, args, tangents))
    y, vjp_tagged = jax.vjp(tagged, *args)
    cotangent = jnp.cos(y)
    assert_tree_allclose(vjp_tagged(cotangent), jax.vjp(ref, *args)[1](cotangent))
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss(tagged), argnums=argnums))(*args)
    assert_tree_allclose(got, jax.grad(loss(ref), argnums=argnums)(*args))
    assert all(bool(jnp.any(g != 0)) for g in got)


@pytest.mark.parametrize("case", [c for c in _ENSEMBLE_CASES if c in INPUT_CASES], ids=repr)
def test_nested_vmap_examples_over_an_ensemble(case):
    """Examples (outer `vmap`, input batched) through an ensemble (inner `vmap`, weights batched)."""
    x, *weights = case.args()
    xs = jnp.stack([x, 2 * x, -x])
    ensemble = [jnp.stack([w, 0.5 * w + 1]) for w in weights]

    def over(fn):
        member = jax.vmap(fn, in_axes=(None,) + (0,) * len(weights))
        return jax.vmap(member, in_axes=(0,) + (None,) * len(weights))

    assert_tree_allclose(over(case.tagged)(xs, *ensemble), over(case.ref)(xs, *ensemble))
    assert binds(over(case.tagged), xs, *ensemble, primitive=case.primitive)
    argnums = tuple(range(len(weights) + 1))
    assert_tree_allclose(
        jax.grad(loss(over(case.tagged)), argnums=argnums)(xs, *ensemble),
        jax.grad(loss(over(case.ref)), argnums=argnums)(xs, *ensemble),
    )


@pytest.mark.parametrize("case", INPUT_CASES, ids=repr)
def test_per_example_grads(case):
    """`vmap` of `grad` over examples: the usual way to get per-example weight gradients."""
    x, *weights = case.args()
    xs = jnp.stack([x, 2 * x, -x])
    in_axes = (0,) + (None,) * len(weights)
    argnums = tuple(range(1, 1 + len(weights)))
    got = jax.vmap(jax.grad(loss(case.tagged), argnums=argnums), in_axes=in_axes)(xs, *weights)
    want = jax.vmap(jax.grad(loss(case.ref), argnums=argnums), in_axes=in_axes)(xs, *weights)
    assert_tree_allclose(got, want)


# ---------------------------------------------------------------------------------------------------------
# Inside `lax.scan`: a recurrent use, differentiated through time.


@pytest.mark.parametrize("case", MATMUL_CASES[:2], ids=repr)
def test_scan_recurrence(case):
    _, w, *rest = case.args()
    w_in = jr.normal(jr.key(3), (3, 3), jnp.float64) / 3
    w_rec = w[:, :3] / 3
    xs = jr.normal(jr.key(4), (6, 3), jnp.float64)

    def run(dense, w_in, w_rec):
        def step(h, x):
            h = jnp.tanh(dense(x, w_in) + dense(h, w_rec))
            return h, h

        _, hs = lax.scan(step, jnp.zeros(3, jnp.float64), xs)
        return jnp.sum(hs**2)

    tagged = lambda w_in, w_rec: run(eqtrace.matmul, w_in, w_rec)
    ref = lambda w_in, w_rec: run(dense_ref, w_in, w_rec)
    assert_tree_allclose(tagged(w_in, w_rec), ref(w_in, w_rec))
    assert_tree_allclose(
        jax.grad(tagged, argnums=(0, 1))(w_in, w_rec), jax.grad(ref, argnums=(0, 1))(w_in, w_rec)
    )
    assert_tree_allclose(
        jax.jit(jax.grad(tagged, argnums=(0, 1)))(w_in, w_rec), jax.grad(ref, argnums=(0, 1))(w_in, w_rec)
    )
    assert binds(tagged, w_in, w_rec, primitive=eqtrace.etp_matmul_p)
    del rest


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_scan_over_inputs(case):
    args = case.args()
    stacked = jnp.stack([args[0], 2 * args[0], 0.5 * args[0]])

    def over(fn):
        def total(first, *rest):
            def step(carry, a):
                return carry + jnp.sum(jnp.sin(fn(a, *rest))), None

            return lax.scan(step, jnp.zeros((), jnp.float64), first)[0]

        return total

    argnums = tuple(range(len(args)))
    assert_tree_allclose(over(case.tagged)(stacked, *args[1:]), over(case.ref)(stacked, *args[1:]))
    assert_tree_allclose(
        jax.grad(over(case.tagged), argnums=argnums)(stacked, *args[1:]),
        jax.grad(over(case.ref), argnums=argnums)(stacked, *args[1:]),
    )
    assert binds(over(case.tagged), stacked, *args[1:], primitive=case.primitive)


# ---------------------------------------------------------------------------------------------------------
# Zero cost: the compiled program of a tagged function is the untagged one.

_HEADER_BLOCKS = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(?:.+\n)*", re.MULTILINE)
_METADATA = re.compile(r",?\s*metadata=\{[^{}]*\}")


def entry_instructions(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None
    text = _HEADER_BLOCKS.sub("", _METADATA.sub("", text))
    match = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert match is not None, text
    lines = [line.strip() for line in match.group(1).splitlines() if line.strip()]
    assert lines
    return lines


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_same_compiled_hlo(case):
    args = case.args()
    tagged = entry_instructions(loss(case.tagged), *args)
    untagged = entry_instructions(loss(case.ref), *args)
    assert tagged == untagged
    assert not any("etp" in line for line in tagged)


@pytest.mark.parametrize("case", [CASES[1], CASES[-1]], ids=repr)
def test_same_compiled_hlo_of_gradient(case):
    args = case.args()
    argnums = tuple(range(len(args)))
    tagged = entry_instructions(jax.grad(loss(case.tagged), argnums=argnums), *args)
    untagged = entry_instructions(jax.grad(loss(case.ref), argnums=argnums), *args)
    assert tagged == untagged


@pytest.mark.parametrize("case, in_axes", WEIGHT_BATCHINGS, ids=str)
def test_same_compiled_hlo_under_vmap(case, in_axes):
    args = _batched_args(case, in_axes)
    tagged, ref = jax.vmap(case.tagged, in_axes=in_axes), jax.vmap(case.ref, in_axes=in_axes)
    assert entry_instructions(loss(tagged), *args) == entry_instructions(loss(ref), *args)
    argnums = tuple(range(len(args)))
    assert entry_instructions(jax.grad(loss(tagged), argnums=argnums), *args) == entry_instructions(
        jax.grad(loss(ref), argnums=argnums), *args
    )


# ---------------------------------------------------------------------------------------------------------
# Bad input: the error names the argument. With the test suite's runtime type checking on
# (`--jaxtyping-packages`), jaxtyping may reject a call first, with a `TypeCheckError` (a `TypeError`) that
# names the parameter as 'x'; without it, eqtrace's own check names it as `x`.


def names(argument: str) -> str:
    return rf"`{argument}`|parameter '{argument}'"


SHAPE_ERROR = (ValueError, jaxtyping.TypeCheckError)

f64 = lambda *shape: jnp.ones(shape, jnp.float64)
f32 = lambda *shape: jnp.ones(shape, jnp.float32)
i32 = lambda *shape: jnp.ones(shape, jnp.int32)


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda: eqtrace.matmul(f64(3), f64(3)), SHAPE_ERROR, "w"),
        (lambda: eqtrace.matmul(f64(3), f64(2, 3, 5)), SHAPE_ERROR, "w"),
        (lambda: eqtrace.matmul(f64(), f64(3, 5)), SHAPE_ERROR, "x"),
        (lambda: eqtrace.matmul(f64(4), f64(3, 5)), SHAPE_ERROR, "x|w"),
        (lambda: eqtrace.matmul(f64(3), f64(3, 5), f64(4)), SHAPE_ERROR, "b"),
        (lambda: eqtrace.matmul(f64(3), f64(3, 5), f64(1, 5)), SHAPE_ERROR, "b"),
        (lambda: eqtrace.matmul(i32(3), f64(3, 5)), TypeError, "x"),
        (lambda: eqtrace.matmul(f64(3), i32(3, 5)), TypeError, "w"),
        (lambda: eqtrace.matmul([1.0, 2.0, 3.0], f64(3, 5)), TypeError, "x"),
        (lambda: eqtrace.matmul(f32(3), f64(3, 5)), TypeError, "x"),
        (lambda: eqtrace.conv(f64(2, 9), f64(4, 2)), SHAPE_ERROR, "w"),
        (lambda: eqtrace.conv(f64(2, 9, 9), f64(4, 2, 3)), SHAPE_ERROR, "x"),
        (lambda: eqtrace.conv(f64(3, 9), f64(4, 2, 3)), SHAPE_ERROR, "x|w"),
        (lambda: eqtrace.conv(f64(2, 9), f64(4, 2, 3), f64(3)), SHAPE_ERROR, "b"),
        (lambda: eqtrace.conv(i32(2, 9), f64(4, 2, 3)), TypeError, "x"),
        (lambda: eqtrace.conv(f64(2, 9), f32(4, 2, 3)), TypeError, "x"),
        (lambda: eqtrace.conv(f64(2, 9), f64(4, 2, 3), padding="FULL"), ValueError, "padding"),
        (lambda: eqtrace.conv(f64(2, 9, 9), f64(4, 2, 3, 3), stride=(1, 2, 3)), ValueError, "stride"),
        (lambda: eqtrace.conv(f64(2, 9), f64(4, 2, 3), stride=0), ValueError, "stride"),
        (lambda: eqtrace.conv(f64(2, 9), f64(4, 2, 3), dilation=(1, 1)), ValueError, "dilation"),
        (lambda: eqtrace.element_wise(i32(3), decay), TypeError, "w"),
        (lambda: eqtrace.element_wise(f64(3), 3.0), TypeError, "fn"),
    ],
)
def test_bad_input(call, error, argument):
    with pytest.raises(error, match=names(f"(?:{argument})")):
        call()


def test_padding_is_case_insensitive():
    args = CASES[4].args()
    assert_tree_allclose(eqtrace.conv(*args[:2], padding="valid"), conv_ref(*args[:2], padding="VALID"))
