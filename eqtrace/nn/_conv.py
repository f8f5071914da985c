import math
from collections.abc import Sequence

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import conv
from ._misc import canonical_dtype, check_positive_int, uniform_init


def _per_axis(value: int | Sequence, n: int, name: str, where: str) -> tuple:
    """`value` with one entry per spatial axis: an int stands for all `n` of them."""
    if isinstance(value, bool):
        raise TypeError(f"`{where}`: `{name}` must be an int or {n} values, got {value!r}.")
    return (value,) * n if isinstance(value, int) else tuple(value)


def _tuple_of_positive(value: int | Sequence[int], n: int, name: str, where: str) -> tuple[int, ...]:
    value = _per_axis(value, n, name, where)
    if len(value) != n:
        raise ValueError(f"`{where}`: `{name}` must be an int or {n} ints, got {value!r}.")
    for v in value:
        check_positive_int(v, name, where)
    return value


def _padding(
    value: str | int | Sequence[int | tuple[int, int]], n: int, where: str
) -> str | tuple[tuple[int, int], ...]:
    if isinstance(value, str):
        if value.upper() not in ("SAME", "VALID"):
            raise ValueError(f"`{where}`: `padding` must be 'SAME', 'VALID', an int or pairs, got {value!r}.")
        return value.upper()
    pairs = tuple((v, v) if isinstance(v, int) else tuple(v) for v in _per_axis(value, n, "padding", where))
    if len(pairs) != n or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(
            f"`{where}`: `padding` must be 'SAME', 'VALID', a non-negative int, or {n} ints or "
            f"(low, high) pairs, got {pairs!r}."
        )
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


class AbstractConv(eqx.Module):
    r"""Unbatched N-d convolution computed by the tagged ETP operation [`eqtrace.conv`][].

    Subclasses fix `num_spatial_dims`: [`eqtrace.nn.Conv1d`][], [`eqtrace.nn.Conv2d`][],
    [`eqtrace.nn.Conv3d`][].
    """

    num_spatial_dims: eqx.AbstractClassVar[int]

    weight: Float[Array, "out_channels in_channels *kernel_size"]
    bias: Float[Array, " out_channels"] | None
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: str | tuple[tuple[int, int], ...] = eqx.field(static=True)
    dilation: tuple[int, ...] = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
        dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        *,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `in_channels`: number of input channels.
        - `out_channels`: number of output channels.
        - `kernel_size`: an int, or one per spatial axis.
        - `stride`, `dilation`: an int, or one per spatial axis.
        - `padding`: `'SAME'`, `'VALID'`, an int, or an int or `(low, high)` pair per spatial axis.
        - `use_bias`: whether to add a bias per output channel.
        - `dtype`: floating dtype of the parameters; JAX's default floating dtype if `None`.
        - `key`: a `jax.random` key for the initialisation, uniform in $\pm 1/\sqrt{\text{fan\_in}}$
            with $\text{fan\_in} = \text{in\_channels} \cdot \prod \text{kernel\_size}$.
        """
        where = type(self).__name__
        n = self.num_spatial_dims
        check_positive_int(in_channels, "in_channels", where)
        check_positive_int(out_channels, "out_channels", where)
        kernel_size = _tuple_of_positive(kernel_size, n, "kernel_size", where)
        self.stride = _tuple_of_positive(stride, n, "stride", where)
        self.dilation = _tuple_of_positive(dilation, n, "dilation", where)
        self.padding = _padding(padding, n, where)
        dtype = canonical_dtype(dtype, where)
        self.weight, self.bias = uniform_init(
            key,
            (out_channels, in_channels) + kernel_size,
            out_channels,
            in_channels * math.prod(kernel_size),
            use_bias,
            dtype,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.use_bias = use_bias

    def __call__(
        self, x: Float[Array, " in_channels *spatial"]
    ) -> Float[Array, " out_channels *out_spatial"]:
        """**Arguments:**

        - `x`: input, shape `(in_channels, *spatial)`, of the layer's dtype. Batch with `jax.vmap`.

        **Returns:**

        The convolution plus bias, shape `(out_channels, *out_spatial)`.
        """
        if x.ndim != self.num_spatial_dims + 1:
            raise ValueError(
                f"`{type(self).__name__}`: `x` must have shape (in_channels, *spatial) with "
                f"{self.num_spatial_dims} spatial axes, got shape {tuple(x.shape)}; batch with `jax.vmap`."
            )
        return conv(
            x, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation
        )


class Conv1d(AbstractConv):
    """One-dimensional convolution: `x` of shape `(in_channels, length)`."""

    num_spatial_dims = 1
    __init__ = AbstractConv.__init__  # inherited anyway (Equinox); named for type checkers


class Conv2d(AbstractConv):
    """Two-dimensional convolution: `x` of shape `(in_channels, height, width)`."""

    num_spatial_dims = 2
    __init__ = AbstractConv.__init__


class Conv3d(AbstractConv):
    """Three-dimensional convolution: `x` of shape `(in_channels, depth, height, width)`."""

    num_spatial_dims = 3
    __init__ = AbstractConv.__init__
