r"""OTPE: OTTT's presynaptic traces with a postsynaptic trace of the neuron's own dynamics.

Per traced ETP operation, OTTT's presynaptic trace $\hat a_t$ and count $c_t$; per operation and
hidden group, the postsynaptic trace $\bar f_t = D_t \bar f_{t-1} + D_{f,t}$ (`varshape + (S,)`),
which carries the neuron's leak, reset and surrogate derivatives across steps where OTTT assumes a
leak $\lambda$. The estimate $\partial h_t/\partial W \approx \bar f_t \odot \partial\,\mathrm{op}(\hat
a_t/c_t, W)/\partial W$ is paired with the instantaneous learning signal $\delta_t$.
"""

import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._compiler import ETraceGraph, HiddenParamOpRelation
from ._es_d_rtrl import _traced_operations, check_decay
from ._one_step import apply_blocks, StepLinearisation, unflatten_grads
from ._ottt import check_same_decay, presynaptic_init, presynaptic_step
from ._rule import AbstractOnlineAlgorithm


class OTPETraces(eqx.Module):
    """The state that [`eqtrace.OTPE`][] carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `a_hat`, `count`: the presynaptic traces and count, as in [`eqtrace.OTTTTraces`][].
    - `f_bar`: one postsynaptic trace $\\bar f_t$ per (traced operation, hidden group),
      `varshape + (S,)`.
    - `decay`: the rule's $\\lambda$ (static).
    """

    state: object
    a_hat: tuple
    count: jax.Array
    f_bar: tuple
    decay: float = eqx.field(static=True, default=0.8)


def _otpe_init(graph: ETraceGraph, params, state, *, decay: float = 0.8) -> OTPETraces:
    check_decay(decay)
    a_hat, count = presynaptic_init(graph, params)
    f_bar = []
    for _, group_ids in _traced_operations(graph):
        for g in group_ids:
            group = graph.hidden_groups[g]
            f_bar.append(jnp.zeros(group.varshape + (group.num_state,), group.dtype))
    return OTPETraces(state=state, a_hat=a_hat, count=count, f_bar=tuple(f_bar), decay=float(decay))


_otpe_init.__name__ = "OTPE().init"  # how `check_traces` names the function that makes traces


def _otpe_post(graph: ETraceGraph, f_bar: tuple, batched: bool, lin: StepLinearisation, count) -> list:
    """The new postsynaptic traces `D_t f̄_{t-1} + D_{f,t}`, one per traced operation and group."""
    blocks = jax.vmap(apply_blocks) if batched else apply_blocks
    pairs = [(rels[0].eqn_index, g) for rels, groups in _traced_operations(graph) for g in groups]
    return [blocks(lin.d_total[g], f) + lin.d_f[e][g] for (e, g), f in zip(pairs, f_bar)]


class OTPE(AbstractOnlineAlgorithm):
    r"""Online training with postsynaptic estimates (after Summe et al., 2023) as a rule object, for
    [`eqtrace.online_grad`][] and [`eqtrace.batch_grad`][]:
    `eqtrace.online_grad(..., algorithm=eqtrace.OTPE(decay=0.8))`.

    OTPE keeps [`eqtrace.OTTT`][]'s presynaptic trace $\hat a_t = \lambda \hat a_{t-1} + x_t$ and
    count $c_t = \lambda c_{t-1} + 1$ per traced ETP operation, and adds, per operation and hidden
    group, a postsynaptic trace of the neuron's own dynamics,

    $$\bar f_t = D_t \bar f_{t-1} + D_{f,t}, \qquad
    \frac{\partial h_t}{\partial W} \approx \bar f_t \odot
    \frac{\partial\, \mathrm{op}(\hat a_t / c_t, W)}{\partial W},$$

    with $D_t$ the per-position blocks $\partial h_t / \partial h_{t-1}$ (ETP outputs held fixed: the
    leak, the reset and its surrogate derivative of a LIF neuron, an ALIF's adaptation) and
    $D_{f,t} = \partial h_t / \partial y_t$. Where OTTT takes the neuron to be a leak $\lambda$
    ($\bar f_t \approx c_t D_{f,t}$), OTPE carries its actual Jacobians. The learning signal is the
    instantaneous $\delta_t = \partial L_t/\partial h_t$, as for OTTT and e-prop:
    $\nabla W \mathrel{+}= \mathrm{VJP}_W\big(\mathrm{op}(\hat a_t / c_t, W),\ \sum_s \delta_t
    \bar f_t\big)$; same-step paths that avoid the hidden groups, and every weight in no relation,
    get their exact same-step gradient.

    **When it is exact.** Wherever OTTT is ($D_t = \lambda$, $D_{f,t}$ constant); for a weight
    without input (a learnable time constant through `eqtrace.element_wise`), whose sensitivity does
    not change over time, so that $\bar f_t \odot \partial y/\partial W$ is D-RTRL's trace (exact on
    a single layer); and for an input constant over the steps $\hat a_t$ remembers. The product of
    the two traces is [`eqtrace.ESDRTRL`][]'s estimate; OTPE pairs it with $\delta_t$ of the same
    step instead of back-propagating through a window.

    **Relation to the paper.** Summe et al. keep the layer's exact sensitivity (e-prop's
    weight-shaped trace) and filter the sensitivity of its output with the next layer's leak;
    [`eqtrace.EProp`][] with `kappa` is that filter for a leaky readout. This rule is the factorised
    form, with OTTT's memory plus $N \cdot S$ per group.

    **Cost.** Memory: per traced operation its input, plus $N \cdot S$ per group it feeds; time: two
    pullbacks of each traced operation per step, besides the step's linearisation. Steps whole batches
    at once (`batch_native`).

    **Fields:**

    - `decay`: $\lambda \in [0, 1]$, the presynaptic traces' leak.

    **References:**

    T. Summe, C. J. S. Schaefer and S. Joshi, *Estimating post-synaptic effects for online training
    of feed-forward SNNs*, arXiv:2311.16151 (2023).
    """

    decay: float = eqx.field(static=True, default=0.8)
    batch_native: ClassVar[bool] = True

    def __check_init__(self):
        check_decay(self.decay)

    def init(self, graph: ETraceGraph, params, state) -> OTPETraces:
        return _otpe_init(graph, params, state, decay=self.decay)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, OTPETraces, _otpe_init)
        check_same_decay(traces, self.decay)
        post = functools.partial(_otpe_post, graph, traces.f_bar, batched)
        lin, grads, a_hat, count, f_bar = presynaptic_step(
            graph, params, traces, x, target, loss_fn, post, batched=batched
        )
        new = OTPETraces(
            state=lin.new_state, a_hat=a_hat, count=count, f_bar=tuple(f_bar), decay=traces.decay
        )
        return new, lin.y, lin.loss, unflatten_grads(params, grads)

    def traces_relation(self, relation: HiddenParamOpRelation) -> bool:
        return True
