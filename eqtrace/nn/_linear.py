import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import matmul
from ._misc import canonical_dtype, check_positive_int, uniform_init


class Linear(eqx.Module):
    r"""Affine layer $y = x W + b$, computed by the tagged ETP operation [`eqtrace.matmul`][].

    Like `equinox.nn.Linear`, except that the weight is stored `(in_features, out_features)`, the
    layout of `eqtrace.matmul` and of the eligibility traces built on it.
    """

    weight: Float[Array, "in_features out_features"]
    bias: Float[Array, " out_features"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        *,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `in_features`: size of the input's last axis.
        - `out_features`: size of the output's last axis.
        - `use_bias`: whether to add a bias $b$.
        - `dtype`: floating dtype of the parameters; JAX's default floating dtype if `None`.
        - `key`: a `jax.random` key for the initialisation, uniform in $\pm 1/\sqrt{\text{in\_features}}$.
        """
        check_positive_int(in_features, "in_features", "Linear")
        check_positive_int(out_features, "out_features", "Linear")
        dtype = canonical_dtype(dtype, "Linear")
        self.weight, self.bias = uniform_init(
            key, (in_features, out_features), out_features, in_features, use_bias, dtype
        )
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        """**Arguments:**

        - `x`: input, shape `(..., in_features)`, of the layer's dtype.

        **Returns:**

        $x W + b$, shape `(..., out_features)`.
        """
        return matmul(x, self.weight, self.bias)
