import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_operand, check_same_dtype
from ._registry import register_etp_op


def _matmul_impl(x, w, b=None):
    y = jnp.matmul(x, w)
    return y if b is None else y + jnp.broadcast_to(b, y.shape)


def _position_jacobian(j, x, w, b=None):
    """`∂y[n]/∂W[i, n] = x[i]` and `∂y[n]/∂b[n] = 1`, for a vector `x` (position-diagonal)."""
    if x.ndim != 1:
        return None
    if j == 1:
        return jnp.broadcast_to(x[:, None], w.shape)
    return None if b is None else jnp.ones_like(b)


matmul_op = register_etp_op(
    "etp_matmul",
    _matmul_impl,
    has_input=True,
    position_diagonal=lambda x_shape, *_: len(x_shape) == 1,
    position_jacobian=_position_jacobian,
)
etp_matmul_p = matmul_op.primitive


def matmul(
    x: Float[Array, "*batch in_features"],
    w: Float[Array, "in_features out_features"],
    b: Float[Array, " out_features"] | None = None,
) -> Float[Array, "*batch out_features"]:
    r"""Tagged affine map $y = x W + b$: the ETP operation of dense layers.

    Numerically identical to `x @ w + b`, and as fast; the tag lets
    [`eqtrace.compile_etrace_graph`][] find `w` (and `b`) as online-trainable weights.

    **Arguments:**

    - `x`: input, shape `(..., in_features)`.
    - `w`: weight, shape `(in_features, out_features)`.
    - `b`: optional bias, shape `(out_features,)`.

    **Returns:**

    `y`, shape `(..., out_features)`.
    """
    check_operand("x", x, range(1, 64), "eqtrace.matmul")
    check_operand("w", w, 2, "eqtrace.matmul")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"`eqtrace.matmul`: the last axis of `x` (shape {tuple(x.shape)}) must match the first axis "
            f"of `w` (shape {tuple(w.shape)})."
        )
    if b is not None:
        check_operand("b", b, 1, "eqtrace.matmul")
        if b.shape != (w.shape[1],):
            raise ValueError(f"`eqtrace.matmul`: `b` must have shape {(w.shape[1],)}, got {tuple(b.shape)}.")
    check_same_dtype("eqtrace.matmul", x=x, w=w, b=b)
    operands = (x, w) if b is None else (x, w, b)
    return etp_matmul_p.bind(*operands)
