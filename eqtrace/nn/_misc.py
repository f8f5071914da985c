import jax.numpy as jnp


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
