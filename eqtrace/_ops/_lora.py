from jaxtyping import Array, Float

from ._checks import check_operand, check_same_dtype
from ._registry import register_etp_op


def _lora_impl(x, a, b, *, scale):
    return scale * ((x @ a) @ b)


def _input_axes(j, x_shape, a_shape, b_shape, *, scale):
    # `y[o]` reads the column `B[:, o]` only (with one input vector), but every entry of `A`.
    return (0,) if j == 2 and len(x_shape) == 1 else None


lora_op = register_etp_op("etp_lora_matmul", _lora_impl, has_input=True, input_axes=_input_axes)
etp_lora_matmul_p = lora_op.primitive


def lora_matmul(
    x: Float[Array, "*batch in_features"],
    a: Float[Array, "in_features rank"],
    b: Float[Array, "rank out_features"],
    scale: float = 1.0,
) -> Float[Array, "*batch out_features"]:
    r"""Tagged low-rank product $y = s\,(x A) B$: a low-rank adapter, as one ETP operation with two
    weights, so that both factors are traced.

    With one input vector, each output $y_o$ reads the column $B_{:, o}$ only: $B$ is
    position-diagonal and D-RTRL traces it exactly per position ($B$'s trace has shape
    `(rank, out_features, S)`). Every output reads all of $A$, which is shared across positions:
    ES-D-RTRL traces it (and $B$) through its input trace $\bar x$; D-RTRL gives it its exact gradient
    within the window.

    **Arguments:**

    - `x`: input, shape `(..., in_features)`.
    - `a`: down-projection, shape `(in_features, rank)`.
    - `b`: up-projection, shape `(rank, out_features)`.
    - `scale`: a fixed factor $s$ (LoRA's $\alpha / r$).

    **Returns:**

    `y`, shape `(..., out_features)`.
    """
    where = "eqtrace.lora_matmul"
    check_operand("x", x, range(1, 64), where)
    check_operand("a", a, 2, where)
    check_operand("b", b, 2, where)
    if x.shape[-1] != a.shape[0] or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"`{where}`: shapes do not chain: `x` {tuple(x.shape)}, `a` {tuple(a.shape)}, `b` "
            f"{tuple(b.shape)}; expected `(..., I)`, `(I, R)`, `(R, O)`."
        )
    check_same_dtype(where, x=x, a=a, b=b)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`{where}`: `scale` must be a Python number, got {type(scale).__name__}.")
    return lora_op(x, a, b, scale=float(scale))
