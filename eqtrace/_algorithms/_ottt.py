r"""OTTT: presynaptic traces paired with the instantaneous learning signal, and the machinery
(presynaptic traces times a per-position postsynaptic factor) that OTPE shares.
"""

import functools
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._compiler import ETraceGraph, HiddenParamOpRelation
from .._compiler._run import flatten_weights
from .._ops import etp_op
from ._es_d_rtrl import _history, _scale, _traced_operations, check_decay
from ._one_step import linearise_step, StepLinearisation, unflatten_grads
from ._rule import AbstractOnlineAlgorithm


class OTTTTraces(eqx.Module):
    """The state that [`eqtrace.OTTT`][] carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `a_hat`: one presynaptic trace $\\hat a_t$ per traced ETP operation that has an input (shape
      of that input).
    - `count`: $c_t = \\sum_{k < t} \\lambda^k$, the weight of a constant input in $\\hat a_t$.
    - `decay`: the rule's $\\lambda$ (static).
    """

    state: object
    a_hat: tuple
    count: jax.Array
    decay: float = eqx.field(static=True, default=0.8)


def presynaptic_init(graph: ETraceGraph, params) -> tuple[tuple, jax.Array]:
    """Zero presynaptic traces, one per traced operation with an input, and a zero count."""
    flatten_weights(graph, params)
    a_hat = []
    for rels, _ in _traced_operations(graph):
        if rels[0].input_aval is not None:
            a_hat.append(jnp.zeros(rels[0].input_aval.shape, rels[0].input_aval.dtype))
    return tuple(a_hat), jnp.zeros((), a_hat[0].dtype if a_hat else jnp.float32)


def _ottt_init(graph: ETraceGraph, params, state, *, decay: float = 0.8) -> OTTTTraces:
    check_decay(decay)
    a_hat, count = presynaptic_init(graph, params)
    return OTTTTraces(state=state, a_hat=a_hat, count=count, decay=float(decay))


_ottt_init.__name__ = "OTTT().init"  # how `check_traces` names the function that makes traces


def presynaptic_step(
    graph: ETraceGraph, params, traces, x, target, loss_fn: Callable, post: Callable, *, batched: bool
):
    """One step of a rule whose estimate of `∂h_t/∂W` is `op(â_t/c_t, W)`'s sensitivity times a
    per-position factor, paired with `δ_t = ∂L_t/∂h_t`. `post(lin, c_t)` gives the factors
    (`varshape + (S,)`), one per traced operation and group, in the order of `_traced_operations`.

    Returns the linearisation, the gradients, the new presynaptic traces and count, and the factors.
    The same-step gradient holds `δ_t D_{f,t} ∂op(x_t, W)/∂W` exactly; the estimate replaces it.
    """
    lin = linearise_step(graph, params, x, traces.state, target, loss_fn, diagonal=True, batched=batched)
    weights = flatten_weights(graph, params)
    grads = list(lin.grads)
    decay = traces.decay
    count = decay * traces.count + 1
    factors = post(lin, count)
    a_iter, f_iter = iter(traces.a_hat), iter(factors)
    new_a = []
    for rels, group_ids in _traced_operations(graph):
        op, e = etp_op(rels[0].primitive), rels[0].eqn_index
        operands = list(lin.operands[e])
        x_now = x_hat = None
        if op.has_input:
            x_now = operands[0]
            a_hat = decay * next(a_iter) + x_now
            new_a.append(a_hat)
            x_hat = _scale(a_hat, 1 / count)
        estimate = sum(jnp.sum(next(f_iter) * lin.delta[g], axis=-1) for g in group_ids)
        instant = sum(jnp.sum(lin.d_f[e][g] * lin.delta[g], axis=-1) for g in group_ids)
        added = _history(op, rels[0], operands, x_hat, estimate, weights, batched)
        same_step = _history(op, rels[0], operands, x_now, -instant, weights, batched)
        for rel in rels:
            j, w = rel.operand_index, rel.weight_index
            grads[w] = grads[w] + added[j] + same_step[j]
    return lin, grads, tuple(new_a), count, factors


def _ottt_post(graph: ETraceGraph, lin: StepLinearisation, count: jax.Array) -> list:
    """OTTT's postsynaptic factors: this step's `∂h_t/∂y_t`, weighted by the count `c_t`."""
    return [
        _scale(lin.d_f[rels[0].eqn_index][g], count)
        for rels, groups in _traced_operations(graph)
        for g in groups
    ]


class OTTT(AbstractOnlineAlgorithm):
    r"""Online training through time (Xiao et al., 2022) as a rule object, for
    [`eqtrace.online_grad`][] and [`eqtrace.batch_grad`][]:
    `eqtrace.online_grad(..., algorithm=eqtrace.OTTT(decay=0.8))`.

    Per ETP operation $y = \mathrm{op}(x, W)$ feeding a hidden group, a presynaptic trace
    $\hat a_t = \lambda \hat a_{t-1} + x_t$ and count $c_t = \lambda c_{t-1} + 1$; the weight's
    influence on the state is estimated as if the neurons only leaked, at rate $\lambda$:
    $\partial h_t / \partial W \approx D_{f,t}\, c_t\, \partial\, \mathrm{op}(\hat a_t / c_t, W) /
    \partial W$ ($= D_{f,t} \sum_k \lambda^k \partial y_{t-k} / \partial W$, an ETP operation being
    affine in its input), with $D_{f,t} = \partial h_t / \partial y_t$ of this step. It is paired
    with the instantaneous learning signal $\delta_t = \partial L_t / \partial h_t$ ($h_{t-1}$ held
    fixed): for $y = x W$, $\nabla W \mathrel{+}= \hat a_t \otimes \sum_s \delta_t D_{f,t}$, OTTT's
    $\hat a_t \otimes \partial L_t / \partial u_t$. Weights in no relation (a readout) get their
    exact same-step gradient. Exact (BPTT, step by step) where every traced state is a leaky
    integrator with leak $\lambda$, e.g. a feed-forward LIF layer with a detached reset, a fixed time
    constant and a stateless readout. Memory: each traced operation's input; batch-native. The
    docs page "OTTT" has the details and the relation to e-prop and D-RTRL.

    **Fields:**

    - `decay`: $\lambda \in [0, 1]$, the neurons' leak ($e^{-\Delta t / \tau}$ for LIF neurons).

    **References:**

    M. Xiao, Q. Meng, Z. Zhang, D. He and Z. Lin, *Online training through time for spiking neural
    networks*, NeurIPS 2022.
    """

    decay: float = eqx.field(static=True, default=0.8)
    batch_native: ClassVar[bool] = True

    def __check_init__(self):
        check_decay(self.decay)

    def init(self, graph: ETraceGraph, params, state) -> OTTTTraces:
        return _ottt_init(graph, params, state, decay=self.decay)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, OTTTTraces, _ottt_init)
        check_same_decay(traces, self.decay)
        post = functools.partial(_ottt_post, graph)
        lin, grads, a_hat, count, _ = presynaptic_step(
            graph, params, traces, x, target, loss_fn, post, batched=batched
        )
        new = OTTTTraces(state=lin.new_state, a_hat=a_hat, count=count, decay=traces.decay)
        return new, lin.y, lin.loss, unflatten_grads(params, grads)

    def traces_relation(self, relation: HiddenParamOpRelation) -> bool:
        return True


def check_same_decay(traces, decay: float) -> None:
    if traces.decay != float(decay):
        raise ValueError(
            f"`traces` were made with `decay={traces.decay}`, but this rule has `decay={decay}`: make "
            "them with this rule's `init`."
        )
