r"""e-prop: eligibility traces paired with the instantaneous learning signal.

e-prop keeps D-RTRL's traces $\epsilon_t \approx \partial h_t / \partial W$ (for LIF and ALIF
neurons, e-prop's eligibility vectors) and pairs each with the learning signal of its own step only,
$\delta_t = \partial L_t / \partial h_t$ (the same-step paths through the readout), so that
$\nabla W \mathrel{+}= \sum_{n,s} \delta_t[n,s]\, \bar\epsilon_t[\dots, n, s]$, with $\bar\epsilon$
the traces, optionally low-pass filtered. Nothing is carried back through the step.
"""

import math
import operator
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._compiler import ETraceGraph, HiddenParamOpRelation
from .._compiler._run import flatten_weights
from ._d_rtrl import contract, in_weight_layout, trace_shape, trace_update, traced_pairs
from ._one_step import apply_blocks, linearise_step, unflatten_grads
from ._rule import AbstractOnlineAlgorithm


class EPropTraces(eqx.Module):
    """The state that [`eqtrace.EProp`][] carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `eps`: D-RTRL's traces (as in [`eqtrace.DRTRLTraces`][]), one per traced (relation, hidden
      group) pair, shaped as D-RTRL's (`weight.shape + (S,)`), at the current step.
    - `filtered`: with `kappa`, the low-pass filtered traces $\\bar\\epsilon$ (shaped as `eps`); else
      `None`.
    - `feedback`: with random feedback, the fixed matrix $B$ (shaped as the readout weight); else
      `None`.
    - `kappa`, `feedback_seed`: the rule's options (static).
    """

    state: object
    eps: tuple
    filtered: tuple | None = None
    feedback: jax.Array | None = None
    kappa: float | None = eqx.field(static=True, default=None)
    feedback_seed: int | None = eqx.field(static=True, default=None)


def _readout_index(graph: ETraceGraph, flat_w: list) -> int:
    """The flat index of the readout weight that random feedback replaces: the one weight with two or
    more axes that reaches no hidden state."""
    paths = graph.module_info.weight_paths
    found = [
        paths.index(e.weight_path)
        for e in graph.excluded_weights
        if e.reason == "non_temporal" and flat_w[paths.index(e.weight_path)].ndim >= 2
    ]
    if len(found) != 1:
        got = [paths[i] for i in found]
        raise ValueError(
            "Random feedback (`feedback='random'`) needs exactly one readout weight (a weight matrix that "
            f"reaches no hidden state, such as a stateless `Linear` readout of the spikes); got {got}. "
            "Use `feedback='symmetric'` for this model, or read the spikes through one `Linear` "
            "readout."
        )
    return found[0]


def _eprop_init(
    graph: ETraceGraph, params, state, *, kappa: float | None = None, feedback_seed: int | None = None
) -> EPropTraces:
    flat_w = flatten_weights(graph, params)
    if kappa is not None and graph.hidden_perturb is not None and graph.hidden_perturb.chained:
        raise ValueError(
            "Filtered traces (`kappa`) need hidden groups whose new values are not computed from one "
            "another within the step; this model computes some from others (as an LSTM's `h_t` from "
            "its new `c_t`). Use `kappa=None` for this model."
        )
    eps = []
    for r, g in traced_pairs(graph):
        rel = graph.hidden_param_op_relations[r]
        w = flat_w[rel.weight_index]
        eps.append(jnp.zeros(trace_shape(rel, w.shape) + (graph.hidden_groups[g].num_state,), w.dtype))
    feedback = None
    if feedback_seed is not None:
        w = flat_w[_readout_index(graph, flat_w)]
        b = jax.random.normal(jax.random.key(feedback_seed), w.shape, w.dtype)
        feedback = b / jnp.asarray(math.sqrt(w.shape[0]), w.dtype)
    return EPropTraces(
        state=state,
        eps=tuple(eps),
        filtered=None if kappa is None else tuple(eps),
        feedback=feedback,
        kappa=kappa,
        feedback_seed=feedback_seed,
    )


_eprop_init.__name__ = "EProp().init"  # how `check_traces` names the function that makes traces


def _linear_loss(y, cotangent) -> jax.Array:
    """`⟨y, cotangent⟩`, whose gradient in `y` is `cotangent`."""
    return jtu.tree_reduce(operator.add, jtu.tree_map(lambda a, b: jnp.sum(a * b), y, cotangent))


def _random_feedback(graph: ETraceGraph, params, traces: EPropTraces, x, target, loss_fn, y):
    """The step linearised with `B` in place of the readout weight in the backward pass: the loss
    `⟨∂L_t/∂y, y⟩` at `y = f(h_t) B + b`, whose signal per group is `(B ∂L_t/∂y) · ∂f/∂h_t` since `y`
    is affine in the readout weight, and whose same-step gradients pair that signal with `∂h_t/∂W`."""
    cotangent = jax.grad(lambda y: loss_fn(y, target))(y)
    arrays, rest = eqx.partition(params, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(arrays)
    leaves[_readout_index(graph, leaves)] = traces.feedback
    swapped = eqx.combine(jtu.tree_unflatten(treedef, leaves), rest)
    return linearise_step(graph, swapped, x, traces.state, cotangent, _linear_loss, diagonal=True)


def eligibility_step(
    graph: ETraceGraph,
    params,
    traces: EPropTraces,
    x,
    target,
    loss_fn: Callable,
    *,
    leak: float | None = None,
):
    """One step of e-prop's traces paired with the instantaneous (symmetric or random) signal; with
    `leak`, the traces decay by that constant instead of the blocks `D_t` (RFLO)."""
    lin = linearise_step(graph, params, x, traces.state, target, loss_fn, diagonal=True)
    signal = lin.delta
    grads = list(lin.grads)
    pairs = traced_pairs(graph)
    if traces.feedback is not None:
        swapped = _random_feedback(graph, params, traces, x, target, loss_fn, lin.y)
        signal = swapped.delta
        # A traced weight's same-step gradient, `δ_t · ∂h_t/∂W`, with the signal through `B`.
        for w in {graph.hidden_param_op_relations[r].weight_index for r, _ in pairs}:
            grads[w] = swapped.grads[w]
    new_eps, new_filtered = [], []
    for k, ((r, g), eps) in enumerate(zip(pairs, traces.eps)):
        rel = graph.hidden_param_op_relations[r]
        history, instant = trace_update(rel, g, lin, eps)
        # `δ_t` of a new value holds the paths through the values computed from it within the step
        # (an LSTM's `h_t` from `c_t`), so it pairs with the blocks that hold those fixed.
        paired = apply_blocks(in_weight_layout(rel, lin.d_local[g]), eps)
        if leak is not None:  # RFLO: the neurons' leak in place of their step Jacobian `D_t`
            history = paired = leak * eps
        new_eps.append(history + instant)
        if traces.filtered is not None:
            # `κ ē_{t-1} + ε_t`, of which `instant` is already in the same-step gradient.
            paired = paired + traces.kappa * traces.filtered[k]
            new_filtered.append(history + traces.kappa * traces.filtered[k] + instant)
        # The same-step gradient holds `δ_t · ∂h_t/∂W`; e-prop adds `δ_t · (ē_t - ∂h_t/∂W)`.
        w = rel.weight_index
        grads[w] = grads[w] + contract(rel, signal[g], paired)
    new = EPropTraces(
        state=lin.new_state,
        eps=tuple(new_eps),
        filtered=None if traces.filtered is None else tuple(new_filtered),
        feedback=traces.feedback,
        kappa=traces.kappa,
        feedback_seed=traces.feedback_seed,
    )
    return new, lin.y, lin.loss, unflatten_grads(params, grads)


class EProp(AbstractOnlineAlgorithm):
    r"""e-prop (Bellec et al., 2020) as a rule object, for [`eqtrace.online_grad`][] and
    [`eqtrace.batch_grad`][]: `eqtrace.online_grad(..., algorithm=eqtrace.EProp())`.

    Its eligibility traces are D-RTRL's: per position-diagonal relation and hidden group, a
    weight-shaped trace with a state axis,
    $\epsilon_t[\dots, n, s] = \sum_c D_t[n, s, c]\, \epsilon_{t-1}[\dots, n, c]
    + \partial h_t[n, s] / \partial W[\dots, n]$, with ETP outputs held fixed in $D_t$. For LIF and
    ALIF neurons this is e-prop's eligibility vector ($\partial h_t / \partial W$ through the
    neuron's own dynamics, the recurrent connections dropped); the spike's pseudo-derivative, which
    turns it into e-prop's eligibility trace, is part of the learning signal here. The learning
    signal is the instantaneous one, $\delta_t = \partial L_t / \partial h_t$ with $h_{t-1}$ held
    fixed (every same-step path through the readout), and a traced weight gets

    $$\nabla W \mathrel{+}= \sum_{n, s} \delta_t[n, s]\, \bar\epsilon_t[\dots, n, s], \qquad
    \bar\epsilon_t = \kappa\, \bar\epsilon_{t-1} + \epsilon_t \quad (\bar\epsilon_t = \epsilon_t
    \text{ without } \kappa).$$

    Where the weight also reaches the loss within the step by paths that avoid its hidden groups,
    those are added exactly (through $B$ with random feedback). Where a group computes some new
    values from others within the step (an LSTM's $h_t$ from its new $c_t$), $\delta_t$ of a value
    already holds the paths through those computed from it, and the past part of the trace is paired
    with it through the blocks that hold them fixed, so that each path counts once. Every other
    weight (a stateless readout included) gets its exact same-step gradient, as in e-prop.

    **Relation to D-RTRL.** With `window=0`, [`eqtrace.DRTRL`][] adds
    $\lambda_t \cdot \epsilon_{t-1}$ to the same-step gradient, with
    $\lambda_t = \delta_t D_t + \partial L_t / \partial h_{t-1}|_{\text{direct}}$; the same-step
    gradient of a traced weight is $\delta_t \cdot \partial h_t / \partial W$, so e-prop's
    $\delta_t \cdot \epsilon_t = \delta_t \cdot (D_t \epsilon_{t-1} + \partial h_t/\partial W)$ is
    the same sum whenever the loss reads the hidden state only through the new one (no direct
    $h_{t-1}$ term) and the new values of a group feed no other group's ETP operation within the
    step. A recurrent LIF or ALIF layer with a stateless `Linear` readout of its current spikes is
    such a model: there `EProp()` equals `DRTRL(window=0)` step by step; on a feed-forward LIF layer
    with that readout both equal BPTT. With a leaky readout, or with several layers, e-prop drops
    more than D-RTRL with `window >= 1` (the readout's and the later layers' state across time).

    **Random feedback.** `feedback="random"` replaces the readout weight $W_\text{out}$ by a fixed
    random matrix $B$ in the learning signal only ($\delta_t$ through $B\, \partial L_t/\partial y_t$
    instead of $W_\text{out}\, \partial L_t/\partial y_t$); the output, the loss and the readout's
    own gradient are unchanged. $B$ is drawn once, by `init`, with entries
    $\mathcal{N}(0, 1/I)$ for a readout of `I` inputs, and kept in the traces. This requires one
    readout weight: a weight matrix that reaches no hidden state, in which the output is affine
    ($y_t = f(h_t) W_\text{out} + b$, a stateless `Linear` readout of the spikes); a model with none
    or several such weights is refused with a `ValueError`. (The output must be affine in
    $W_\text{out}$ for the signal to be right; this is not checked.) The step is then linearised twice
    (once with $B$ in place of $W_\text{out}$ and the loss $\langle \partial L_t / \partial y_t,
    y_t \rangle$).

    **Filtered traces.** With `kappa` (the readout's leak $\kappa = e^{-\Delta t / \tau_\text{out}}$),
    the traces are low-pass filtered as above and paired with $\delta_t$, as e-prop pairs its
    filtered eligibility traces with the learning signal of a leaky readout. The filter acts on
    $\epsilon_t$, before the pseudo-derivative (which $\delta_t$ holds at step $t$); the paper
    filters the traces after it.

    **Fields:**

    - `feedback`: `"symmetric"` (the learning signal through the readout weights themselves) or
      `"random"` (through a fixed random matrix $B$).
    - `kappa`: `None` (no filter), or $0 \le \kappa < 1$, the decay of the filtered traces
      (refused by `init` on a model whose groups compute new values from one another).
    - `seed`: the seed of $B$ with `feedback="random"` (static: the same seed, the same $B$).

    **References:**

    G. Bellec, F. Scherr, A. Subramoney, E. Hajek, D. Salaj, R. Legenstein and W. Maass, *A solution
    to the learning dilemma for recurrent networks of spiking neurons*, Nature Communications 11,
    3625 (2020).
    """

    feedback: str = eqx.field(static=True, default="symmetric")  # "symmetric" or "random"
    kappa: float | None = eqx.field(static=True, default=None)
    seed: int = eqx.field(static=True, default=0)
    batch_native: ClassVar[bool] = False

    def __check_init__(self):
        if self.feedback not in ("symmetric", "random"):
            raise ValueError(f"`feedback` must be 'symmetric' or 'random', got {self.feedback!r}.")
        if self.kappa is not None and not (isinstance(self.kappa, int | float) and 0 <= self.kappa < 1):
            raise ValueError(f"`kappa` must be `None` or a float in [0, 1), got {self.kappa!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}.")

    def _options(self) -> dict:
        kappa = None if self.kappa is None else float(self.kappa)
        return {"kappa": kappa, "feedback_seed": self.seed if self.feedback == "random" else None}

    def init(self, graph: ETraceGraph, params, state) -> EPropTraces:
        return _eprop_init(graph, params, state, **self._options())

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, EPropTraces, _eprop_init)
        options = self._options()
        made = {"kappa": traces.kappa, "feedback_seed": traces.feedback_seed}
        if made != options:
            raise ValueError(
                f"`traces` were made with the options {made}, but this rule has {options}: make them "
                "with this rule's `init`."
            )
        return eligibility_step(graph, params, traces, x, target, loss_fn)

    def traces_relation(self, relation: HiddenParamOpRelation) -> bool:
        return relation.per_position
