"""Every use of JAX's internal APIs lives here, so that a JAX release that moves them breaks one file.

Public JAX (`jax.numpy`, `jax.lax`, `jax.make_jaxpr`, ...) is used freely elsewhere; what follows is
the primitive-registration API and the jaxpr data structures that the compiler reads.
"""

from collections.abc import Callable

import jax
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
REMAT = jex_primitives.remat_p
CONTROL_FLOW = (jex_primitives.scan_p, jex_primitives.while_p, jex_primitives.cond_p)

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
BROADCAST_IN_DIM = jex_primitives.broadcast_in_dim_p


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


def make_transparent_primitive(name: str, impl: Callable) -> Primitive:
    """A primitive `p.bind(*operands, **params)` that computes `impl(*operands, **params)`.

    It is transparent: it evaluates, lowers (to `impl`'s own HLO), differentiates (JVP written in plain
    `jnp`, so JAX derives the transpose) and batches like `impl`. `impl` must accept extra leading axes
    on operand 0: under `vmap` with only operand 0 batched the primitive is re-bound, so the tag
    survives; other batchings evaluate `impl` untagged.
    """
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

    def batch(args, dims, **params):
        if len(args) > 1 and all(d is None for d in dims[1:]):
            x = jax.numpy.moveaxis(args[0], dims[0], 0)
            return p.bind(x, *args[1:], **params), 0
        return jax.vmap(lambda *a: impl(*a, **params), in_axes=tuple(dims))(*args), 0

    batching.primitive_batchers[p] = batch
    return p


def bind_equation(eqn: JaxprEqn, invals) -> list:
    """Re-bind a jaxpr equation's primitive on new operands (as `jax.core.eval_jaxpr` does)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(bind_params, tuple):  # older JAX releases return `(subfuns, params)`
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return out if eqn.primitive.multiple_results else [out]
