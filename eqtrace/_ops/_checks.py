import jax.numpy as jnp


def check_operand(name: str, value, ndim: int | tuple[int, ...] | range, op: str) -> None:
    """Raise a clear error when an operand is not an inexact array of the expected rank."""
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`{op}`: `{name}` must be a floating-point array, got {type(value).__name__}"
            + (f" of dtype {dtype}" if dtype is not None else "")
            + "."
        )
    if len(shape) not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"`{op}`: `{name}` must have {want} dimension(s), got shape {tuple(shape)}.")


def check_same_dtype(op: str, **arrays) -> None:
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"`{n}`: {d}" for n, d in dtypes.items())
        raise TypeError(f"`{op}`: operands must share one dtype, got {got}.")
