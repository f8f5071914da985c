import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import lora_matmul
from ._misc import canonical_dtype, check_positive_float, check_positive_int, uniform_init


class LoRALinear(eqx.Module):
    r"""A frozen affine layer with a trainable low-rank adapter: $y = x W_0 + b_0 + s\,(x A) B$.

    The base weight $W_0$ and bias $b_0$ are frozen: they enter through `jax.lax.stop_gradient`, so
    every rule gives them a zero gradient and no trace. Leave them out of the optimiser (and of the
    compiled graph, where they are then listed as frozen) with a filter:
    `filter_spec=eqtrace.nn.lora_adapters_only(model)`. The adapters $A$, $B$ go through one
    ETP operation, [`eqtrace.lora_matmul`][], so both are traced: D-RTRL traces $B$ exactly per
    position, ES-D-RTRL both $A$ and $B$.

    As in LoRA, $B$ starts at zero (the layer starts as its base) and $A$ at random.
    """

    weight: Float[Array, "in_features out_features"]
    bias: Float[Array, " out_features"] | None
    lora_a: Float[Array, "in_features rank"]
    lora_b: Float[Array, "rank out_features"]
    scale: float = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float | None = None,
        weight: Float[Array, "in_features out_features"] | None = None,
        bias: Float[Array, " out_features"] | None = None,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `in_features`, `out_features`: the layer's sizes.
        - `rank`: the adapters' rank $r$.
        - `alpha`: the adapter's scale is $s = \alpha / r$; `None`: $s = 1$.
        - `weight`, `bias`: the pretrained base $W_0$ `(in_features, out_features)` and $b_0$ (e.g.
          an [`eqtrace.nn.Linear`][]'s; no bias if only `weight` is given). Without `weight`, both
          are drawn at random (uniform in $\pm 1/\sqrt{\text{in\_features}}$; the bias with
          `use_bias`).
        - `dtype`: floating dtype of the parameters; that of `weight`, else JAX's default.
        - `key`: a `jax.random` key.
        """
        where = "LoRALinear"
        check_positive_int(in_features, "in_features", where)
        check_positive_int(out_features, "out_features", where)
        check_positive_int(rank, "rank", where)
        dtype = canonical_dtype(dtype if dtype is not None or weight is None else weight.dtype, where)
        bkey, akey = jax.random.split(key)
        w0, b0 = uniform_init(bkey, (in_features, out_features), out_features, in_features, use_bias, dtype)
        if weight is not None:
            if weight.shape != (in_features, out_features):
                raise ValueError(
                    f"`{where}`: `weight` must have shape {(in_features, out_features)}, got "
                    f"{tuple(weight.shape)}."
                )
            w0, b0 = jnp.asarray(weight, dtype), None
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(
                    f"`{where}`: `bias` must have shape {(out_features,)}, got {tuple(bias.shape)}."
                )
            b0 = jnp.asarray(bias, dtype)
        self.weight, self.bias = w0, b0
        lim = 1 / in_features**0.5
        self.lora_a = jax.random.uniform(akey, (in_features, rank), dtype, minval=-lim, maxval=lim)
        self.lora_b = jnp.zeros((rank, out_features), dtype)
        self.scale = 1.0 if alpha is None else check_positive_float(alpha, "alpha", where) / rank

    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "*batch out_features"]:
        """**Arguments:**

        - `x`: input, shape `(..., in_features)`.

        **Returns:**

        $x W_0 + b_0 + s\\,(x A) B$, shape `(..., out_features)`.
        """
        y = x @ jax.lax.stop_gradient(self.weight)
        if self.bias is not None:
            y = y + jax.lax.stop_gradient(self.bias)
        return y + lora_matmul(x, self.lora_a, self.lora_b, self.scale)


def lora_adapters_only(model):
    """A `filter_spec` for `model`, a pytree holding [`eqtrace.nn.LoRALinear`][] layers: every
    inexact array except the base weights and biases of those layers, as for
    `eqx.partition(model, filter_spec)`, `eqtrace.compile_etrace_graph(..., filter_spec=...)` or
    `eqtrace.online_grad(..., filter_spec=...)`.

    **Arguments:**

    - `model`: the model.

    **Returns:**

    A pytree of bools of `model`'s structure.
    """

    def spec(node):
        if not isinstance(node, LoRALinear):
            return eqx.is_inexact_array(node)
        out = eqx.tree_at(lambda m: m.weight, jax.tree_util.tree_map(eqx.is_inexact_array, node), False)
        return out if node.bias is None else eqx.tree_at(lambda m: m.bias, out, False)

    return jax.tree_util.tree_map(spec, model, is_leaf=lambda n: isinstance(n, LoRALinear))
