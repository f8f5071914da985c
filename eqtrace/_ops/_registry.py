"""The registry of ETP (eligibility-trace-propagating) operations, looked up by primitive identity."""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from .._jax_internals import make_transparent_primitive, Primitive


@dataclasses.dataclass(frozen=True)
class EtpOp:
    """How the compiler and the algorithms see one ETP primitive, as [`eqtrace.register_etp_op`][]
    makes it. Calling it, `op(*operands, **params)`, binds the primitive.

    **Fields:**

    - `primitive`: the JAX primitive that tags the operation in a jaxpr.
    - `impl`: the plain `jnp` computation, `impl(*operands, **params)`, batched over the leading axes
      that the `vmap_in_axes` parameter records (an ensemble of layers under `jax.vmap`).
    - `has_input`: whether operand 0 is the (non-trainable) input `x`; the other operands are weights.
    - `position_diagonal`: given the unbatched operands' shapes, whether the output's positions are
      exactly the trailing axes of every weight, each output position reading its own weight entries
      only (`x @ W` with a vector `x`; `fn(w)`). Then a weight-shaped trace is exact per position.
    - `weight_input_axes`: optional, in place of `position_diagonal` for other layouts: given the
      weight operand's index `j`, the unbatched operands' shapes and the static parameters, the
      weight's axes that index no output position (its other axes being the output's, in order),
      or `None` where the weight is shared across positions.
    - `weight_shared_axes`: optional, for a weight shared across positions: given the weight
      operand's index `j`, the unbatched operands' shapes and the static parameters,
      `(input_axes, shared_axes)`: the output's axes along which the weight is shared, each output
      position reading the weight's entries along its input axes at its other axes (the output's
      other axes, in order); or `None`.
    - `weight_position_jacobian`: optional: given `j`, the unbatched operands and the static
      parameters, `∂y[p, n]/∂W[..., n]` laid out as `shared positions + weight.shape` (a
      convolution's patches; `weight.shape` for a position-diagonal weight, a dense layer's broadcast
      input), or `None`; without it, the rules use the operation's JVP or VJP.
    """

    primitive: Primitive
    impl: Callable
    has_input: bool
    position_diagonal: Callable[..., bool]
    weight_input_axes: Callable[..., tuple[int, ...] | None] | None = None
    weight_shared_axes: Callable[..., tuple[tuple[int, ...], tuple[int, ...]] | None] | None = None
    weight_position_jacobian: Callable | None = None

    @property
    def name(self) -> str:
        return self.primitive.name

    def __call__(self, *operands, **params):
        """Bind the primitive: `op(*operands, **params)` computes `impl(*operands, **params)`, tagged.
        `params` are static (hashable) values: numbers, strings, tuples, functions."""
        return self.primitive.bind(*operands, **params)

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
        if self.weight_input_axes is None:
            if not self.position_diagonal(*unbatched):
                return None
            axes = tuple(range(len(unbatched[j]) - len(y_shape) + len(levels)))
        else:
            static = {k: v for k, v in params.items() if k != "vmap_in_axes"}
            axes = self.weight_input_axes(j, *unbatched, **static)
            if axes is None:
                return None
            axes = tuple(sorted(int(a) % max(len(unbatched[j]), 1) for a in axes))
        rest = tuple(d for a, d in enumerate(unbatched[j]) if a not in axes)
        if rest != tuple(y_shape[len(levels) :]):
            if self.weight_input_axes is None:
                return None
            raise ValueError(
                f"ETP operation `{self.name}`: weight operand {j} (shape {tuple(unbatched[j])}) with "
                f"input axes {axes} leaves the axes {rest}, which must be the output's "
                f"{tuple(y_shape[len(levels) :])} in order; fix the operation's `input_axes`."
            )
        return tuple(len(levels) + a for a in axes)

    def shared_layout(
        self, j: int, shapes: Sequence[tuple[int, ...]], y_shape: tuple[int, ...], params: Mapping
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """For weight operand `j`, shared across positions: `(input_axes, shared_axes)`, the weight's
        axes that index no output position and the output's axes along which the weight is shared
        (see `weight_shared_axes`), or `None` where the operation declares no such layout. Under
        `vmap` levels, a weight batched at every level keeps a position axis per level (an ensemble
        of convolutions); one shared across a level has no such layout."""
        levels = params.get("vmap_in_axes", ())
        if self.weight_shared_axes is None or any(level[j] is None for level in levels):
            return None
        unbatched = [s[sum(level[i] is not None for level in levels) :] for i, s in enumerate(shapes)]
        static = {k: v for k, v in params.items() if k != "vmap_in_axes"}
        got = self.weight_shared_axes(j, *unbatched, **static)
        if got is None:
            return None
        n_w, n_y = max(len(unbatched[j]), 1), max(len(y_shape) - len(levels), 1)
        axes = tuple(sorted(int(a) % n_w for a in got[0]))
        shared = tuple(sorted(int(a) % n_y for a in got[1]))
        rest = tuple(d for a, d in enumerate(unbatched[j]) if a not in axes)
        others = tuple(d for a, d in enumerate(y_shape[len(levels) :]) if a not in shared)
        if rest != others:
            raise ValueError(
                f"ETP operation `{self.name}`: weight operand {j} (shape {tuple(unbatched[j])}) with "
                f"input axes {axes} leaves the axes {rest}, which must be the output's axes outside "
                f"the shared axes {shared}, {others}, in order; fix the operation's `shared_axes`."
            )
        n = len(levels)
        return tuple(n + a for a in axes), tuple(n + a for a in shared)


_REGISTRY: dict[Primitive, EtpOp] = {}


def register_etp_op(
    name: str,
    impl: Callable,
    *,
    has_input: bool,
    position_diagonal: Callable[..., bool] | None = None,
    input_axes: Callable[..., tuple[int, ...] | None] | None = None,
    shared_axes: Callable[..., tuple[tuple[int, ...], tuple[int, ...]] | None] | None = None,
    position_jacobian: Callable | None = None,
) -> EtpOp:
    r"""Define an ETP operation of one's own: a new JAX primitive that computes `impl`, which
    [`eqtrace.compile_etrace_graph`][] recognises and every online rule traces.

    The primitive is transparent (the values, derivatives, batching and compiled code of `impl`
    itself); the rules read the operation through `impl`'s own JVP/VJP, so only the trace layout is
    declared. Without `position_diagonal`, `input_axes` or `shared_axes`, every weight counts as
    shared across the output's positions with no known layout: ES-D-RTRL traces it, D-RTRL gives it
    its exact gradient within the window.

    **Arguments:**

    - `name`: the primitive's name, shown in jaxprs and graphs.
    - `impl`: the computation, `impl(*operands, **params) -> y`, in plain `jax.numpy`, for unbatched
      operands (it is `jax.vmap`-ed as needed); any differentiable function of the operands.
    - `has_input`: whether operand 0 is the (non-trainable) input `x`; the other operands are weights.
      An input lets ES-D-RTRL keep its low-cost input trace ($\bar x$).
    - `position_diagonal`: `position_diagonal(*shapes) -> bool`, given the unbatched operands'
      shapes: whether each output position reads its own entries of every weight, the output's axes
      being the weights' *trailing* axes (`x @ W` with a vector `x`). Then D-RTRL's weight-shaped
      trace is exact per position.
    - `input_axes`: instead of `position_diagonal`, for any other layout:
      `input_axes(j, *shapes, **params)`, for weight operand `j`, the weight's axes that index no
      output position (the others must be the output's axes, in order), or `None` where the weight
      is shared across positions.
    - `shared_axes`: for a weight shared across positions along some of the output's axes (a
      convolution's kernel along the spatial axes): `shared_axes(j, *shapes, **params)`, for weight
      operand `j`, `(input_axes, shared_axes)`: the output's axes along which the weight is shared,
      each output position reading the weight's entries along its `input_axes` at its other axes
      (the output's other axes, in order), or `None`. Then D-RTRL keeps a trace per position along
      the shared axes (`positions × weight × states`), exact per position.
    - `position_jacobian`: optional: `position_jacobian(j, *operands, **params)`, for weight operand
      `j` of unbatched operands, `∂y[p, n]/∂W[..., n]` laid out as `shared positions + weight.shape`
      (with `shared_axes`; `weight.shape` for a position-diagonal weight), or `None`: a faster form
      of what the rules otherwise get from the operation's JVP or VJP (a convolution's patches, a
      dense layer's input broadcast along the outputs).

    **Returns:**

    The [`eqtrace.EtpOp`][]: call it, `op(*operands, **params)`, to bind the primitive (`params` are
    static and hashable), and find the primitive as `op.primitive`.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`register_etp_op`: `name` must be a non-empty string, got {name!r}.")
    if not callable(impl):
        raise TypeError(f"`register_etp_op`: `impl` must be callable, got {type(impl).__name__}.")
    if not isinstance(has_input, bool):
        raise TypeError(f"`register_etp_op`: `has_input` must be a bool, got {has_input!r}.")
    if position_diagonal is not None and input_axes is not None:
        raise ValueError("`register_etp_op`: give `position_diagonal` or `input_axes`, not both.")
    for arg, value in (
        ("position_diagonal", position_diagonal),
        ("input_axes", input_axes),
        ("shared_axes", shared_axes),
        ("position_jacobian", position_jacobian),
    ):
        if value is not None and not callable(value):
            raise TypeError(f"`register_etp_op`: `{arg}` must be callable, got {type(value).__name__}.")
    if position_diagonal is None:
        position_diagonal = _never
    primitive, batched_impl = make_transparent_primitive(name, impl)
    op = EtpOp(
        primitive, batched_impl, has_input, position_diagonal, input_axes, shared_axes, position_jacobian
    )
    _REGISTRY[op.primitive] = op
    return op


def _never(*_) -> bool:
    return False


def etp_op_of(primitive: Primitive) -> EtpOp | None:
    """The ETP operation bound by `primitive`, or `None` if it is not an ETP primitive."""
    return _REGISTRY.get(primitive)


def etp_op(primitive: Primitive) -> EtpOp:
    """The ETP operation bound by `primitive`, which must be an ETP primitive (a relation's)."""
    op = _REGISTRY.get(primitive)
    if op is None:
        raise ValueError(f"`{primitive}` is not an ETP primitive: register it with `register_etp_op`.")
    return op
