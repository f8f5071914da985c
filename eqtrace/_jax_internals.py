"""Every use of JAX's internal APIs lives here, so that a JAX release that moves them breaks one file.

Public JAX (`jax.numpy`, `jax.lax`, `jax.make_jaxpr`, ...) is used freely elsewhere; what follows is
the primitive-registration API and the jaxpr data structures that the compiler reads.
"""

from collections.abc import Callable

import jax
import jax.core
import jax.extend.core as jex_core
from jax.extend.core import primitives as jex_primitives
from jax.interpreters import ad, batching, mlir


Primitive = jex_core.Primitive
Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr
JaxprEqn = jex_core.JaxprEqn
Literal = jex_core.Literal
Var = jex_core.Var

# Call-like primitives whose body the compiler inlines (they carry no derivative rule of their own).
INLINED_CALLS = tuple(
    p
    for p in (getattr(jex_primitives, n, None) for n in ("jit_p", "pjit_p", "closed_call_p", "call_p"))
    if p is not None
)
CUSTOM_JVP_CALL = jex_primitives.custom_jvp_call_p
CUSTOM_VJP_CALL = jex_primitives.custom_vjp_call_p
CUSTOM_CALLS = (CUSTOM_JVP_CALL, CUSTOM_VJP_CALL)
REMAT = jex_primitives.remat_p
WHILE, SCAN, COND = jex_primitives.while_p, jex_primitives.scan_p, jex_primitives.cond_p
CONTROL_FLOW = (SCAN, WHILE, COND)
# Equations whose outputs the compiler follows through their bodies (`eqtrace._compiler._flow`).
BODIES = (*CONTROL_FLOW, *CUSTOM_CALLS, REMAT, *INLINED_CALLS)

# Primitives that act position by position: output[i] depends on operand[i] only (operands of the
# output's shape) or on a scalar. Used to decide whether data flows "element-wise".
_ELEMENTWISE_NAMES = """
abs acos acosh add asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy cos cosh
digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma log
log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem round rsqrt
select_n sign sin sinh sqrt square sub tan tanh xor and stop_gradient
""".split()
ELEMENTWISE = frozenset(
    p for p in (getattr(jex_primitives, n + "_p", None) for n in _ELEMENTWISE_NAMES) if p is not None
)


def _equinox_primitives(names: list[tuple[str, str]]) -> frozenset:
    """Equinox's own primitives (identities and selects in its loops and checks, as found in an ODE
    solve by Diffrax), by module and name; those a release does not have are left out."""
    import importlib

    found = set()
    for module, name in names:
        try:
            found.add(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return frozenset(found)


# `xs.at[i].set(x)` where a predicate holds, in the loops of Equinox (and so of Diffrax).
EQX_MAYBE_SET = next(iter(_equinox_primitives([("equinox.internal._loop.common", "maybe_set_p")])), None)
ELEMENTWISE = ELEMENTWISE | _equinox_primitives(
    [
        ("equinox.internal._loop.common", "select_if_vmap_p"),
        ("equinox.internal._nontraceable", "nonbatchable_p"),
        ("equinox.internal._nontraceable", "nontraceable_p"),
        ("equinox.internal._nontraceable", "nondifferentiable_backward_p"),
    ]
)
BROADCAST_IN_DIM = jex_primitives.broadcast_in_dim_p
# Primitives that move, select or sum whole blocks of an array: some keep its trailing axes intact
# (see `eqtrace._compiler._flow`), e.g. the buffer of saved states inside an ODE solve.
LAYOUT = {
    n: getattr(jex_primitives, n + "_p")
    for n in """broadcast_in_dim reshape squeeze transpose slice dynamic_slice dynamic_update_slice
    concatenate reduce_sum reduce_max reduce_min reduce_prod dot_general gather scatter scatter_add
    scatter_mul scatter_min scatter_max""".split()
}
try:  # `jnp.stack` of equal arrays binds its own primitives since JAX 0.9 (not in `jax.extend` yet)
    from jax._src.lax.lax import stack_p as _stack_p, unstack_p as _unstack_p

    LAYOUT |= {"stack": _stack_p, "unstack": _unstack_p}
except ImportError:
    pass
LAYOUT_OPS = frozenset(LAYOUT.values()) | ({EQX_MAYBE_SET} if EQX_MAYBE_SET is not None else set())

# What the inference of ETP operations in untagged models reads: the trainable operations, the
# layout-only operations a weight may pass through on its way to one, and the slicing of outputs.
DOT_GENERAL = jex_primitives.dot_general_p
CONV_GENERAL_DILATED = jex_primitives.conv_general_dilated_p
TRANSPOSE = jex_primitives.transpose_p
SAME_LAYOUT = frozenset((jex_primitives.convert_element_type_p, jex_primitives.copy_p))
WEIGHT_LAYOUT = SAME_LAYOUT | {
    TRANSPOSE,
    jex_primitives.reshape_p,
    jex_primitives.broadcast_in_dim_p,
    jex_primitives.squeeze_p,
    jex_primitives.slice_p,
}
SLICE = jex_primitives.slice_p
SQUEEZE = jex_primitives.squeeze_p
# A weight that reaches the step only through `stop_gradient` is frozen there: nothing is inferred on it.
STOP_GRADIENT = jex_primitives.stop_gradient_p
SPLIT = getattr(jax.lax, "split_p", None)


def closed_call_body(eqn: JaxprEqn) -> ClosedJaxpr | None:
    """The body of an inlinable call equation, as a closed jaxpr, or `None`."""
    if eqn.primitive in INLINED_CALLS:
        body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    elif eqn.primitive is REMAT:
        body = eqn.params["jaxpr"]
    else:
        return None
    if isinstance(body, Jaxpr):
        body = ClosedJaxpr(body, ())
    return body


def custom_call_body(eqn: JaxprEqn) -> ClosedJaxpr | None:
    """The primal body of a `custom_jvp`/`custom_vjp` call, or `None` for other equations."""
    if eqn.primitive is CUSTOM_JVP_CALL:
        return eqn.params["call_jaxpr"]
    if eqn.primitive is CUSTOM_VJP_CALL:
        return eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    return None


def while_parts(eqn: JaxprEqn) -> tuple[ClosedJaxpr, int, int]:
    """A `while` equation's body and how many of its operands are the constants of its condition
    and of its body (the carries follow them)."""
    p = eqn.params
    return p["body_jaxpr"], p["cond_nconsts"], p["body_nconsts"]


def scan_parts(eqn: JaxprEqn) -> tuple[ClosedJaxpr, int, int]:
    """A `scan` equation's body, its number of constants and of carries (the scanned inputs follow)."""
    p = eqn.params
    return p["jaxpr"], p["num_consts"], p["num_carry"]


def while_cond(eqn: JaxprEqn) -> ClosedJaxpr:
    """A `while` equation's condition (its constants lead the equation's operands)."""
    return eqn.params["cond_jaxpr"]


def scan_options(eqn: JaxprEqn) -> dict:
    """The options of a `scan` equation, as `jax.lax.scan` takes them."""
    p = eqn.params
    options = dict(length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    if "_split_transpose" in p:
        options["_split_transpose"] = p["_split_transpose"]
    return options


def remat_options(eqn: JaxprEqn) -> dict:
    """The options of a `checkpoint` (`remat`) equation, as `jax.checkpoint` takes them."""
    return dict(prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])


def cond_branches(eqn: JaxprEqn) -> tuple[ClosedJaxpr, ...]:
    """A `cond` equation's branches (its first operand is the branch index, the others theirs)."""
    return tuple(eqn.params["branches"])


def under_vmaps(impl: Callable) -> Callable:
    """`impl` with one more static parameter, `vmap_in_axes`: the `in_axes` (`0` or `None` per operand)
    of the `jax.vmap`s the operation stands under, outermost first. Each batched operand carries its
    batch axes in front, in that order; so does the output, one axis per level."""

    def batched(*operands, vmap_in_axes: tuple = (), **params):
        f = lambda *a: impl(*a, **params)  # noqa: E731
        for in_axes in reversed(vmap_in_axes):
            f = jax.vmap(f, in_axes=in_axes)
        return f(*operands)

    return batched


def make_transparent_primitive(name: str, impl: Callable) -> tuple[Primitive, Callable]:
    """A primitive `p.bind(*operands, **params)` that computes `impl(*operands, **params)`.

    It is transparent: it evaluates, lowers (to `impl`'s own HLO), differentiates (JVP written in plain
    `jnp`, so JAX derives the transpose) and batches like `impl`. Under `jax.vmap` it is re-bound
    whatever operands are batched, with one more level in its `vmap_in_axes` parameter (see
    `under_vmaps`), so the tag survives batched inputs and batched weights alike.

    Returns the primitive and its implementation, `under_vmaps(impl)`.
    """
    impl = under_vmaps(impl)
    p = Primitive(name)
    p.def_impl(impl)

    def abstract_eval(*avals, **params):
        out = jax.eval_shape(lambda *a: impl(*a, **params), *avals)
        return jax.core.ShapedArray(out.shape, out.dtype)

    p.def_abstract_eval(abstract_eval)
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=False))

    def jvp(primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        _, t_out = jax.jvp(lambda *a: impl(*a, **params), primals, tangents)
        return p.bind(*primals, **params), t_out

    ad.primitive_jvps[p] = jvp

    def batch(args, dims, *, vmap_in_axes=(), **params):
        args = [a if d is None else jax.numpy.moveaxis(a, d, 0) for a, d in zip(args, dims)]
        level = tuple(None if d is None else 0 for d in dims)
        return p.bind(*args, vmap_in_axes=(level, *vmap_in_axes), **params), 0

    batching.primitive_batchers[p] = batch
    return p, impl


def source_location(eqn: JaxprEqn) -> str | None:
    """Where the user's code bound `eqn`, as `file:line (function)`, when JAX recorded it."""
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except (ImportError, AttributeError):
        return None


def bind_equation(eqn: JaxprEqn, invals) -> list:
    """Re-bind a jaxpr equation's primitive on new operands (as `jax.core.eval_jaxpr` does)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(bind_params, tuple):  # older JAX releases return `(subfuns, params)`
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return out if eqn.primitive.multiple_results else [out]
