from collections.abc import Sequence

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_operand, check_same_dtype
from ._registry import register_etp_op


def _conv_impl(x, w, b=None, *, stride, padding, dilation):
    y = lax.conv_general_dilated(x[None], w, window_strides=stride, padding=padding, rhs_dilation=dilation)[0]
    if b is not None:
        y = y + jnp.broadcast_to(b.reshape(b.shape + (1,) * (w.ndim - 2)), y.shape)
    return y


def _shared_axes(j, x_shape, w_shape, *_, **__):
    """The kernel (`O, C, *kernel`) and the bias (`O`) are shared along the output's spatial axes,
    each output channel reading its own entries."""
    spatial = tuple(range(1, len(w_shape) - 1))
    return (tuple(range(1, len(w_shape))) if j == 1 else ()), spatial


def _position_jacobian(j, x, w, *_, stride, padding, dilation):
    """`∂y[o, p]/∂W[o, c, k] = x_patch[p][c, k]` (the same for every output channel `o`): the
    kernel's patches, `spatial + W.shape`; for the bias, `None` (its JVP is one call)."""
    if j != 1:
        return None
    n = w.ndim - 2
    patches = lax.conv_general_dilated_patches(
        x[None], w.shape[2:], stride, padding, rhs_dilation=dilation, precision=lax.Precision.HIGHEST
    )[0]
    patches = patches.reshape(w.shape[1:] + patches.shape[1:])  # (C, *kernel, *spatial)
    patches = jnp.moveaxis(patches, range(n + 1, 2 * n + 1), range(n))  # (*spatial, C, *kernel)
    return jnp.broadcast_to(jnp.expand_dims(patches, n), patches.shape[:n] + w.shape)


conv_op = register_etp_op(
    "etp_conv",
    _conv_impl,
    has_input=True,
    shared_axes=_shared_axes,
    position_jacobian=_position_jacobian,
)
etp_conv_p = conv_op.primitive


def _as_tuple(name: str, value, n: int) -> tuple[int, ...]:
    value = (value,) * n if isinstance(value, int) else tuple(value)
    if len(value) != n or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"`eqtrace.conv`: `{name}` must be a positive int or {n} of them, got {value}.")
    return value


def conv(
    x: Float[Array, " in_channels *spatial"],
    w: Float[Array, "out_channels in_channels *kernel"],
    b: Float[Array, " out_channels"] | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    dilation: int | Sequence[int] = 1,
) -> Float[Array, " out_channels *out_spatial"]:
    """Tagged N-d convolution with `lax.conv_general_dilated` semantics (channels first, `OIHW` kernel).

    Unbatched like Equinox's `Conv` (`x` is `(in_channels, *spatial)`); batch with `jax.vmap`.

    **Arguments:**

    - `x`: input, shape `(in_channels, *spatial)`.
    - `w`: kernel, shape `(out_channels, in_channels, *kernel_size)`.
    - `b`: optional bias, shape `(out_channels,)`.
    - `stride`, `dilation`: an int or one per spatial axis.
    - `padding`: `'SAME'`, `'VALID'`, or a `(low, high)` pair per spatial axis.

    **Returns:**

    `y`, shape `(out_channels, *out_spatial)`.
    """
    check_operand("w", w, (3, 4, 5), "eqtrace.conv")
    n = w.ndim - 2
    check_operand("x", x, n + 1, "eqtrace.conv")
    if x.shape[0] != w.shape[1]:
        raise ValueError(
            f"`eqtrace.conv`: `x` has {x.shape[0]} channels (shape {tuple(x.shape)}) but `w` expects "
            f"{w.shape[1]} (shape {tuple(w.shape)})."
        )
    if b is not None:
        check_operand("b", b, 1, "eqtrace.conv")
        if b.shape != (w.shape[0],):
            raise ValueError(f"`eqtrace.conv`: `b` must have shape {(w.shape[0],)}, got {tuple(b.shape)}.")
    check_same_dtype("eqtrace.conv", x=x, w=w, b=b)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"`eqtrace.conv`: `padding` must be 'SAME', 'VALID' or pairs, got {padding!r}.")
        padding = padding.upper()
    else:
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    params = dict(
        stride=_as_tuple("stride", stride, n), padding=padding, dilation=_as_tuple("dilation", dilation, n)
    )
    operands = (x, w) if b is None else (x, w, b)
    return etp_conv_p.bind(*operands, **params)
