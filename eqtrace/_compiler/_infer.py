"""Inference of ETP operations in untagged models (`eqx.nn.Linear`, `eqx.nn.GRUCell`, `a * h`, ...).

On the step's flat jaxpr:

- a `dot_general` or `conv_general_dilated` with one operand computed from a single weight leaf
  through layout-only operations (transpose, reshape, broadcast, convert, slice) becomes a tagged
  linear operation whose weight operand is the leaf itself (`eqtrace.matmul` where it is `x @ W`);
- a weight leaf used only element-wise on its way to a hidden state (`a * h`, `exp(-dt / tau)`)
  becomes `eqtrace.element_wise(w)`;
- nothing is inferred through `stop_gradient`: a weight that reaches the hidden state only through
  it (the frozen base of a LoRA layer) has no gradient there, so it keeps no trace;
- an output that is only split into parts (the gates of a fused `W @ x`, `jnp.split(lin, 4)`) is
  computed part by part, each part reading its own rows of the weight: the split then no longer mixes
  positions, and each part is an operation of its own with position-wise output.

Tagged operations are left as they are: explicit tags take precedence.
"""

import dataclasses
from collections.abc import Sequence
from typing import cast

import jax
import jax.lax as lax
import jax.numpy as jnp

from .._jax_internals import (
    bind_equation,
    BODIES,
    ClosedJaxpr,
    CONV_GENERAL_DILATED,
    DOT_GENERAL,
    ELEMENTWISE,
    JaxprEqn,
    LAYOUT_OPS,
    Literal,
    SAME_LAYOUT,
    SLICE,
    SPLIT,
    SQUEEZE,
    STOP_GRADIENT,
    TRANSPOSE,
    Var,
    WEIGHT_LAYOUT,
)
from .._ops import etp_element_wise_p, etp_matmul_p, etp_op_of, register_etp_op
from ._flow import equation_flow
from ._hoist import hoist_loop_invariants


def _linear_impl(x, w, *, fn, input_axes, position_pad, shared_axes=()):
    return fn(x, w)


def _element_wise_impl(w, *, fn, input_axes, position_pad):
    return fn(w)


def _shared(*_) -> bool:
    return False


# The operations found in untagged models where no tagged one computes the same. Their layout (which
# of the weight's axes are the output's positions) is declared by the inference, in their parameters.
inferred_linear_op = register_etp_op(
    "etp_inferred_linear", _linear_impl, has_input=True, position_diagonal=_shared
)
inferred_element_wise_op = register_etp_op(
    "etp_inferred_element_wise", _element_wise_impl, has_input=False, position_diagonal=_shared
)


def declared_positions(eqn) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]] | None:
    """For an inferred operation whose output positions are entries of its weight: the weight's input
    axes, per weight axis the `(before, after)` entries outside the part it reads, and the output's
    axes along which the weight is shared (a convolution's spatial axes; `()`: none). `None` for
    other operations, and for an inferred weight shared across positions with no such layout."""
    if eqn.primitive not in (inferred_linear_op.primitive, inferred_element_wise_op.primitive):
        return None
    if eqn.params["input_axes"] is None:
        return None
    return eqn.params["input_axes"], eqn.params["position_pad"], eqn.params.get("shared_axes", ())


def _identity(w):
    return w


def _shape(v) -> tuple[int, ...]:
    return tuple(v.aval.shape)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """A value computed part by part along `axis`: `values[i]` spans `bounds[i]:bounds[i + 1]`."""

    axis: int
    bounds: tuple[int, ...]
    values: tuple

    def join(self):
        return jnp.concatenate(self.values, axis=self.axis)


@dataclasses.dataclass(frozen=True)
class _Slice:
    """`w[lo:hi]` along `axis` (hashable, as the parameters of a primitive must be)."""

    axis: int
    lo: int
    hi: int

    def __call__(self, w):
        return lax.slice_in_dim(w, self.lo, self.hi, axis=self.axis)


@dataclasses.dataclass(frozen=True, eq=False)
class _LinearFn:
    """`eqn(x, part(layout(w)))`: the traced operation on the weight leaf `w`, then `squeeze` where
    only a squeeze of size-1 axes reads its output (the batch axis of a convolution)."""

    eqn: JaxprEqn
    weight_side: int
    layout: tuple
    part: _Slice | None
    squeeze: JaxprEqn | None = None

    def __repr__(self) -> str:
        w = "w"
        for c in self.layout:
            w = f"{c.primitive.name}({w})"
        if self.part is not None:
            w = f"{w}[{self.part.lo}:{self.part.hi} along axis {self.part.axis}]"
        operands = f"x, {w}" if self.weight_side == 1 else f"{w}, x"
        out = f"{self.eqn.primitive.name}({operands})"
        return out if self.squeeze is None else f"squeeze({out})"

    def __call__(self, x, w):
        for c in self.layout:
            w = bind_equation(c, [w])[0]
        if self.part is not None:
            w = self.part(w)
        y = bind_equation(self.eqn, [x, w] if self.weight_side == 1 else [w, x])[0]
        return y if self.squeeze is None else bind_equation(self.squeeze, [y])[0]


def _slice_bounds(eqn, v) -> tuple[int, frozenset] | None:
    """The axis along which `eqn` only slices `v`, and where it cuts; `None` if it does otherwise."""
    if SPLIT is not None and eqn.primitive is SPLIT:
        axis, cuts, at = eqn.params["axis"], {0}, 0
        for size in eqn.params["sizes"]:
            at += int(size)
            cuts.add(at)
        return axis, frozenset(cuts)
    if eqn.primitive is SLICE:
        strides = eqn.params["strides"]
        if strides is not None and any(s != 1 for s in strides):
            return None
        starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
        axes = [a for a, (s, t) in enumerate(zip(starts, limits)) if (s, t) != (0, _shape(v)[a])]
        if len(axes) != 1:
            return None
        return axes[0], frozenset((int(starts[axes[0]]), int(limits[axes[0]])))
    return None


def _is_position_wise(eqn, v) -> bool:
    return eqn.primitive in ELEMENTWISE and all(_shape(o) == _shape(v) for o in eqn.outvars)


def _find_cuts(jaxpr, consumers: dict) -> dict:
    """For every variable that is only split into parts (directly, or after position-wise
    operations whose outputs are), the axis and the bounds of the parts."""
    outvars = {v for v in jaxpr.outvars if isinstance(v, Var)}
    cuts: dict = {}

    def cut_of(v):
        if v in outvars or not consumers.get(v):
            return None
        axis, bounds = None, {0}
        for eqn in consumers[v]:
            got = _slice_bounds(eqn, v)
            if got is None and _is_position_wise(eqn, v):
                got = cuts.get(eqn.outvars[0])
            if got is None or (axis is not None and got[0] != axis):
                return None
            axis = got[0]
            bounds |= set(got[1])
        if axis is None:  # no consumer
            return None
        bounds.add(_shape(v)[axis])
        return (axis, tuple(sorted(bounds))) if len(bounds) > 2 else None

    for eqn in reversed(jaxpr.eqns):
        for o in eqn.outvars:
            if isinstance(o, Var):
                got = cut_of(o)
                if got is not None:
                    cuts[o] = got
    for v in jaxpr.invars:
        got = cut_of(v)
        if got is not None:
            cuts[v] = got
    return cuts


def _leaf_axes(layout: Sequence, ndim: int) -> list[int] | None:
    """Through `layout` (transposes and layout-only operations), which axis of the weight leaf each
    axis of the operand is; `None` where another operation changes the layout."""
    perm = list(range(ndim))
    for c in layout:
        if c.primitive is TRANSPOSE:
            perm = [perm[p] for p in c.params["permutation"]]
        elif c.primitive not in SAME_LAYOUT:
            return None
    return perm


def _dot_positions(eqn, weight_side: int, layout: Sequence, w_shape) -> tuple | None:
    """For a `dot_general` of a weight leaf: the leaf's input axes, and for each output axis the
    leaf axis it is, when each output position reads its own entries of the leaf (else `None`)."""
    if eqn.primitive is not DOT_GENERAL:
        return None
    perm = _leaf_axes(layout, len(w_shape))
    if perm is None:
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if len(lb) or len(rb):
        return None
    wc, xc = (rc, lc) if weight_side == 1 else (lc, rc)
    if len(xc) != len(_shape(eqn.invars[1 - weight_side])):
        return None  # the input has axes of its own: the weight is shared across them
    out_axes = [perm[a] for a in range(len(perm)) if a not in wc]
    if out_axes != sorted(out_axes):
        return None
    return tuple(sorted(perm[a] for a in wc)), tuple(out_axes)


def _conv_positions(eqn, layout: Sequence, w_shape, squeeze) -> tuple | None:
    """For a `conv_general_dilated` of a kernel leaf: the leaf's input axes (all but its output
    feature axis) and the output's axes along which the kernel is shared (all but the feature axis),
    after `squeeze` where one reads the output; `None` where the layout is not a transpose."""
    perm = _leaf_axes(layout, len(w_shape))
    if perm is None:
        return None
    _, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    feature = out_spec[1]
    gone = set(squeeze.params["dimensions"]) if squeeze is not None else set()
    if feature in gone:
        return None
    kept = [a for a in range(len(_shape(eqn.outvars[0]))) if a not in gone]
    out = perm[rhs_spec[0]]
    return tuple(a for a in range(len(w_shape)) if a != out), tuple(
        k for k, a in enumerate(kept) if a != feature
    )


def _unread_by_bodies(eqn, v) -> bool:
    """Whether `eqn` is a loop, branch or call whose bodies do not read its operand `v` (as a
    custom derivative keeps, for its own rule, an operand whose uses were moved out of it)."""
    if eqn.primitive not in BODIES:
        return False
    reads = [k for k, u in enumerate(eqn.invars) if u is v]
    return not any(k in edges for edges in equation_flow(eqn, len(_shape(v))) for k in reads)


def _flow_mixing(eqn, mixed: dict, r: int) -> list | None:
    """For a loop, branch or call, or a layout operation: per output, whether it is reached from
    the values in `mixed` through mixing (`None` where it is not reached), following the flow of
    each output (positions being the trailing `r` axes); `None` for other equations."""
    if eqn.primitive not in BODIES and eqn.primitive not in LAYOUT_OPS:
        return None
    reads = [(k, v) for k, v in enumerate(eqn.invars) if isinstance(v, Var) and v in mixed]
    out = []
    for edges in equation_flow(eqn, r):
        hits = [mixed[v] or not edges[k] for k, v in reads if k in edges]
        out.append(any(hits) if hits else None)
    return out


def _reaches_hidden_element_wise(jaxpr, var, stops: set, cuts: dict, hidden: list) -> bool:
    """Whether `var` reaches some new hidden value, and every one it reaches, position by position
    (a split counts as position-wise where its operand is computed part by part)."""
    mixed: dict = {var: False}
    r = len(_shape(var))
    for eqn in jaxpr.eqns:
        if id(eqn) in stops or eqn.primitive is STOP_GRADIENT or etp_op_of(eqn.primitive) is not None:
            continue
        reads = [v for v in eqn.invars if isinstance(v, Var) and v in mixed]
        if not reads:
            continue
        # Through a body or a layout operation (an ODE solve, the buffer of its saved states), each
        # output by its own flow.
        cut = any(_slice_bounds(eqn, v) and v in cuts for v in reads)
        per_output = None if eqn.primitive in ELEMENTWISE or cut else _flow_mixing(eqn, mixed, r)
        if per_output is not None:
            for o, m in zip(eqn.outvars, per_output):
                if m is not None:
                    mixed[o] = m
            continue
        got = None
        for v in eqn.invars:
            if isinstance(v, Literal) or v not in mixed:
                continue
            mix = mixed[v] or not (_is_position_wise(eqn, v) or (_slice_bounds(eqn, v) and v in cuts))
            got = mix or bool(got)
        if got is not None:
            for o in eqn.outvars:
                mixed[o] = got
    reached = [mixed[h] for h in hidden if isinstance(h, Var) and h in mixed]
    return bool(reached) and not any(reached)


def infer_operations(
    closed: ClosedJaxpr, num_weights: int, num_hidden: int
) -> tuple[ClosedJaxpr, frozenset, dict[int, str]]:
    """Tag the trainable operations of an untagged flat step jaxpr (see the module's docstring),
    after moving the weight products that do not change inside a loop out of it.

    **Arguments:**

    - `closed`: the flat step, whose first `num_weights` inputs are the model's array leaves and whose
      last `num_hidden` outputs are the new hidden state.

    **Returns:**

    The step with the inferred operations tagged, the indices of its inferred ETP equations, and per
    weight index with a product left inside a loop, branch or custom derivative, where and why.
    """
    closed, notes = hoist_loop_invariants(closed, num_weights)
    jaxpr = closed.jaxpr
    trainable = [v for v in jaxpr.invars[:num_weights] if jnp.issubdtype(v.aval.dtype, jnp.inexact)]
    origin: dict = {v: (v, ()) for v in trainable}  # a variable computed from one leaf by layout only
    consumers: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, Var):
                consumers.setdefault(v, []).append(eqn)
        operand = eqn.invars[0] if len(eqn.invars) == 1 else None
        if eqn.primitive in WEIGHT_LAYOUT and isinstance(operand, Var) and operand in origin:
            leaf, layout = origin[eqn.invars[0]]
            origin[eqn.outvars[0]] = (leaf, layout + (eqn,))

    dots: dict[int, tuple[int, Var, tuple]] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive not in (DOT_GENERAL, CONV_GENERAL_DILATED):
            continue
        sides = [k for k in (0, 1) if isinstance(eqn.invars[k], Var) and eqn.invars[k] in origin]
        if len(sides) == 1 and (eqn.primitive is DOT_GENERAL or sides == [1]):
            leaf, layout = origin[eqn.invars[sides[0]]]
            dots[id(eqn)] = (sides[0], leaf, layout)
    cuts = _find_cuts(jaxpr, consumers)
    hidden = list(jaxpr.outvars[len(jaxpr.outvars) - num_hidden :])
    # A convolution's output read only by a squeeze (an unbatched layer's batch axis) is tagged
    # squeezed, so that it can reach a hidden state position by position.
    squeezes = {
        id(eqn): consumers[eqn.outvars[0]][0]
        for eqn in jaxpr.eqns
        if id(eqn) in dots
        and eqn.primitive is CONV_GENERAL_DILATED
        and eqn.outvars[0] not in jaxpr.outvars
        and len(consumers.get(eqn.outvars[0], ())) == 1
        and consumers[eqn.outvars[0]][0].primitive is SQUEEZE
    }
    squeezed = {id(s) for s in squeezes.values()}
    dot_leaves = {leaf for _, leaf, _ in dots.values()}
    element_wise = {
        v
        for v in trainable
        if v not in dot_leaves
        and v not in jaxpr.outvars
        and consumers.get(v)
        and all(_is_position_wise(eqn, v) or _unread_by_bodies(eqn, v) for eqn in consumers[v])
        and _reaches_hidden_element_wise(jaxpr, v, set(dots), cuts, hidden)
    }
    if not dots and not element_wise:
        return closed, frozenset(), notes

    inferred_flags: list[bool] = []  # per ETP operation bound, in order: whether it is inferred

    def tag(op_primitive, *operands, **params):
        inferred_flags.append(True)
        return op_primitive.bind(*operands, **params)

    def run(*args):
        env: dict = dict(zip(jaxpr.constvars, closed.consts))
        env.update(zip(jaxpr.invars, args))

        def read(v):
            if isinstance(v, Literal):
                return v.val
            val = env[v]
            return val.join() if isinstance(val, _Parts) else val

        def part(v, like, axis, lo, hi):
            """`v` restricted to the part `lo:hi` of `like` (an operand of `like`'s shape), or as
            it is (a scalar)."""
            if not isinstance(v, Literal) and isinstance(env[v], _Parts):
                p = env[v]
                if p.axis == axis and lo in p.bounds and p.bounds[p.bounds.index(lo) + 1] == hi:
                    return p.values[p.bounds.index(lo)]
            if isinstance(v, Literal) or _shape(v) != _shape(like):
                return read(v)
            if v in element_wise:
                pad = tuple((lo, _shape(v)[a] - hi) if a == axis else (0, 0) for a in range(len(_shape(v))))
                fn = _Slice(axis, lo, hi)
                return tag(
                    inferred_element_wise_op.primitive, read(v), fn=fn, input_axes=(), position_pad=pad
                )
            return lax.slice_in_dim(read(v), lo, hi, axis=axis)

        for eqn in jaxpr.eqns:
            out = eqn.outvars[0] if eqn.outvars else None
            cut = cuts.get(out) if len(eqn.outvars) == 1 and isinstance(out, Var) else None
            if id(eqn) in squeezed:
                continue  # computed by the convolution it squeezes
            if id(eqn) in squeezes:
                squeeze = squeezes[id(eqn)]
                env[squeeze.outvars[0]] = _bind_conv(eqn, *dots[id(eqn)], read, tag, squeeze)
                continue
            if id(eqn) in dots:
                outs = [_bind_dot(eqn, *dots[id(eqn)], read, cut, tag)]
            elif (
                eqn.primitive in ELEMENTWISE
                and eqn.primitive is not STOP_GRADIENT
                and any(
                    isinstance(v, Var) and (v in element_wise or isinstance(env[v], _Parts))
                    for v in eqn.invars
                )
            ):
                if cut is not None:
                    axis, bounds = cut
                    values = tuple(
                        bind_equation(eqn, [part(v, out, axis, lo, hi) for v in eqn.invars])[0]
                        for lo, hi in zip(bounds, bounds[1:])
                    )
                    outs = [_Parts(axis, bounds, values)]
                else:
                    invals = [
                        tag(etp_element_wise_p, read(v), fn=_identity)
                        if isinstance(v, Var) and v in element_wise
                        else read(v)
                        for v in eqn.invars
                    ]
                    outs = bind_equation(eqn, invals)
            elif (
                eqn.invars
                and isinstance(eqn.invars[0], Var)
                and isinstance(env[eqn.invars[0]], _Parts)
                and _slice_bounds(eqn, eqn.invars[0]) is not None
            ):
                src = eqn.invars[0]
                axis = cast(tuple, _slice_bounds(eqn, src))[0]  # not `None`: checked above
                outs = [
                    part(src, src, axis, lo, lo + _shape(o)[axis])
                    for o, lo in zip(eqn.outvars, _starts(eqn, axis))
                ]
            else:
                if etp_op_of(eqn.primitive) is not None:
                    inferred_flags.append(False)
                outs = bind_equation(eqn, [read(v) for v in eqn.invars])
            for v, val in zip(eqn.outvars, outs):
                if isinstance(v, Var):
                    env[v] = val
        return [read(v) for v in jaxpr.outvars]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars]
    new = jax.make_jaxpr(run)(*avals)
    etp_eqns = [e for e, eqn in enumerate(new.jaxpr.eqns) if etp_op_of(eqn.primitive) is not None]
    return new, frozenset(e for e, flag in zip(etp_eqns, inferred_flags) if flag), notes


def _starts(eqn, axis: int) -> list[int]:
    """Where each output of a `slice` or `split` equation starts along `axis`."""
    if eqn.primitive is SLICE:
        return [int(eqn.params["start_indices"][axis])]
    starts, at = [], 0
    for size in eqn.params["sizes"]:
        starts.append(at)
        at += int(size)
    return starts


def _bind_conv(eqn, weight_side: int, leaf, layout: tuple, read, tag, squeeze=None):
    """The tagged form of a `conv_general_dilated` of the kernel `leaf` (then `squeeze`d): the
    inferred linear operation, shared along the output's axes other than its feature axis."""
    x, w = read(eqn.invars[1 - weight_side]), read(leaf)
    positions = _conv_positions(eqn, layout, _shape(leaf), squeeze)
    input_axes, shared = (None, ()) if positions is None else positions
    pad = tuple((0, 0) for _ in range(w.ndim))
    fn = _LinearFn(eqn, weight_side, layout, None, squeeze)
    return tag(
        inferred_linear_op.primitive, x, w, fn=fn, input_axes=input_axes, position_pad=pad, shared_axes=shared
    )


def _bind_dot(eqn, weight_side: int, leaf, layout: tuple, read, cut, tag):
    """The tagged form of a `dot_general`/`conv_general_dilated` of the weight `leaf`: `eqtrace.matmul`
    where it is `x @ W`, else the inferred linear operation (computed part by part along `cut`)."""
    if eqn.primitive is CONV_GENERAL_DILATED:
        return _bind_conv(eqn, weight_side, leaf, layout, read, tag)
    x, w = read(eqn.invars[1 - weight_side]), read(leaf)
    positions = _dot_positions(eqn, weight_side, layout, _shape(leaf))
    if (
        eqn.primitive is DOT_GENERAL
        and weight_side == 1
        and not layout
        and cut is None
        and _is_matmul(eqn, x, w)
    ):
        return tag(etp_matmul_p, x, w)
    if positions is None or cut is None:
        input_axes = None if positions is None else positions[0]
        pad = tuple((0, 0) for _ in range(w.ndim))
        fn = _LinearFn(eqn, weight_side, layout, None)
        return tag(inferred_linear_op.primitive, x, w, fn=fn, input_axes=input_axes, position_pad=pad)
    input_axes, out_axes = positions
    axis, bounds = cut
    w_axis = out_axes[axis]
    # The same axis of the operand the dot reads: the leaf's axis `w_axis`, after the transposes.
    operand_axis = _operand_axis(layout, w_axis, w.ndim)
    values = []
    for lo, hi in zip(bounds, bounds[1:]):
        pad = tuple((lo, w.shape[a] - hi) if a == w_axis else (0, 0) for a in range(w.ndim))
        fn = _LinearFn(eqn, weight_side, layout, _Slice(operand_axis, lo, hi))
        values.append(tag(inferred_linear_op.primitive, x, w, fn=fn, input_axes=input_axes, position_pad=pad))
    return _Parts(axis, bounds, tuple(values))


def _is_matmul(eqn, x, w) -> bool:
    """Whether a `dot_general` of `x` and the weight `w` is `x @ w` (as `eqtrace.matmul` computes)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return (
        w.ndim == 2
        and x.ndim >= 1
        and x.dtype == w.dtype == eqn.outvars[0].aval.dtype
        and tuple(lc) == (x.ndim - 1,)
        and tuple(rc) == (0,)
        and not len(lb)
        and not len(rb)
    )


def _operand_axis(layout: tuple, leaf_axis: int, ndim: int) -> int:
    perm = list(range(ndim))
    for c in layout:
        if c.primitive is TRANSPOSE:
            perm = [perm[p] for p in c.params["permutation"]]
    return perm.index(leaf_axis)
