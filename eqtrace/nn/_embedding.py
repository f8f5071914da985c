import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._ops import embedding
from ._misc import canonical_dtype, check_positive_int


class Embedding(eqx.Module):
    """A table of learnable token embeddings, read by the tagged [`eqtrace.embedding`][].

    Like `equinox.nn.Embedding`. Called on one token id (a scalar; batch with `jax.vmap`), its table
    is traced exactly per position by D-RTRL (see [`eqtrace.embedding`][]).
    """

    weight: Float[Array, "num_embeddings embedding_size"]
    num_embeddings: int = eqx.field(static=True)
    embedding_size: int = eqx.field(static=True)

    def __init__(self, num_embeddings: int, embedding_size: int, *, dtype=None, key: PRNGKeyArray):
        """**Arguments:**

        - `num_embeddings`: the vocabulary's size.
        - `embedding_size`: each embedding's size.
        - `dtype`: floating dtype of the table; JAX's default floating dtype if `None`.
        - `key`: a `jax.random` key; the table is drawn from a standard normal.
        """
        check_positive_int(num_embeddings, "num_embeddings", "Embedding")
        check_positive_int(embedding_size, "embedding_size", "Embedding")
        dtype = canonical_dtype(dtype, "Embedding")
        self.weight = jax.random.normal(key, (num_embeddings, embedding_size), dtype)
        self.num_embeddings, self.embedding_size = num_embeddings, embedding_size

    def __call__(self, ids: Int[Array, "*tokens"]) -> Float[Array, "*tokens embedding_size"]:
        """**Arguments:**

        - `ids`: integer token ids in `[0, num_embeddings)`.

        **Returns:**

        Their embeddings, shape `ids.shape + (embedding_size,)`.
        """
        return embedding(ids, self.weight)
