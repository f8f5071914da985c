import hashlib

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._checks import check_operand, check_same_dtype
from ._registry import register_etp_op


class SparsePattern:
    r"""A fixed sparse connectivity from `in_features` inputs to `out_features` outputs, stored per
    output (fixed fan-in, padded): output `o` reads the inputs `indices[o, k]` for the `k` where
    `mask[o, k]`. Immutable and hashable, so that it is a static parameter of the operation (its
    arrays become constants of the compiled program).

    Build it from connections with `SparsePattern.from_connections(pre, post, in_features,
    out_features)` or from a `jax.experimental.sparse.BCOO` matrix with `SparsePattern.from_bcoo`.
    """

    def __init__(self, indices, mask, in_features: int):
        indices, mask = np.asarray(indices), np.asarray(mask, bool)
        if indices.ndim != 2 or mask.shape != indices.shape or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                "`SparsePattern`: `indices` must be an integer array of shape (out_features, fan_in) and "
                f"`mask` a boolean array of the same shape, got {indices.shape} and {mask.shape}."
            )
        if indices.size and (indices.min() < 0 or indices.max() >= in_features):
            raise ValueError(f"`SparsePattern`: `indices` must lie in [0, {in_features}).")
        self.indices = np.where(mask, indices, 0).astype(np.int32)
        self.indices.setflags(write=False)
        self.mask = mask.copy()
        self.mask.setflags(write=False)
        self.in_features = int(in_features)
        digest = hashlib.sha1(self.indices.tobytes() + self.mask.tobytes()).hexdigest()
        self._key = (self.indices.shape, self.in_features, digest)

    @classmethod
    def from_connections(cls, pre, post, in_features: int, out_features: int) -> "SparsePattern":
        """The pattern of the connections `pre[n] → post[n]` (input index to output index), each
        once; an output's connections keep their order in `pre`, `post`."""
        pre, post = np.asarray(pre).ravel(), np.asarray(post).ravel()
        if pre.shape != post.shape:
            raise ValueError(
                f"`SparsePattern`: `pre` and `post` must have one length, got {pre.size}, {post.size}."
            )
        if post.size and (post.min() < 0 or post.max() >= out_features):
            raise ValueError(f"`SparsePattern`: `post` must lie in [0, {out_features}).")
        if len(set(zip(pre.tolist(), post.tolist()))) != pre.size:
            raise ValueError("`SparsePattern`: a connection appears twice in `pre`, `post`.")
        order = np.argsort(post, kind="stable")
        counts = np.bincount(post, minlength=out_features)
        fan_in = max(int(counts.max()) if counts.size else 0, 1)
        slot = np.arange(pre.size) - np.repeat(np.cumsum(counts) - counts, counts)
        indices = np.zeros((out_features, fan_in), np.int32)
        mask = np.zeros((out_features, fan_in), bool)
        indices[post[order], slot] = pre[order]
        mask[post[order], slot] = True
        return cls(indices, mask, in_features)

    @classmethod
    def from_bcoo(cls, matrix) -> "SparsePattern":
        """The pattern of the stored entries of a `(in_features, out_features)` BCOO matrix (as the
        `W` of `x @ W`)."""
        if matrix.ndim != 2 or matrix.n_batch != 0 or matrix.n_dense != 0:
            raise ValueError(
                "`SparsePattern.from_bcoo`: expected a 2-d BCOO matrix without batch or dense axes."
            )
        idx = np.asarray(matrix.indices)
        return cls.from_connections(idx[:, 0], idx[:, 1], *matrix.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """`(in_features, out_features)`."""
        return (self.in_features, self.indices.shape[0])

    @property
    def nnz(self) -> int:
        """How many connections."""
        return int(self.mask.sum())

    def to_dense(
        self, values: Float[Array, "out_features fan_in"]
    ) -> Float[Array, "in_features out_features"]:
        """The dense `(in_features, out_features)` matrix with `values` at the connections."""
        o = np.broadcast_to(np.arange(self.indices.shape[0])[:, None], self.indices.shape)
        dense = jnp.zeros(self.shape, values.dtype)
        return dense.at[self.indices[self.mask], o[self.mask]].add(values[self.mask])

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, SparsePattern) and self._key == other._key

    def __repr__(self):
        return f"SparsePattern(in_features={self.in_features}, out_features={self.shape[1]}, nnz={self.nnz})"


def _sparse_impl(x, values, *, pattern):
    gathered = jnp.take(x, pattern.indices, axis=-1)  # (..., out, fan_in)
    return jnp.einsum("...ok,ok->...o", gathered, jnp.where(pattern.mask, values, 0))


def _input_axes(j, x_shape, values_shape, *, pattern):
    # With one input vector, output `o` reads its own row of `values`: the fan-in is the input axis.
    return (1,) if len(x_shape) == 1 else None


sparse_op = register_etp_op("etp_sparse_matmul", _sparse_impl, has_input=True, input_axes=_input_axes)
etp_sparse_matmul_p = sparse_op.primitive


def sparse_matmul(
    x: Float[Array, "*batch in_features"], values: Float[Array, "out_features fan_in"], pattern: SparsePattern
) -> Float[Array, "*batch out_features"]:
    r"""Tagged sparse product $y = x W$ with a fixed connectivity `pattern` and trainable `values`.

    $y_o = \sum_k \text{values}[o, k]\, x[\text{indices}[o, k]]$ over output `o`'s connections. Each
    output reads its own row of `values`, so with one input vector `values` is position-diagonal: its
    D-RTRL trace, shaped `(out_features, fan_in, S)`, is kept on the connections only and is exact
    per position. Padded slots (outputs with fewer connections than the largest fan-in) read nothing
    and get no gradient.

    **Arguments:**

    - `x`: input, shape `(..., in_features)`.
    - `values`: one value per connection slot, shape `(out_features, fan_in)` as the pattern's.
    - `pattern`: the [`eqtrace.SparsePattern`][].

    **Returns:**

    `y`, shape `(..., out_features)`.
    """
    where = "eqtrace.sparse_matmul"
    if not isinstance(pattern, SparsePattern):
        raise TypeError(
            f"`{where}`: `pattern` must be an `eqtrace.SparsePattern`, got {type(pattern).__name__}."
        )
    check_operand("x", x, range(1, 64), where)
    check_operand("values", values, 2, where)
    if x.shape[-1] != pattern.in_features or values.shape != pattern.indices.shape:
        raise ValueError(
            f"`{where}`: the pattern maps {pattern.in_features} inputs with slots {pattern.indices.shape}; "
            f"got `x` of shape {tuple(x.shape)} and `values` of shape {tuple(values.shape)}."
        )
    check_same_dtype(where, x=x, values=values)
    return sparse_op(x, values, pattern=pattern)
