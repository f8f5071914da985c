import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def default_floating_dtype() -> jnp.dtype:
    """JAX's default floating dtype: float64 when x64 is enabled, float32 otherwise."""
    return jnp.zeros((), dtype=float).dtype


def canonical_dtype(dtype, where: str) -> jnp.dtype:
    """`dtype`, or the default floating dtype if `None`; a `TypeError` if it is not floating."""
    if dtype is None:
        return default_floating_dtype()
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{where}`: `dtype` must be a floating-point dtype, got {dtype}.")
    return dtype


def check_positive_int(value, name: str, where: str) -> int:
    """`value` if it is a positive `int`; otherwise a `ValueError` naming `name` and `value`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{where}`: `{name}` must be a positive int, got {value!r}.")
    return value


def check_float(value, name: str, where: str) -> float:
    """`value` as a `float` if it is a real number; otherwise a `ValueError` naming `name` and `value`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{where}`: `{name}` must be a float, got {value!r}.")
    return float(value)


def check_positive_float(value, name: str, where: str) -> float:
    """`value` as a `float` if it is a positive real number; otherwise a `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{where}`: `{name}` must be a positive float, got {value!r}.")
    return float(value)


def check_input(where: str, x: Array, size: int, dtype, name: str = "x", owner: str = "layer") -> None:
    """Host-side check of an unbatched input vector: shape `(size,)` and the `owner`'s own dtype."""
    if x.shape != (size,):
        raise ValueError(
            f"`{where}`: `{name}` must have shape ({size},), got {tuple(x.shape)}; batch with `jax.vmap`."
        )
    if x.dtype != dtype:
        raise TypeError(
            f"`{where}`: `{name}` must have the {owner}'s dtype {dtype}, got {x.dtype}; cast it with "
            f"`{name}.astype({dtype})` or build the {owner} with `dtype={x.dtype}`."
        )


def uniform_init(
    key: PRNGKeyArray, weight_shape: tuple[int, ...], bias_size: int, fan_in: int, use_bias: bool, dtype
) -> tuple[Float[Array, "..."], Float[Array, " bias_size"] | None]:
    r"""The initial weight of shape `weight_shape` and bias of shape `(bias_size,)` (`None` unless
    `use_bias`), uniform in $\pm 1/\sqrt{\text{fan\_in}}$: the weight from the first half of
    `jax.random.split(key)`, the bias from the second."""
    wkey, bkey = jax.random.split(key)
    lim = 1 / math.sqrt(fan_in)
    weight = jax.random.uniform(wkey, weight_shape, dtype=dtype, minval=-lim, maxval=lim)
    if not use_bias:
        return weight, None
    return weight, jax.random.uniform(bkey, (bias_size,), dtype=dtype, minval=-lim, maxval=lim)
