"""The registry of ETP (eligibility-trace-propagating) operations, looked up by primitive identity."""

import dataclasses
from collections.abc import Callable

from .._jax_internals import make_transparent_primitive, Primitive


@dataclasses.dataclass(frozen=True)
class EtpOp:
    """How the compiler and the algorithms see one ETP primitive.

    **Fields:**

    - `primitive`: the JAX primitive that tags the operation in a jaxpr.
    - `impl`: the plain `jnp` computation, `impl(*operands, **params)`.
    - `has_input`: whether operand 0 is the (non-trainable) input `x`; the other operands are weights.
    - `position_diagonal`: given the operands' shapes, whether the output's positions are exactly the
      trailing axes of every weight, each output position reading its own weight entries only
      (`x @ W` with a vector `x`; `fn(w)`). Then a weight-shaped trace is exact per position.
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


_REGISTRY: dict[Primitive, EtpOp] = {}


def register_etp_op(
    name: str, impl: Callable, *, has_input: bool, position_diagonal: Callable[..., bool]
) -> EtpOp:
    op = EtpOp(make_transparent_primitive(name, impl), impl, has_input, position_diagonal)
    _REGISTRY[op.primitive] = op
    return op


def etp_op_of(primitive: Primitive) -> EtpOp | None:
    """The ETP operation bound by `primitive`, or `None` if it is not an ETP primitive."""
    return _REGISTRY.get(primitive)
