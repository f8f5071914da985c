"""The registry of ETP (eligibility-trace-propagating) operations, looked up by primitive identity."""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from .._jax_internals import make_transparent_primitive, Primitive


@dataclasses.dataclass(frozen=True)
class EtpOp:
    """How the compiler and the algorithms see one ETP primitive.

    **Fields:**

    - `primitive`: the JAX primitive that tags the operation in a jaxpr.
    - `impl`: the plain `jnp` computation, `impl(*operands, **params)`, batched over the leading axes
      that the `vmap_in_axes` parameter records (an ensemble of layers under `jax.vmap`).
    - `has_input`: whether operand 0 is the (non-trainable) input `x`; the other operands are weights.
    - `position_diagonal`: given the unbatched operands' shapes, whether the output's positions are
      exactly the trailing axes of every weight, each output position reading its own weight entries
      only (`x @ W` with a vector `x`; `fn(w)`). Then a weight-shaped trace is exact per position.
    """

    primitive: Primitive
    impl: Callable
    has_input: bool
    position_diagonal: Callable[..., bool]

    @property
    def name(self) -> str:
        return self.primitive.name

    def weight_operands(self, num_operands: int) -> range:
        return range(1 if self.has_input else 0, num_operands)

    def input_axes(
        self, j: int, shapes: Sequence[tuple[int, ...]], y_shape: tuple[int, ...], params: Mapping
    ) -> tuple[int, ...] | None:
        """For weight operand `j` of an equation with operand shapes `shapes` and output shape `y_shape`:
        the weight's axes that index no output position, when each output position reads its own
        entries of the weight (else `None`). `(0,)` for `W` in `x @ W`, `()` for a bias or `fn(w)`,
        `(1,)` for the `(E, I, O)` weight of an ensemble of `E` layers.

        Under `vmap` levels the positions are the batch axes followed by the unbatched operation's;
        a weight shared across a level (not batched there) is shared across positions.
        """
        levels = params.get("vmap_in_axes", ())
        if any(level[j] is None for level in levels):
            return None
        unbatched = [s[sum(level[i] is not None for level in levels) :] for i, s in enumerate(shapes)]
        if not self.position_diagonal(*unbatched):
            return None
        return tuple(range(len(levels), len(shapes[j]) - len(y_shape) + len(levels)))


_REGISTRY: dict[Primitive, EtpOp] = {}


def register_etp_op(
    name: str, impl: Callable, *, has_input: bool, position_diagonal: Callable[..., bool]
) -> EtpOp:
    primitive, batched_impl = make_transparent_primitive(name, impl)
    op = EtpOp(primitive, batched_impl, has_input, position_diagonal)
    _REGISTRY[op.primitive] = op
    return op


def etp_op_of(primitive: Primitive) -> EtpOp | None:
    """The ETP operation bound by `primitive`, or `None` if it is not an ETP primitive."""
    return _REGISTRY.get(primitive)
