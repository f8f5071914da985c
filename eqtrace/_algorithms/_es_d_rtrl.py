r"""ES-D-RTRL (pp_prop): D-RTRL's trace factorised into an input trace and an output trace.

Per ETP operation with input $x$, an input trace $\bar x_t = \alpha \bar x_{t-1} + x_t$, used as
its weighted mean $\hat x_t = \bar x_t / \sum_k \alpha^k$ (or as the sum, `normalise=False`); per
operation and hidden group, an output trace $\bar f_t = D_t \bar f_{t-1} + D_{f,t}$
(`varshape + (S,)`). The weight's sensitivity $\partial h_t/\partial W$ is estimated by
$\hat x_t \otimes \bar f_t$, exact for a constant input. With `window=K` (see
[`eqtrace.d_rtrl_init`][]) the gradient is $\nabla W \mathrel{+}= \partial L_t/\partial W|_{h_{t-K}}
+ \mathrm{VJP}_W\big(\mathrm{op}(\hat x_{t-K}, W),\ \textstyle\sum_c \bar f_{t-K}[\dots, c]\,
\lambda_t[\dots, c]\big)$ with $\lambda_t = \partial L_t/\partial h_{t-K}$. Memory per operation:
the input's size plus $N \cdot S$ per group.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._compiler import ETraceGraph, HiddenParamOpRelation
from .._compiler._run import flatten_weights
from .._ops import etp_op
from ._inputs import check_traces
from ._one_step import advance, apply_blocks, linearise_step, matmul_weights, unflatten_grads
from ._rule import AbstractDeferringAlgorithm, GradFactors
from ._window import check_window, window_init, WindowBuffer


class ESDRTRLTraces(eqx.Module):
    """The state that ES-D-RTRL carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `x_bar`: one input trace per traced ETP operation that has an input (shape of that input).
    - `f_bar`: one output trace per (traced operation, hidden group), `varshape + (S,)`.
    - `x_weight`: $\\sum_k \\alpha^k$ over the steps the input traces hold, by which they are
      normalised (a count of time steps, not of calls).
    - `buffer`: the [`eqtrace.WindowBuffer`][] of a window `K > 1`, else `None`.
    - `decay`, `normalise`, `window`: the rule's options (static).
    """

    state: object
    x_bar: tuple
    f_bar: tuple
    x_weight: jax.Array
    buffer: WindowBuffer | None = None
    decay: float = eqx.field(static=True, default=0.9)
    normalise: bool = eqx.field(static=True, default=True)
    window: int = eqx.field(static=True, default=1)


def check_decay(decay) -> None:
    if isinstance(decay, bool) or not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        raise ValueError(f"`decay` must be a number in [0, 1], got {decay!r}.")


def _traced_operations(graph: ETraceGraph) -> list[tuple[list[HiddenParamOpRelation], tuple[int, ...]]]:
    """The ETP operations in some relation, in order: each with its relations (one per weight
    operand) and the indices of the groups its output reaches."""
    by_eqn: dict[int, list[HiddenParamOpRelation]] = {}
    for rel in graph.hidden_param_op_relations:
        by_eqn.setdefault(rel.eqn_index, []).append(rel)
    return [(rels, tuple(g.index for g in rels[0].hidden_groups)) for _, rels in sorted(by_eqn.items())]


def es_d_rtrl_init(
    graph: ETraceGraph,
    params: PyTree,
    state: PyTree,
    decay: float = 0.9,
    *,
    normalise: bool = True,
    window: int = 1,
) -> ESDRTRLTraces:
    """Zero ES-D-RTRL traces, carrying the hidden `state`.

    **Arguments:**

    - `graph`, `params`, `state`: as for [`eqtrace.d_rtrl_init`][].
    - `decay`: $\\alpha \\in [0, 1]$, how much of the past input the input trace keeps.
    - `normalise`: use the input trace's weighted mean $\\bar x_t / \\sum_k \\alpha^k$ (exact for a
      constant input, and of the magnitude of D-RTRL's trace) rather than its sum, which is up to
      $1/(1-\\alpha)$ times larger.
    - `window`: as for [`eqtrace.d_rtrl_init`][].

    **Returns:**

    An [`eqtrace.ESDRTRLTraces`][].
    """
    check_decay(decay)
    buffer = window_init(graph, state, window)
    flatten_weights(graph, params)
    x_bar, f_bar = [], []
    for rels, group_ids in _traced_operations(graph):
        aval = rels[0].input_aval
        if aval is not None:
            x_bar.append(jnp.zeros(aval.shape, aval.dtype))
        for g in group_ids:
            group = graph.hidden_groups[g]
            f_bar.append(jnp.zeros(group.varshape + (group.num_state,), group.dtype))
    dtype = x_bar[0].dtype if x_bar else jnp.float32
    return ESDRTRLTraces(
        state=state,
        x_bar=tuple(x_bar),
        f_bar=tuple(f_bar),
        x_weight=jnp.zeros((), dtype),
        buffer=buffer,
        decay=float(decay),
        normalise=bool(normalise),
        window=window,
    )


def es_d_rtrl_step(
    graph: ETraceGraph,
    params: PyTree,
    traces: ESDRTRLTraces,
    x: PyTree,
    target: PyTree,
    loss_fn: Callable,
    *,
    batched: bool = False,
) -> tuple[ESDRTRLTraces, PyTree, Float[Array, "*batch"], PyTree]:
    """Advance ES-D-RTRL by one step. Same contract as [`eqtrace.d_rtrl_step`][].

    **Returns:**

    `(traces, y, loss, grads)`.
    """
    traces, y, loss, grads, _ = _step(graph, params, traces, x, target, loss_fn, batched, defer=False)
    return traces, y, loss, grads


def _deferrable(graph: ETraceGraph, window: int) -> dict[int, tuple[int, ...]]:
    """The weights whose gradient a step can leave as factors, each with its equations: those used
    only as the `w` of `etp_matmul`, whose terms are all outer products (`x_tᵀ c_t` through one
    step, and `x̂ᵀ cot` from the traces where the equation is traced). A longer window
    differentiates the weight through several steps: it stays dense."""
    return matmul_weights(graph) if window <= 1 else {}


def _rows(a):
    """`a` as rows of its last axis (every leading axis, the batch's included, is a row)."""
    return a.reshape(-1, a.shape[-1])


def _step(graph, params, traces, x, target, loss_fn, batched, *, defer: bool):
    """`es_d_rtrl_step`, with the gradients of the weights of `_deferrable` left as factors when
    `defer`: `(traces, y, loss, grads, factors)`."""
    check_traces(traces, ESDRTRLTraces, es_d_rtrl_init, graph, params, batched=batched)
    operations = _traced_operations(graph)
    deferred = _deferrable(graph, traces.window) if defer else {}
    lin = linearise_step(
        graph,
        params,
        x,
        traces.state,
        target,
        loss_fn,
        buffer=traces.buffer,
        diagonal=traces.window == 0,
        batched=batched,
        defer=deferred,
    )
    weights = flatten_weights(graph, params)
    grads = list(lin.grads)
    # Rows of the deferred weights' factors: first each equation's same-step `x_tᵀ c_t`.
    left = {i: [_rows(lin.operands[e][0]) for e in eqns] for i, eqns in deferred.items()}
    right = {i: [_rows(lin.output_cotangents[e]) for e in eqns] for i, eqns in deferred.items()}
    x_weight = traces.x_weight
    scale = 1 / jnp.maximum(x_weight, 1) if traces.normalise else None
    x_iter, f_iter = iter(traces.x_bar), iter(traces.f_bar)
    new_x, new_f = [], []
    for rels, group_ids in operations:
        op, e = etp_op(rels[0].primitive), rels[0].eqn_index
        operands = list(lin.operands[e])
        x_bar = x_hat = None
        if op.has_input:
            x_bar = next(x_iter)
            new_x.append(traces.decay * x_bar + operands[0])
            x_hat = x_bar if scale is None else _scale(x_bar, scale)
        f_bars = [next(f_iter) for _ in group_ids]
        # The history term's cotangent at the operation's output: Σ_g Σ_c f̄ λ.
        cot = sum(jnp.sum(f * lin.signal[g], axis=-1) for f, g in zip(f_bars, group_ids))
        dense = any(rel.weight_index not in left for rel in rels)
        history = _history(op, rels[0], operands, x_hat, cot, weights, batched) if dense else None
        for rel in rels:
            i = rel.weight_index
            if i in left:  # the `w` of `x @ w + b`: the history term `x̂ᵀ cot` as rows
                left[i].append(_rows(x_hat))
                right[i].append(_rows(cot))
            else:
                grads[i] = grads[i] + history[rel.operand_index]
        for f, g in zip(f_bars, group_ids):
            blocks = jax.vmap(apply_blocks) if batched else apply_blocks
            new_f.append(blocks(lin.d_total[g], f) + lin.d_f[e][g])
    new_x, new_f, x_weight = advance(
        lin, (tuple(new_x), tuple(new_f), traces.decay * x_weight + 1), (traces.x_bar, traces.f_bar, x_weight)
    )
    new = ESDRTRLTraces(
        state=lin.new_state,
        x_bar=new_x,
        f_bar=new_f,
        x_weight=x_weight,
        buffer=lin.buffer,
        decay=traces.decay,
        normalise=traces.normalise,
        window=traces.window,
    )
    factors = tuple(GradFactors(i, jnp.concatenate(left[i]), jnp.concatenate(right[i])) for i in deferred)
    return new, lin.y, lin.loss, unflatten_grads(params, grads), factors


def _scale(x_bar, scale):
    """`x̄ / w`, with one weight per example when batched."""
    return x_bar * scale.reshape(scale.shape + (1,) * (x_bar.ndim - scale.ndim)).astype(x_bar.dtype)


def _history(op, rel: HiddenParamOpRelation, operands, x_bar, cot, weights, batched) -> list:
    """`VJP` of the operation at `(x̄, W)` with cotangent `cot`, for every operand (index 0 unused).

    Batched, with weights that are model leaves (the usual case), the weights are taken unbatched, so
    the batch is contracted inside the operation's own transpose (a matmul over the batch)."""
    start = 1 if op.has_input else 0

    def impl(x0, *w):
        return op.impl(*((x0,) if op.has_input else ()), *w, **rel.params)

    if not batched:
        _, vjp = jax.vjp(lambda *w: impl(x_bar, *w), *operands[start:])
        return [None] * start + list(vjp(cot))
    leaves = rel.operand_weights[start:]
    if all(i is not None for i in leaves):
        ws = [weights[i] for i in leaves]
        if op.has_input:
            _, vjp = jax.vjp(lambda *w: jax.vmap(lambda x0: impl(x0, *w))(x_bar), *ws)
            return [None] * start + list(vjp(cot))
        _, vjp = jax.vjp(lambda *w: impl(None, *w), *ws)
        return list(vjp(jnp.sum(cot, axis=0)))
    # Weights computed inside the step: one VJP per example, summed.
    per_example = jax.vmap(lambda x0, c, *w: jax.vjp(lambda *w: impl(x0, *w), *w)[1](c))
    # Integer operands (token ids, indices) have `float0` cotangents: no gradient to sum.
    grads = per_example(x_bar, cot, *operands[start:])
    return [None] * start + [None if g.dtype == jax.dtypes.float0 else jnp.sum(g, axis=0) for g in grads]


class ESDRTRL(AbstractDeferringAlgorithm):
    """ES-D-RTRL (pp_prop) as a rule object: `eqtrace.online_grad(..., algorithm=eqtrace.ESDRTRL(
    decay=0.8))`. Its `init` and `step` are [`eqtrace.es_d_rtrl_init`][] and
    [`eqtrace.es_d_rtrl_step`][]; it steps whole batches at once. With `window` 0 or 1, the drivers
    take the gradients of the weights used only by `eqtrace.matmul` as factors and sum them over
    many steps in one matmul, rather than add an outer product to each weight at every step.

    **Fields:**

    - `decay`: $\\alpha \\in [0, 1]$, how much of the past input the input traces keep.
    - `normalise`: use the input traces' weighted mean rather than their sum.
    - `window`: as for [`eqtrace.DRTRL`][].
    """

    decay: float = eqx.field(static=True, default=0.9)
    normalise: bool = eqx.field(static=True, default=True)
    window: int = eqx.field(static=True, default=1)
    batch_native: ClassVar[bool] = True

    def __check_init__(self):
        check_decay(self.decay)
        check_window(self.window)

    def init(self, graph, params, state):
        return es_d_rtrl_init(graph, params, state, self.decay, normalise=self.normalise, window=self.window)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        return es_d_rtrl_step(graph, params, traces, x, target, loss_fn, batched=batched)

    def deferred_step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        # With `window <= 1`, the weights used only as the `w` of `x @ w + b`: see `_deferrable`.
        return _step(graph, params, traces, x, target, loss_fn, batched, defer=True)

    def traces_relation(self, relation):
        return True
