import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._checks import check_operand
from ._registry import register_etp_op


def _embedding_impl(ids, table):
    return jnp.take(table, ids, axis=0, mode="clip")


def _input_axes(j, ids_shape, table_shape):
    # One token: `y[d]` reads `table[id, d]`, so the vocabulary is the table's input axis. Several
    # tokens in one call share the table across their positions.
    return (0,) if j == 1 and len(ids_shape) == 0 else None


# The token ids are an operand, not an input trace: ES-D-RTRL credits the rows read at each step.
embedding_op = register_etp_op("etp_embedding", _embedding_impl, has_input=False, input_axes=_input_axes)
etp_embedding_p = embedding_op.primitive


def embedding(
    ids: Int[Array, "*tokens"], table: Float[Array, "vocab features"]
) -> Float[Array, "*tokens features"]:
    r"""Tagged table look-up: `table[ids]`, the rows of the token ids (clipped to the vocabulary).

    With one token id per call (a scalar; batch with `jax.vmap`), each output feature $y_d$ reads
    `table[id, d]`: the table is position-diagonal with the vocabulary as its input axis, and
    D-RTRL's trace, shaped `(vocab, features, S)`, is exact per position. Each step writes the
    current token's row of it and decays every row: a row read once keeps acting on the state
    through the recurrence, so an exact trace covers the whole vocabulary, not only this step's rows.
    ES-D-RTRL keeps no trace over the vocabulary: it credits the rows read at each step with the
    output trace ($\bar x$ is the current token, as with `decay=0`). With several ids per call, the
    table is shared across their positions.

    **Arguments:**

    - `ids`: integer token ids in `[0, vocab)`, any shape.
    - `table`: the embedding table, shape `(vocab, features)`.

    **Returns:**

    `table[ids]`, shape `ids.shape + (features,)`.
    """
    check_operand("table", table, 2, "eqtrace.embedding")
    if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
        got = getattr(ids, "dtype", type(ids).__name__)
        raise TypeError(f"`eqtrace.embedding`: `ids` must be an integer array, got {got}.")
    return embedding_op(jnp.asarray(ids), table)
