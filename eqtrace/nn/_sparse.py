import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import element_wise, sparse_matmul, SparsePattern
from ._misc import canonical_dtype


class SparseLinear(eqx.Module):
    r"""Affine layer with a fixed sparse connectivity (connectome-style): $y = x W + b$ where $W$ has
    entries only at the pattern's connections, computed by the tagged [`eqtrace.sparse_matmul`][].

    The weight is stored per output, `values` of shape `(out_features, fan_in)` (see
    [`eqtrace.SparsePattern`][]); D-RTRL's trace lives on the connections only.
    """

    values: Float[Array, "out_features fan_in"]
    bias: Float[Array, " out_features"] | None
    pattern: SparsePattern = eqx.field(static=True)

    def __init__(self, pattern: SparsePattern, use_bias: bool = True, *, dtype=None, key: PRNGKeyArray):
        r"""**Arguments:**

        - `pattern`: the [`eqtrace.SparsePattern`][] (from connections or a BCOO matrix).
        - `use_bias`: whether to add a bias.
        - `dtype`: floating dtype of the parameters; JAX's default floating dtype if `None`.
        - `key`: a `jax.random` key; each output's values uniform in $\pm 1/\sqrt{\text{its fan-in}}$,
          the bias uniform in $\pm 1/\sqrt{\text{mean fan-in}}$.
        """
        if not isinstance(pattern, SparsePattern):
            raise TypeError(
                f"`SparseLinear`: `pattern` must be an `eqtrace.SparsePattern`, got {type(pattern).__name__}."
            )
        dtype = canonical_dtype(dtype, "SparseLinear")
        wkey, bkey = jax.random.split(key)
        fan_in = jnp.maximum(jnp.asarray(pattern.mask.sum(axis=1), dtype), 1)
        lim = (1 / jnp.sqrt(fan_in))[:, None]
        values = jax.random.uniform(wkey, pattern.indices.shape, dtype, minval=-1, maxval=1) * lim
        self.values = jnp.where(pattern.mask, values, 0)
        self.bias = None
        if use_bias:
            b = 1 / math.sqrt(max(pattern.nnz / pattern.shape[1], 1.0))
            self.bias = jax.random.uniform(bkey, (pattern.shape[1],), dtype, minval=-b, maxval=b)
        self.pattern = pattern

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        """**Arguments:**

        - `x`: input, shape `(..., in_features)`.

        **Returns:**

        $x W + b$, shape `(..., out_features)`.
        """
        y = sparse_matmul(x, self.values, self.pattern)
        return y if self.bias is None else y + jnp.broadcast_to(element_wise(self.bias), y.shape)
