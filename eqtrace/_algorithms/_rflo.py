r"""RFLO: random-feedback local online learning.

Per position-diagonal relation and hidden group, a weight-shaped trace that decays by the neurons'
leak, $p_t = (1 - 1/\tau)\, p_{t-1} + \partial h_t / \partial W|_{\text{instant}}$, paired with the
instantaneous learning signal sent through a fixed random matrix $B$ in place of the readout weight.
"""

from typing import ClassVar

import equinox as eqx

from .._compiler import ETraceGraph, HiddenParamOpRelation
from ._eprop import _eprop_init, eligibility_step, EPropTraces
from ._rule import AbstractOnlineAlgorithm


def _rflo_init(
    graph: ETraceGraph, params, state, *, kappa: float | None = None, feedback_seed: int | None = None
) -> EPropTraces:
    return _eprop_init(graph, params, state, kappa=kappa, feedback_seed=feedback_seed)


_rflo_init.__name__ = "RFLO().init"  # how `check_traces` names the function that makes traces


class RFLO(AbstractOnlineAlgorithm):
    r"""Random-feedback local online learning (Murray, 2019) as a rule object, for
    [`eqtrace.online_grad`][] and [`eqtrace.batch_grad`][]:
    `eqtrace.online_grad(..., algorithm=eqtrace.RFLO(tau=10.0))`.

    RFLO was derived for the leaky rate network
    $h_t = (1 - \tfrac{1}{\tau}) h_{t-1} + \tfrac{1}{\tau} \phi(y_t)$, $y_t = [x_t; h_{t-1}] W$.
    Per position-diagonal relation and hidden group it keeps a weight-shaped trace that decays by the
    neurons' leak only,

    $$p_t = \Big(1 - \frac{1}{\tau}\Big)\, p_{t-1} + \frac{\partial h_t}{\partial W}\Big|_{h_{t-1}},$$

    whose instantaneous term ($\tfrac{1}{\tau} \phi'(y_t) \otimes [x_t; h_{t-1}]$ in that network)
    comes from the step's linearisation ($D_{f,t}$ and the operation's own pullback), as for
    [`eqtrace.DRTRL`][]. The recurrent mixing is dropped, and so is every other term of the neuron's
    Jacobian $D_t$ (a spiking neuron's reset): the trace is e-prop's with $D_t$ replaced by the
    constant leak. With `tau=None` the trace decays by the model's own blocks $D_t$ (ETP outputs held
    fixed), which in RFLO's network *is* the leak $1 - 1/\tau$. The learning signal is the
    instantaneous one, sent through a fixed random matrix $B$ in place of the readout weight
    (`feedback="random"`, RFLO's) or through the readout itself (`"symmetric"`), as
    [`eqtrace.EProp`][] does: $\nabla W \mathrel{+}= \sum_{n,s} \tilde\delta_t[n, s]\, p_t[\dots, n,
    s]$. The readout (and every weight in no relation) gets its exact same-step gradient.

    **When it is exact; relation to e-prop and D-RTRL.** In RFLO's network with `tau` its time
    constant (or `tau=None`), RFLO is [`eqtrace.EProp`][] with the same feedback, step by step; with
    symmetric feedback it is then also [`eqtrace.DRTRL`][]`(window=0)` with a stateless readout. On a
    leaky layer with no recurrent connections and a stateless readout it equals BPTT (symmetric
    feedback).

    **Cost.** D-RTRL's memory (one trace shaped as the weight per state of the group) and $B$; time: one
    linearisation of the step, two with random feedback. Steps one example at a time.

    **Fields:**

    - `tau`: the neurons' time constant in steps, $\tau \ge 1$ (the leak is $1 - 1/\tau$); `None`:
      the model's own blocks $D_t$.
    - `feedback`: `"random"` (through a fixed random matrix $B$, drawn as for
      [`eqtrace.EProp`][]) or `"symmetric"` (through the readout weight).
    - `seed`: the seed of $B$ (static: the same seed, the same $B$).

    **References:**

    J. M. Murray, *Local online learning in recurrent networks with random feedback*, eLife 8, e43299
    (2019).
    """

    tau: float | None = eqx.field(static=True, default=None)
    feedback: str = eqx.field(static=True, default="random")  # "random" or "symmetric"
    seed: int = eqx.field(static=True, default=0)
    batch_native: ClassVar[bool] = False

    def __check_init__(self):
        if self.tau is not None and (
            isinstance(self.tau, bool) or not isinstance(self.tau, int | float) or not self.tau >= 1
        ):
            raise ValueError(f"`tau` must be `None` or a number >= 1 (in steps), got {self.tau!r}.")
        if self.feedback not in ("symmetric", "random"):
            raise ValueError(f"`feedback` must be 'random' or 'symmetric', got {self.feedback!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}.")

    def _seed(self) -> int | None:
        return self.seed if self.feedback == "random" else None

    def init(self, graph: ETraceGraph, params, state) -> EPropTraces:
        return _rflo_init(graph, params, state, feedback_seed=self._seed())

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, EPropTraces, _rflo_init)
        if traces.kappa is not None or traces.feedback_seed != self._seed():
            raise ValueError(
                f"`traces` were made with feedback seed {traces.feedback_seed} and kappa {traces.kappa}, "
                f"but this rule needs seed {self._seed()} and no kappa: make them with this rule's `init`."
            )
        leak = None if self.tau is None else 1.0 - 1.0 / float(self.tau)
        return eligibility_step(graph, params, traces, x, target, loss_fn, leak=leak)

    def traces_relation(self, relation: HiddenParamOpRelation) -> bool:
        return relation.per_position
