r"""OSTL: online spatio-temporal learning (Bohnstingl et al., 2022).

The gradient of $L_t$ is split into a *spatial* part, the learning signal of step $t$ carried
through the later layers within that step only, and a *temporal* part, each layer's eligibility
trace $M_t \approx \partial h_t / \partial W$ carried through the layer's own dynamics:
$M_t = J_t M_{t-1} + \partial h_t / \partial W|_{h_{t-1}}$ and $\nabla W \mathrel{+}=
\partial L_t / \partial W|_{h_{t-1}} + \lambda_t \cdot M_{t-1}$, with $\lambda_t = \delta_t J_t$,
$\delta_t = \partial L_t / \partial h_t$. A layer is a hidden group; $J_t$ is the group's
per-position blocks with ETP outputs held fixed (`recurrent=False`: D-RTRL with `window=0`) or its
whole Jacobian, the recurrent ETP mixing included (`recurrent=True`: RTRL within each group).
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._compiler import ETraceGraph, evaluate, HiddenParamOpRelation
from .._compiler._run import flatten_step_inputs, flatten_weights
from .._ops import etp_op
from ._d_rtrl import contract, trace_shape, trace_update, traced_pairs
from ._one_step import linearise_step, unflatten_grads
from ._rule import AbstractOnlineAlgorithm


class OSTLTraces(eqx.Module):
    """The state that [`eqtrace.OSTL`][] carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `eps`: one trace per traced (relation, hidden group) pair: D-RTRL's, `weight.shape + (S,)`
      (see [`eqtrace.DRTRLTraces`][]), or with `recurrent`, the influence of the weight on every
      position of the group, `weight.shape + varshape + (S,)`.
    - `recurrent`: the rule's option (static).
    """

    state: object
    eps: tuple
    recurrent: bool = eqx.field(static=True, default=False)


def _pairs(graph: ETraceGraph, recurrent: bool) -> list[tuple[int, int]]:
    if not recurrent:
        return traced_pairs(graph)
    return [(r, g.index) for r, rel in enumerate(graph.hidden_param_op_relations) for g in rel.hidden_groups]


def _ostl_init(graph: ETraceGraph, params, state, *, recurrent: bool = False) -> OSTLTraces:
    flat_w = flatten_weights(graph, params)
    eps = []
    for r, g in _pairs(graph, recurrent):
        rel, group = graph.hidden_param_op_relations[r], graph.hidden_groups[g]
        w = flat_w[rel.weight_index]
        # D-RTRL's trace (of the part the operation reads), or the full influence on the group.
        shape = w.shape + group.varshape if recurrent else trace_shape(rel, w.shape)
        eps.append(jnp.zeros(shape + (group.num_state,), w.dtype))
    return OSTLTraces(state=state, eps=tuple(eps), recurrent=recurrent)


_ostl_init.__name__ = "OSTL().init"  # how `check_traces` names the function that makes traces


def _group_jacobians(graph: ETraceGraph, params, x, state) -> list[jax.Array]:
    """Per group, `∂h_t/∂h_{t-1}` within the group, the whole step included (`varshape + (S,)`
    twice); the other groups' old states are held fixed."""
    info = graph.module_info
    weights, xs, hidden = flatten_step_inputs(graph, params, x, state)
    index = {p: i for i, p in enumerate(info.hidden_paths)}
    out = []
    for group in graph.hidden_groups:
        cols = [index[p] for p in group.hidden_paths]

        def step(h_g, cols=cols):
            h = list(hidden)
            for c, i in enumerate(cols):
                h[i] = h_g[..., c]
            new = evaluate(info.closed_jaxpr, [*weights, *xs, *h])[info.num_outputs :]
            return jnp.stack([new[i] for i in cols], axis=-1)

        # Reverse mode where the step holds a `jax.custom_vjp` function (no forward-mode derivative).
        jacobian = jax.jacfwd if info.forward_differentiable else jax.jacrev
        out.append(jacobian(step)(jnp.stack([hidden[i] for i in cols], axis=-1)))
    return out


def _influence(rel: HiddenParamOpRelation, operands: list, d_f: jax.Array) -> jax.Array:
    """`∂h_t[n, s]/∂W` at this step for every position `n` of the group (`W.shape + varshape +
    (S,)`): the operation's VJP for the weight, one cotangent `∂h[n, s]/∂y` at a time."""
    op, j = etp_op(rel.primitive), rel.operand_index
    _, vjp = jax.vjp(lambda w: op.impl(*operands[:j], w, *operands[j + 1 :], **rel.params), operands[j])
    basis = jnp.eye(d_f.size, dtype=d_f.dtype).reshape((d_f.size,) + d_f.shape)
    columns = jax.vmap(lambda e: vjp(jnp.sum(e * d_f, axis=-1))[0])(basis)  # (N·S,) + W.shape
    k, w_ndim = d_f.ndim, columns.ndim - 1
    columns = columns.reshape(d_f.shape + columns.shape[1:])
    return jnp.moveaxis(columns, tuple(range(k)), tuple(range(w_ndim, w_ndim + k)))


class OSTL(AbstractOnlineAlgorithm):
    r"""OSTL (Bohnstingl et al., 2022) as a rule object, for [`eqtrace.online_grad`][] and
    [`eqtrace.batch_grad`][]: `eqtrace.online_grad(..., algorithm=eqtrace.OSTL(recurrent=True))`.

    Each layer (hidden group $g$) keeps traces $M^g_t \approx \partial h^g_t / \partial W$ for the
    weights feeding it, carried through its own dynamics $J^g_t$ only, and credits them with the
    learning signal of the step through the later layers (every old state held fixed):
    $M^g_t = J^g_t M^g_{t-1} + \partial h^g_t / \partial W|_{h_{t-1}}$ and
    $\nabla W \mathrel{+}= \partial L_t / \partial W|_{h_{t-1}} + \lambda^g_t \cdot M^g_{t-1}$.
    Temporal paths that cross layers are dropped. See the [OSTL page](../rules/ostl.md).

    - `recurrent=False` (without $H$): $J^g_t$ is the per-position blocks with ETP outputs held
      fixed and $\lambda_t = \delta_t J_t$ plus what the loss reads of $h_{t-1}$ directly:
      [`eqtrace.DRTRL`][]`(window=0)`, whose traces (`weight.shape + (S,)`) it keeps. Exact for one
      hidden group with position-wise recurrence outside ETP operations and a stateless readout.
    - `recurrent=True` (with $H$): $J^g_t$ is the group's whole step Jacobian, recurrent ETP
      operations included, each trace is `weight.shape + varshape + (S,)` (RTRL within each
      group, every relation traced) and $\lambda_t = \partial L_t / \partial h_{t-1}$. Exact for
      one hidden group whose weights all reach it through their relations and a stateless readout.
      Memory $N \cdot S \cdot P$ per group of $N$ positions and $S$ states fed by $P$ weight
      entries; $N \cdot S$ JVPs of the step per step.

    Weights outside every traced relation get their exact same-step gradient.

    **Fields:**

    - `recurrent`: keep the recurrent ETP mixing in the traces (see above).
    - `max_size`: with `recurrent`, the largest number of trace entries `init` accepts (default
      $10^7$); `None` for no limit.

    **References:**

    T. Bohnstingl, S. Woźniak, A. Pantazi and E. Eleftheriou, *Online spatio-temporal learning in
    deep neural networks*, IEEE Transactions on Neural Networks and Learning Systems 34(11), 2023.
    """

    recurrent: bool = eqx.field(static=True, default=False)
    max_size: int | None = eqx.field(static=True, default=10**7)
    batch_native: ClassVar[bool] = False

    def __check_init__(self):
        if not isinstance(self.recurrent, bool):
            raise ValueError(f"`recurrent` must be a bool, got {self.recurrent!r}.")
        if self.max_size is not None and (
            isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size < 0
        ):
            raise ValueError(f"`max_size` must be an integer >= 0 or `None`, got {self.max_size!r}.")

    def init(self, graph: ETraceGraph, params, state) -> OSTLTraces:
        traces = _ostl_init(graph, params, state, recurrent=self.recurrent)
        size = sum(e.size for e in traces.eps)
        if self.recurrent and self.max_size is not None and size > self.max_size:
            raise ValueError(
                f"`OSTL(recurrent=True)` needs {size} trace entries per example for this model, above "
                f"`max_size={self.max_size}`. Use `OSTL()` or `eqtrace.DRTRL()` (traces the size of "
                "the weights), or raise the limit with `OSTL(recurrent=True, max_size=...)`."
            )
        return traces

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, OSTLTraces, _ostl_init)
        if traces.recurrent != self.recurrent:
            raise ValueError(
                f"`traces` were made with `recurrent={traces.recurrent}`, but this rule has "
                f"`recurrent={self.recurrent}`: make them with this rule's `init`."
            )
        # Without `H`: D-RTRL's `window=0` signal, `δ_t` carried back through the per-position
        # blocks; with it: `∂L_t/∂h_{t-1}` through the whole step. Either way, `λ_t · M_{t-1}`
        # adds the past to the same-step gradient, which holds `δ_t · ∂h_t/∂W`.
        lin = linearise_step(graph, params, x, traces.state, target, loss_fn, diagonal=not self.recurrent)
        jacobians = _group_jacobians(graph, params, x, traces.state) if self.recurrent else []
        grads, new_eps = list(lin.grads), []
        for (r, g), eps in zip(_pairs(graph, self.recurrent), traces.eps):
            rel = graph.hidden_param_op_relations[r]
            if self.recurrent:
                k = jacobians[g].ndim // 2  # the group's axes, positions and state
                extra = jnp.tensordot(eps, lin.signal[g], axes=k)
                axes = (tuple(range(eps.ndim - k, eps.ndim)), tuple(range(k, 2 * k)))
                history = jnp.tensordot(eps, jacobians[g], axes=axes)
                instant = _influence(rel, lin.operands[rel.eqn_index], lin.d_f[rel.eqn_index][g])
            else:
                extra = contract(rel, lin.signal[g], eps)
                history, instant = trace_update(rel, g, lin, eps)
            grads[rel.weight_index] = grads[rel.weight_index] + extra
            new_eps.append(history + instant)
        new = OSTLTraces(state=lin.new_state, eps=tuple(new_eps), recurrent=traces.recurrent)
        return new, lin.y, lin.loss, unflatten_grads(params, grads)

    def traces_relation(self, relation: HiddenParamOpRelation) -> bool:
        return self.recurrent or relation.per_position
