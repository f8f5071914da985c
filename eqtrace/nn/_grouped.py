import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import einsum, element_wise
from ._misc import canonical_dtype, check_positive_int, uniform_init


class GroupedLinear(eqx.Module):
    r"""Independent affine maps, one per group (populations, heads): a block-diagonal layer,
    $y_g = x_g W_g + b_g$, computed by the tagged [`eqtrace.einsum`][] `"gi,gio->go"`.

    Each group's output reads its own weights only, so the weight `(groups, in, out)` is
    position-diagonal over the output's `(groups, out)` positions: D-RTRL's trace is exact per
    position, with memory `groups · in · out · S` instead of a dense layer's
    `(groups · in) · (groups · out) · S`.
    """

    weight: Float[Array, "groups in_features out_features"]
    bias: Float[Array, "groups out_features"] | None
    groups: int = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        groups: int,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        *,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `groups`: how many independent maps.
        - `in_features`, `out_features`: each group's input and output sizes.
        - `use_bias`: whether to add a bias per group.
        - `dtype`: floating dtype of the parameters; JAX's default floating dtype if `None`.
        - `key`: a `jax.random` key; uniform initialisation in $\pm 1/\sqrt{\text{in\_features}}$.
        """
        where = "GroupedLinear"
        for name, value in (("groups", groups), ("in_features", in_features), ("out_features", out_features)):
            check_positive_int(value, name, where)
        dtype = canonical_dtype(dtype, where)
        self.weight, bias = uniform_init(
            key, (groups, in_features, out_features), groups * out_features, in_features, use_bias, dtype
        )
        self.bias = None if bias is None else bias.reshape(groups, out_features)
        self.groups, self.in_features, self.out_features = groups, in_features, out_features

    def __call__(self, x: Float[Array, "groups in_features"]) -> Float[Array, "groups out_features"]:
        """**Arguments:**

        - `x`: input, shape `(groups, in_features)`.

        **Returns:**

        `y`, shape `(groups, out_features)`.
        """
        want = (self.groups, self.in_features)
        if x.shape != want:
            raise ValueError(
                f"`GroupedLinear`: `x` must have shape {want}, got {tuple(x.shape)}; batch with `jax.vmap`."
            )
        y = einsum("gi,gio->go", x, self.weight)
        return y if self.bias is None else y + element_wise(self.bias)
