r"""D-RTRL: diagonal real-time recurrent learning.

Per relation (weight $W$, hidden group $g$ with $S$ states) a weight-shaped trace with a trailing
state axis, $\epsilon_t[\dots, n, s] = \sum_c D_t[n, s, c]\, \epsilon_{t-1}[\dots, n, c] +
\partial h_t[n, s] / \partial W[\dots, n]$ (ETP outputs held fixed), estimating
$\partial h_t/\partial W$. With `window=K` the gradient of $L_t$ is exact through the last $K$ steps
and the trace credits what lies before them:
$\nabla W \mathrel{+}= \partial L_t/\partial W|_{h_{t-K}} + \sum_{n,c} \lambda_t[n,c]\,
\epsilon_{t-K}[\dots, n, c]$, with $\lambda_t = \partial L_t/\partial h_{t-K}$.

A weight shared along some of the output's axes (a convolution's kernel, along the spatial axes)
keeps the same trace per position $p$ along them, $\epsilon_t[p, \dots, n, s]$, with
$\partial h_t[p, n, s] / \partial W[\dots, n]$ as its new term, and the gradient sums over $p$ too.
"""

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._compiler import ETraceGraph, HiddenParamOpRelation
from .._compiler._run import flatten_weights
from .._ops import etp_op
from ._inputs import check_traces
from ._one_step import advance, apply_blocks, linearise_step, unflatten_grads
from ._rule import AbstractOnlineAlgorithm
from ._window import check_window, window_init, WindowBuffer


class DRTRLTraces(eqx.Module):
    """The state that D-RTRL carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `eps`: one trace per traced (relation, hidden group) pair, shaped `weight.shape + (S,)`, or
      where the relation's operation reads a part of its weight (one gate of a fused weight), that
      part's shape `+ (S,)`; for a weight shared along the output's `shared_axes` (a convolution's
      kernel), those positions lead: `positions + weight.shape + (S,)`. With `window=K > 1`, at the
      window's anchor, `K - 1` steps behind `state`.
    - `buffer`: the [`eqtrace.WindowBuffer`][] of a window `K > 1`, else `None`.
    - `window`: the rule's window `K` (static; `0`: the learning signal through the per-position
      diagonal only).
    """

    state: object
    eps: tuple
    buffer: WindowBuffer | None = None
    window: int = eqx.field(static=True, default=1)


def traced_pairs(graph: ETraceGraph) -> list[tuple[int, int]]:
    """The (relation index, group index) pairs that D-RTRL keeps a trace for."""
    return [
        (r, g.index)
        for r, rel in enumerate(graph.hidden_param_op_relations)
        if rel.per_position
        for g in rel.hidden_groups
    ]


def d_rtrl_init(graph: ETraceGraph, params: PyTree, state: PyTree, *, window: int = 1) -> DRTRLTraces:
    """Zero D-RTRL traces for `params`, carrying the hidden `state`.

    **Arguments:**

    - `graph`: the model's [`eqtrace.ETraceGraph`][].
    - `params`: the model, or its array part `eqx.filter(model, eqx.is_array)`, frozen leaves
      included: a leaf is frozen by the `filter_spec` the graph was compiled with, and then gets no
      trace.
    - `state`: the initial hidden state pytree.
    - `window`: `K >= 1`: back-propagate each step's loss exactly through the last `K` steps
      (memory `O(K)`) and use the traces beyond; `0`: carry the learning signal back one step
      through the per-position diagonal only (the ETP operations' mixing is dropped there too).

    **Returns:**

    A [`eqtrace.DRTRLTraces`][].
    """
    buffer = window_init(graph, state, window)
    flat_w = flatten_weights(graph, params)
    eps = []
    for r, g in traced_pairs(graph):
        rel = graph.hidden_param_op_relations[r]
        w = flat_w[rel.weight_index]
        eps.append(jnp.zeros(trace_shape(rel, w.shape) + (graph.hidden_groups[g].num_state,), w.dtype))
    return DRTRLTraces(state=state, eps=tuple(eps), buffer=buffer, window=window)


def instant_trace(primitive, params: Mapping, operands: list, j: int, d_f: jax.Array) -> jax.Array:
    """`∂h_t/∂W` at this step in trace layout (`W.shape + (S,)`) for weight operand `j` of an ETP
    operation: the operation's own VJP for the weight, with `∂h/∂y` of one state at a time."""
    op = etp_op(primitive)

    def f(w):
        return op.impl(*operands[:j], w, *operands[j + 1 :], **params)

    _, vjp = jax.vjp(f, operands[j])
    # One VJP per state, stacked last: a `vmap` over the state axis would lay the result out
    # state-first and transpose it into a trace-sized copy.
    return jnp.stack([vjp(d_f[..., s])[0] for s in range(d_f.shape[-1])], axis=-1)


def position_jacobian(rel: HiddenParamOpRelation, operands: list) -> jax.Array:
    """For a weight shared along the output's `shared_axes`: `∂y[p, n]/∂W[..., n]`, each output
    position's derivative by its own entries of the weight, laid out `positions + W.shape`: the
    operation's `weight_position_jacobian` where it has one, else its own JVP, one per entry along
    the weight's input axes (a one-hot tangent there, broadcast along the weight's other axes, which
    each output position reads only at its own)."""
    op = etp_op(rel.primitive)
    j, w = rel.operand_index, operands[rel.operand_index]
    jac = own_position_jacobian(rel, operands)
    if jac is not None:
        return jac

    def f(w):
        return op.impl(*operands[:j], w, *operands[j + 1 :], **rel.params)

    _, jvp = jax.linearize(f, w)
    in_shape = tuple(w.shape[a] for a in rel.input_axes)
    n_in, n_shared = math.prod(in_shape), len(rel.shared_axes)
    basis = jnp.eye(n_in, dtype=w.dtype).reshape((n_in,) + in_shape)
    # A one-hot tangent along the input axes, the same at every entry of the other axes.
    ones = jnp.ones(tuple(1 if a in rel.input_axes else n for a, n in enumerate(w.shape)), w.dtype)
    cols = jax.vmap(lambda e: jvp(jnp.expand_dims(e, _others(rel, w.ndim)) * ones))(basis)
    # `(n_in,) + y_shape` as `in_shape + positions + the output's other axes`, then `positions + W`.
    cols = jnp.moveaxis(cols, [1 + a for a in rel.shared_axes], range(1, 1 + n_shared))
    cols = cols.reshape(in_shape + cols.shape[1:])
    k_in, others = len(in_shape), iter(range(len(in_shape) + n_shared, cols.ndim))
    order = [k_in + p for p in range(n_shared)]
    order += [rel.input_axes.index(a) if a in rel.input_axes else next(others) for a in range(w.ndim)]
    return jnp.transpose(cols, order)


def own_position_jacobian(rel: HiddenParamOpRelation, operands: list) -> jax.Array | None:
    """The operation's own form of `∂y[p, n]/∂W[..., n]` (a convolution's patches, a dense layer's
    broadcast input), or `None` where it has none for this weight."""
    op = etp_op(rel.primitive)
    if op.weight_position_jacobian is None or rel.params.get("vmap_in_axes"):
        return None
    return op.weight_position_jacobian(rel.operand_index, *operands, **rel.params)


def _others(rel: HiddenParamOpRelation, ndim: int) -> tuple[int, ...]:
    """The weight's axes that are not input axes (those that index the output's other axes)."""
    return tuple(a for a in range(ndim) if a not in rel.input_axes)


def trace_shape(rel: HiddenParamOpRelation, w_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The leading axes of `rel`'s trace (before the state axis): the weight's shape, or that of the
    part its operation reads (the other entries of the weight do not reach the operation's output),
    after the shared positions of a weight shared across positions."""
    pad = rel.position_pad or ((0, 0),) * len(w_shape)
    positions = tuple(rel.y_shape[a] for a in rel.shared_axes)
    return positions + tuple(n - lo - hi for n, (lo, hi) in zip(w_shape, pad))


def _part(rel: HiddenParamOpRelation, whole: jax.Array) -> jax.Array:
    """A weight-shaped array (`positions + weight.shape + tail`) restricted to the part `rel` reads."""
    if not rel.position_pad:
        return whole
    pad = ((0, 0),) * len(rel.shared_axes) + rel.position_pad
    pad = pad + ((0, 0),) * (whole.ndim - len(pad))
    return jax.lax.slice(whole, [lo for lo, _ in pad], [n - hi for n, (_, hi) in zip(whole.shape, pad)])


def in_weight_layout(rel: HiddenParamOpRelation, per_position: jax.Array) -> jax.Array:
    """A per-position array (`varshape + tail`) laid out as the weight's trace: broadcastable along
    the weight's input axes, after the shared positions (moved to the front) of a shared weight."""
    if not rel.shared_axes:
        return jnp.expand_dims(per_position, rel.input_axes)
    n = len(rel.shared_axes)
    per_position = jnp.moveaxis(per_position, rel.shared_axes, range(n))
    return jnp.expand_dims(per_position, tuple(n + a for a in rel.input_axes))


def contract(
    rel: HiddenParamOpRelation, signal: jax.Array, trace: jax.Array, *, batched: bool = False
) -> jax.Array:
    """`Σ_{p,n,c} signal[p, n, c] trace[p, ..., n, c]`, weight-shaped (zero outside the part `rel`
    reads): a per-position signal (`varshape + (S,)`) against a trace, broadcast along the weight's
    input axes (and summed over the shared positions of a shared weight). `batched`: both carry a
    leading batch axis, summed over too."""
    layout = lambda s: in_weight_layout(rel, s)  # noqa: E731
    signal = (jax.vmap(layout) if batched else layout)(signal)

    # The state axis as a sum of slices that keep it (size 1), not a reduction: XLA fuses it with
    # the batch sum, and a trace-sized squeeze can cost a copy of the trace.
    num_states = trace.shape[-1]
    slices = [a[..., c : c + 1] for a in (signal, trace) for c in range(num_states)]

    def product(*slices):
        return functools.reduce(
            operator.add, [s * t for s, t in zip(slices[:num_states], slices[num_states:])]
        )

    part = (batch_sum(product, *slices) if batched else product(*slices))[..., 0]
    if rel.shared_axes:
        part = jnp.sum(part, axis=tuple(range(len(rel.shared_axes))))
    return jnp.pad(part, rel.position_pad) if rel.position_pad else part


_FAN_IN = 8


def batch_sum(f: Callable, *operands: jax.Array) -> jax.Array:
    """`Σ_b f(operands[0][b], operands[1][b], ...)` for an element-wise `f`, in stages of `_FAN_IN`
    consecutive examples. XLA's CPU reduction over the leading axis of a trace-sized operand inside
    a loop runs at a tenth of memory speed, and one fusion adding many far-apart rows at once
    defeats the CPU's prefetching; a few rows at a time stream, and `f` fuses into the first stage
    instead of being written out whole."""
    n = operands[0].shape[0]
    while n > _FAN_IN:
        m = n // _FAN_IN
        # Partial sum `j` adds examples `8j … 8j + 7` (strided slices: a reshape may copy).
        strided = [[o[k : m * _FAN_IN : _FAN_IN] for o in operands] for k in range(_FAN_IN)]
        total = functools.reduce(operator.add, [f(*rows) for rows in strided])
        if n > m * _FAN_IN:  # the rows left over, as one more partial sum
            rest = [f(*(o[k] for o in operands)) for k in range(m * _FAN_IN, n)]
            total = jnp.concatenate([total, functools.reduce(operator.add, rest)[None]])
        operands, f, n = (jax.lax.optimization_barrier(total),), lambda a: a, total.shape[0]
    return functools.reduce(operator.add, [f(*(o[k] for o in operands)) for k in range(n)])


def after(value: jax.Array) -> jax.Array:
    """A zero computed from all of `value` (`-0.0`, the exact additive identity; `+0.0` where
    `value` is not finite). Added to a trace before its update, it orders the update after every
    read of the old trace that `value` needs, so that XLA overwrites the trace in place; without
    it XLA cannot order them and keeps a copy of every trace each step. It costs a pass over
    `value` and the update's overlap with other work: worth it where the traces, one per example,
    outweigh the gradient (a batch), not for one example."""
    total = jnp.sum(value)  # a reduction: one small kernel, not recomputed inside the update
    return jnp.where(jnp.isfinite(total), -jnp.zeros((), value.dtype), jnp.zeros((), value.dtype))


def trace_update(rel: HiddenParamOpRelation, g: int, lin, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The new trace of `rel` and group `g` in two parts: the past carried through the blocks,
    `D ε`, and this step's `∂h_t/∂W`."""
    operands, d_f = lin.operands[rel.eqn_index], lin.d_f[rel.eqn_index][g]
    # The operation's own `∂y/∂W` is a broadcast (fused into the update); its VJP is a product that
    # XLA writes out, often transposed.
    jac = position_jacobian(rel, operands) if rel.shared_axes else own_position_jacobian(rel, operands)
    if jac is not None:
        instant = _part(rel, jac)[..., None] * in_weight_layout(rel, d_f)
    else:
        instant = _part(rel, instant_trace(rel.primitive, rel.params, operands, rel.operand_index, d_f))
    return apply_blocks(in_weight_layout(rel, lin.d_total[g]), eps), instant


def d_rtrl_step(
    graph: ETraceGraph,
    params: PyTree,
    traces: DRTRLTraces,
    x: PyTree,
    target: PyTree,
    loss_fn: Callable,
    *,
    batched: bool = False,
) -> tuple[DRTRLTraces, PyTree, Float[Array, "*batch"], PyTree]:
    r"""Advance D-RTRL by one step.

    **Arguments:**

    - `graph`: the model's [`eqtrace.ETraceGraph`][] (a static argument under `eqx.filter_jit`).
    - `params`: the model (or its array part), as for [`eqtrace.d_rtrl_init`][].
    - `traces`: the [`eqtrace.DRTRLTraces`][] after the previous step.
    - `x`: this step's input; `target`: this step's target.
    - `loss_fn`: `loss_fn(y, target) -> scalar`, the per-step loss $L_t$.
    - `batched`: `traces` (from a `jax.vmap`-ed [`eqtrace.d_rtrl_init`][]), `x` and `target` carry
      a leading batch axis; the loss is the batch mean, and its gradient is contracted over the
      batch at this step (one weight-sized gradient instead of one per example, as
      [`eqtrace.batch_grad`][] uses it). `jax.vmap`-ing the unbatched step gives per-example
      gradients instead.

    **Returns:**

    `(traces, y, loss, grads)`: the new traces, the model output, $L_t$, and this step's
    contribution to $\nabla_\theta \sum_t L_t$ in the structure of
    `eqx.filter(params, eqx.is_inexact_array)`, `None` at frozen leaves.
    """
    check_traces(traces, DRTRLTraces, d_rtrl_init, graph, params, batched=batched)
    return trace_step(graph, params, traces, x, target, loss_fn, full_jacobian=False, batched=batched)


def trace_step(
    graph: ETraceGraph,
    params,
    traces: DRTRLTraces,
    x,
    target,
    loss_fn: Callable,
    *,
    full_jacobian: bool,
    batched: bool = False,
):
    """One step of the weight-shaped traces of D-RTRL (`full_jacobian=False`: the per-position
    blocks with ETP outputs held fixed) or of SnAp-1 (`True`: those of the full step Jacobian).

    `batched`: the traces, `x` and `target` carry a leading batch axis and the loss is the batch
    mean; the traces stay per example, the gradient is contracted over the batch at every step,
    so the carry holds one weight-sized gradient, not one per example."""
    pairs = traced_pairs(graph)
    lin = linearise_step(
        graph,
        params,
        x,
        traces.state,
        target,
        loss_fn,
        buffer=traces.buffer,
        diagonal=traces.window == 0,
        full_jacobian=full_jacobian,
        batched=batched,
    )
    grads = list(lin.grads)
    # The per-example part of the linearisation (its gradients are the batch's already).
    per_example = dataclasses.replace(lin, grads=[])
    new_eps = []
    for (r, g), eps in zip(pairs, traces.eps):
        rel = graph.hidden_param_op_relations[r]
        w = rel.weight_index
        grads[w] = grads[w] + contract(rel, lin.signal[g], eps, batched=batched)
        if batched and eps.shape[0] > 1:  # the traces outweigh the gradient: update them in place
            eps = eps + after(grads[w])
        update = lambda lin, eps: sum(trace_update(rel, g, lin, eps))  # noqa: E731
        new_eps.append((jax.vmap(update) if batched else update)(per_example, eps))
    new = DRTRLTraces(
        state=lin.new_state,
        eps=advance(lin, tuple(new_eps), traces.eps),
        buffer=lin.buffer,
        window=traces.window,
    )
    return new, lin.y, lin.loss, unflatten_grads(params, grads)


class DRTRL(AbstractOnlineAlgorithm):
    """D-RTRL (diagonal RTRL) as a rule object, for [`eqtrace.online_grad`][] and
    [`eqtrace.batch_grad`][]: `eqtrace.online_grad(..., algorithm=eqtrace.DRTRL(window=2))`. Its
    `init` and `step` are [`eqtrace.d_rtrl_init`][] and [`eqtrace.d_rtrl_step`][].

    **Fields:**

    - `window`: `K >= 1`: back-propagate each loss exactly through the last `K` steps and use the
      traces beyond; `0`: the learning signal through the per-position diagonal only.
    """

    window: int = eqx.field(static=True, default=1)
    batch_native: ClassVar[bool] = True

    def __check_init__(self):
        check_window(self.window)

    def init(self, graph, params, state):
        return d_rtrl_init(graph, params, state, window=self.window)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        return d_rtrl_step(graph, params, traces, x, target, loss_fn, batched=batched)

    def traces_relation(self, relation):
        return relation.per_position
