r"""ES-D-RTRL (pp_prop): D-RTRL's trace factorised into an input trace and an output trace.

Per ETP operation with input $x$, an input trace $\bar x_t = \alpha \bar x_{t-1} + x_t$, used as
its weighted mean $\hat x_t = \bar x_t / \sum_k \alpha^k$ (or as the sum, `normalise=False`); per
operation and hidden group, an output trace $\bar f_t = D_t \bar f_{t-1} + D_{f,t}$
(`varshape + (S,)`). The weight's sensitivity $\partial h_t/\partial W$ is estimated by
$\hat x_t \otimes \bar f_t$, exact for a constant input. With `window=K` (see
[`eqtrace.d_rtrl_init`][]) the gradient is $\nabla W \mathrel{+}= \partial L_t/\partial W|_{h_{t-K}}
+ \mathrm{VJP}_W\big(\mathrm{op}(\hat x_{t-K}, W),\ \textstyle\sum_c \bar f_{t-K}[\dots, c]\,
\lambda_t[\dots, c]\big)$ with $\lambda_t = \partial L_t/\partial h_{t-K}$. With `exact_step=False`
(window 0 only: braintrace's single-step pp_prop) the traces after the step estimate the step's own
term too, one product per operation and step: $\nabla W \mathrel{+}= \mathrm{VJP}_W\big(
\mathrm{op}(\hat x_t, W),\ \textstyle\sum_c \bar f_t[\dots, c]\, \delta_t[\dots, c]\big)$, with
$\delta_t = \partial L_t/\partial h_t$. Memory per operation: the input's size plus $N \cdot S$
per group.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._compiler import ETraceGraph, evaluate, HiddenParamOpRelation
from .._compiler._run import flatten_step_inputs, flatten_weights
from .._ops import etp_op, etp_op_of
from ._inputs import check_traces
from ._one_step import _group_columns, advance, apply_blocks, linearise_step, matmul_weights, unflatten_grads
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
    - `decay`, `normalise`, `window`, `exact_step`: the rule's options (static).
    """

    state: object
    x_bar: tuple
    f_bar: tuple
    x_weight: jax.Array
    buffer: WindowBuffer | None = None
    decay: float = eqx.field(static=True, default=0.9)
    normalise: bool = eqx.field(static=True, default=True)
    window: int = eqx.field(static=True, default=1)
    exact_step: bool = eqx.field(static=True, default=True)


def check_decay(decay) -> None:
    if isinstance(decay, bool) or not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        raise ValueError(f"`decay` must be a number in [0, 1], got {decay!r}.")


def check_exact_step(exact_step, window) -> None:
    if not isinstance(exact_step, bool):
        raise ValueError(f"`exact_step` must be a bool, got {exact_step!r}.")
    if not exact_step and window != 0:
        raise ValueError(
            "`exact_step=False` (the step's own term estimated by the traces after the step, "
            f"braintrace's single-step pp_prop) needs `window=0`, got `window={window!r}`. Pass "
            "`window=0`, or keep `exact_step=True` for a longer window."
        )


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
    exact_step: bool = True,
) -> ESDRTRLTraces:
    """Zero ES-D-RTRL traces, carrying the hidden `state`.

    **Arguments:**

    - `graph`, `params`, `state`: as for [`eqtrace.d_rtrl_init`][].
    - `decay`: $\\alpha \\in [0, 1]$, how much of the past input the input trace keeps.
    - `normalise`: use the input trace's weighted mean $\\bar x_t / \\sum_k \\alpha^k$ (exact for a
      constant input, and of the magnitude of D-RTRL's trace) rather than its sum, which is up to
      $1/(1-\\alpha)$ times larger.
    - `window`: as for [`eqtrace.d_rtrl_init`][].
    - `exact_step`: take the step's own term exactly (`True`), or estimate it by the traces after
      the step, $\\hat x_t \\otimes \\bar f_t$ paired with $\\delta_t = \\partial L_t/\\partial h_t$
      (`False`, `window=0` only): one product per operation and step.

    **Returns:**

    An [`eqtrace.ESDRTRLTraces`][].
    """
    check_decay(decay)
    check_exact_step(exact_step, window)
    perturb = graph.hidden_perturb
    if (
        not exact_step
        and perturb is not None
        and perturb.chained
        and not graph.module_info.forward_differentiable
    ):
        raise ValueError(
            "`exact_step=False` needs a forward-mode derivative of the step where a hidden group computes "
            "some new values from others (as an LSTM's `h_t` from its new `c_t`); this step calls a "
            "`jax.custom_vjp` function. Use `exact_step=True` for this model."
        )
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
        exact_step=exact_step,
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
    step, and `x̂ᵀ cot` from the traces where the equation is traced; with `exact_step=False` only
    the latter on traced equations). A longer window differentiates the weight through several
    steps: it stays dense."""
    return matmul_weights(graph) if window <= 1 else {}


def _rows(a):
    """`a` as rows of its last axis (every leading axis, the batch's included, is a row)."""
    return a.reshape(-1, a.shape[-1])


def _step(graph, params, traces, x, target, loss_fn, batched, *, defer: bool):
    """`es_d_rtrl_step`, with the gradients of the weights of `_deferrable` left as factors when
    `defer`: `(traces, y, loss, grads, factors)`."""
    check_traces(traces, ESDRTRLTraces, es_d_rtrl_init, graph, params, batched=batched)
    operations = _traced_operations(graph)
    estimate = not traces.exact_step
    traced = {rel.weight_index for rels, _ in operations for rel in rels}
    # The equations whose same-step term the estimate replaces.
    estimated = {rels[0].eqn_index for rels, _ in operations} if estimate else set()
    deferred = _deferrable(graph, traces.window)
    if not defer:
        # Dense too, the estimate holds the traced `w`s constant in the VJP (no exact `dW` to throw
        # away) and contracts their rows before it returns.
        deferred = {i: eqns for i, eqns in deferred.items() if i in traced} if estimate else {}
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
    if estimate:
        # The other traced weights get the estimate alone; their unused exact `lin.grads` are dead
        # code under `jit`.
        for i in traced - set(deferred):
            grads[i] = jnp.zeros_like(weights[i])
    # Rows of the deferred weights' factors: first each equation's same-step `x_tᵀ c_t`.
    left = {
        i: [_rows(lin.operands[e][0]) for e in eqns if e not in estimated] for i, eqns in deferred.items()
    }
    right = {
        i: [_rows(lin.output_cotangents[e]) for e in eqns if e not in estimated]
        for i, eqns in deferred.items()
    }
    x_weight = traces.x_weight
    new_weight = traces.decay * x_weight + 1
    # The history term reads the input traces before the step, the estimate those after it.
    scale = 1 / jnp.maximum(new_weight if estimate else x_weight, 1) if traces.normalise else None
    blocks = jax.vmap(apply_blocks) if batched else apply_blocks
    local = None
    if estimate and graph.hidden_perturb is not None and graph.hidden_perturb.chained:
        local_of = lambda x, s: _local_output_blocks(graph, params, x, s, sorted(estimated))  # noqa: E731
        local = (jax.vmap(local_of) if batched else local_of)(x, traces.state)
    x_iter, f_iter = iter(traces.x_bar), iter(traces.f_bar)
    new_x, new_f = [], []
    for rels, group_ids in operations:
        op, e = etp_op(rels[0].primitive), rels[0].eqn_index
        operands = list(lin.operands[e])
        f_bars = [next(f_iter) for _ in group_ids]
        f_new = [blocks(lin.d_total[g], f) + lin.d_f[e][g] for f, g in zip(f_bars, group_ids)]
        x_hat = None
        if op.has_input:
            x_bar = next(x_iter)
            new_x.append(traces.decay * x_bar + operands[0])
            x_hat = new_x[-1] if estimate else x_bar
            x_hat = x_hat if scale is None else _scale(x_hat, scale)
        if not estimate:  # the history term's cotangent at the operation's output: Σ_g Σ_c f̄ λ
            cot = sum(jnp.sum(f * lin.signal[g], axis=-1) for f, g in zip(f_bars, group_ids))
        else:
            # The estimate's: Σ_g Σ_c f̄_t δ_t. Where a group computes new values from others
            # within the step, `δ` of a value already holds the paths through those computed from
            # it, so it pairs with `f̄_t` taken with them held fixed: each path counts once.
            paired = f_new
            if local is not None:
                paired = [blocks(lin.d_local[g], f) + local[e][g] for f, g in zip(f_bars, group_ids)]
            cot = sum(jnp.sum(f * lin.delta[g], axis=-1) for f, g in zip(paired, group_ids))
        dense = [rel for rel in rels if rel.weight_index not in left]
        history = _history(op, rels[0], operands, x_hat, cot, weights, batched) if dense else []
        for rel in rels:
            i = rel.weight_index
            if i in left:  # the `w` of `x @ w + b`: `x̂ᵀ cot` as rows
                left[i].append(_rows(x_hat))
                right[i].append(_rows(cot))
        for rel in dense:
            grads[rel.weight_index] = grads[rel.weight_index] + history[rel.operand_index]
        new_f.extend(f_new)
    new_x, new_f, x_weight = advance(
        lin, (tuple(new_x), tuple(new_f), new_weight), (traces.x_bar, traces.f_bar, x_weight)
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
        exact_step=traces.exact_step,
    )
    factors = tuple(GradFactors(i, jnp.concatenate(left[i]), jnp.concatenate(right[i])) for i in deferred)
    if not defer:
        for f in factors:
            grads[f.weight_index] = f.left.T @ f.right
        factors = ()
    return new, lin.y, lin.loss, unflatten_grads(params, grads), factors


def _local_output_blocks(graph: ETraceGraph, params, x, state, eqns: list[int]) -> dict:
    """For one example, per equation `e` of `eqns` and hidden group, `∂h_t/∂y_e` with ETP outputs
    and the step's other new hidden values held fixed (`varshape + (S,)`): `D_f` of the values
    that `δ_t` pairs with. A perturbation at each output carries the tangent."""
    closed = graph.module_info.closed_jaxpr
    perturb = graph.hidden_perturb
    assert perturb is not None  # called only where a group is chained
    weights, xs, hidden = flatten_step_inputs(graph, params, x, state)
    outvars = {e: closed.jaxpr.eqns[e].outvars[0] for e in eqns}

    def new_values(ps):
        at: dict = {
            eqn.outvars[0]: jax.lax.stop_gradient
            for eqn in closed.jaxpr.eqns
            if etp_op_of(eqn.primitive) is not None
        }
        for e, p in ps.items():
            at[outvars[e]] = lambda val, p=p: jax.lax.stop_gradient(val) + p
        raw = {}

        def hold(v, before):
            def hook(val):
                raw[v] = before(val)
                return jax.lax.stop_gradient(raw[v])

            return hook

        for v in perturb.perturb_vars:
            at[v] = hold(v, at.get(v, lambda val: val))
        evaluate(closed, [*weights, *xs, *hidden], at_vars=at)
        return [raw[v] for v in perturb.perturb_vars]

    zeros = {e: jnp.zeros(v.aval.shape, v.aval.dtype) for e, v in outvars.items()}
    jvp = jax.linearize(new_values, zeros)[1]
    cols = _group_columns(perturb.hidden_paths, graph)
    out = {}
    for e in eqns:
        column = jvp({k: (jnp.ones_like if k == e else jnp.zeros_like)(z) for k, z in zeros.items()})
        out[e] = {
            g.index: jnp.stack([column[k] for k in c], axis=-1) for g, c in zip(graph.hidden_groups, cols)
        }
    return out


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
    - `exact_step`: `False` (with `window=0`) estimates the step's own term by the traces too, as
      braintrace's single-step pp_prop does: see [`eqtrace.es_d_rtrl_init`][].
    """

    decay: float = eqx.field(static=True, default=0.9)
    normalise: bool = eqx.field(static=True, default=True)
    window: int = eqx.field(static=True, default=1)
    exact_step: bool = eqx.field(static=True, default=True)
    batch_native: ClassVar[bool] = True

    def __check_init__(self):
        check_decay(self.decay)
        check_window(self.window)
        check_exact_step(self.exact_step, self.window)

    def init(self, graph, params, state):
        return es_d_rtrl_init(
            graph,
            params,
            state,
            self.decay,
            normalise=self.normalise,
            window=self.window,
            exact_step=self.exact_step,
        )

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        return es_d_rtrl_step(graph, params, traces, x, target, loss_fn, batched=batched)

    def deferred_step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        # With `window <= 1`, the weights used only as the `w` of `x @ w + b`: see `_deferrable`.
        return _step(graph, params, traces, x, target, loss_fn, batched, defer=True)

    def traces_relation(self, relation):
        return True
