r"""Truncated BPTT: each step's loss back-propagated exactly through the last `K` steps only.

Step $t$ runs the last $K$ steps again from the stored state $h_{t-K}$ and takes
$\nabla_\theta L_t$ through them, with $h_{t-K}$ held fixed: what lies before the window is not
credited. Memory is $O(K)$ (the window's inputs and its anchor state), constant in the sequence
length; there are no traces.
"""

from typing import ClassVar

import equinox as eqx

from .._compiler import ETraceGraph
from .._compiler._run import flatten_weights
from ._one_step import linearise_step, unflatten_grads
from ._rule import AbstractOnlineAlgorithm
from ._window import window_init, WindowBuffer


class TruncatedBPTTTraces(eqx.Module):
    """What truncated BPTT carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `buffer`: the [`eqtrace.WindowBuffer`][] of a window `K > 1` (the state $h_{t-K}$ and the
      window's inputs), else `None`.
    - `window`: the window `K` (static).
    """

    state: object
    buffer: WindowBuffer | None = None
    window: int = eqx.field(static=True, default=1)


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"`window` must be an integer >= 1 (the number of steps each loss is back-propagated "
            f"through), got {window!r}."
        )
    return window


def _init(graph: ETraceGraph, params, state, *, window: int = 1) -> TruncatedBPTTTraces:
    flatten_weights(graph, params)
    return TruncatedBPTTTraces(state=state, buffer=window_init(graph, state, window), window=window)


_init.__name__ = "TruncatedBPTT(window=K).init"  # how `check_traces` names the function that makes traces


class TruncatedBPTT(AbstractOnlineAlgorithm):
    """Truncated back-propagation through time, as an online rule: step $t$ back-propagates its loss
    $L_t$ exactly through steps $t-K+1, \\dots, t$, from the true state $h_{t-K}$, and credits
    nothing before it. `eqtrace.online_grad(..., algorithm=eqtrace.TruncatedBPTT(window=3))`.

    It keeps no traces (`traces_relation` is `False` for every relation): the baseline that the
    trace-based rules extend, which with the same `window` add an estimate of what lies before the
    window. A window as long as the sequence gives [`eqtrace.bptt_grad`][]'s gradient. Memory is
    $O(K)$ per example; it steps whole batches at once.

    **Fields:**

    - `window`: `K >= 1`, the number of steps each loss is back-propagated through (`1`: the
      same-step gradient only).
    """

    window: int = eqx.field(static=True, default=1)
    batch_native: ClassVar[bool] = True

    def __check_init__(self):
        _check_window(self.window)

    def init(self, graph: ETraceGraph, params, state) -> TruncatedBPTTTraces:
        return _init(graph, params, state, window=self.window)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, TruncatedBPTTTraces, _init)
        lin = linearise_step(
            graph, params, x, traces.state, target, loss_fn, buffer=traces.buffer, batched=batched
        )
        new = TruncatedBPTTTraces(state=lin.new_state, buffer=lin.buffer, window=traces.window)
        return new, lin.y, lin.loss, unflatten_grads(params, lin.grads)

    def traces_relation(self, relation) -> bool:
        return False
