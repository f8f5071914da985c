r"""SnAp-1: the influence matrix kept on a one-step sparsity pattern.

SnAp-1 keeps part of the influence matrix $\partial h_t / \partial \theta$ and updates it with the
full step Jacobian restricted to that part. Here the part is the layout of D-RTRL's traces (each
weight's entries for the states of the groups its relation feeds, at the weight's own position),
and SnAp-1 differs from D-RTRL only in the blocks the trace is carried through:
$\epsilon_t[\dots, n, s] = \sum_c J_t[n, s, c]\, \epsilon_{t-1}[\dots, n, c] +
\partial h_t[n, s] / \partial W[\dots, n]$, where $J_t[n] = \partial h_t[n] / \partial h_{t-1}[n]$
is the per-position diagonal block of the *full* step Jacobian (an RNN's $W_{hh}[n, n]$ term
included); D-RTRL's $D_t$ holds the outputs of ETP operations fixed.
"""

from typing import ClassVar

import equinox as eqx

from .._compiler import ETraceGraph, HiddenParamOpRelation
from ._d_rtrl import d_rtrl_init, DRTRLTraces, trace_step
from ._rule import AbstractOnlineAlgorithm
from ._window import check_window


def _snap1_init(graph: ETraceGraph, params, state, *, window: int = 1) -> DRTRLTraces:
    return d_rtrl_init(graph, params, state, window=window)


_snap1_init.__name__ = "SnAp1().init"  # how `check_traces` names the function that makes traces


class SnAp1(AbstractOnlineAlgorithm):
    r"""SnAp-1 (Menick et al., 2021) as a rule object, for [`eqtrace.online_grad`][] and
    [`eqtrace.batch_grad`][]: `eqtrace.online_grad(..., algorithm=eqtrace.SnAp1())`.

    It keeps D-RTRL's traces (a [`eqtrace.DRTRLTraces`][], one weight-shaped trace with a state axis
    per position-diagonal relation and hidden group: the influence of `W[..., n]` on the states at
    position $n$ of the groups it feeds), and carries them through the per-position diagonal blocks
    of the full step Jacobian,

    $$\epsilon_t[\dots, n, s] = \sum_c J_t[n, s, c]\, \epsilon_{t-1}[\dots, n, c]
    + \frac{\partial h_t[n, s]}{\partial W[\dots, n]}, \qquad
    J_t[n, s, c] = \frac{\partial h_t[n, s]}{\partial h_{t-1}[n, c]},$$

    where [`eqtrace.DRTRL`][] holds the outputs of ETP operations fixed in $J_t$. The recurrent
    mixing of an ETP operation that reads $h_{t-1}$ thus reaches the trace through its diagonal:
    a vanilla RNN $h_t = \tanh(x_t W_{xh} + h_{t-1} W_{hh})$ has
    $J_t[n] = (1 - h_t[n]^2)\, W_{hh}[n, n]$, where D-RTRL has $0$. The instantaneous term, the
    exact window and the gradient are D-RTRL's: with `window=K`,
    $\nabla W \mathrel{+}= \partial L_t/\partial W|_{h_{t-K}} + \sum_{n,c} \lambda_t[n,c]\,
    \epsilon_{t-K}[\dots, n, c]$, $\lambda_t = \partial L_t/\partial h_{t-K}$. On a model whose ETP
    operations read no hidden state of the group they feed (IndRNN, feed-forward spiking layers),
    SnAp-1 is D-RTRL.

    Influence that one step spreads beyond that layout (a GRU's reset gate read through $W_{hh}$,
    a later layer read within the step) is dropped, as D-RTRL drops it.

    The blocks cost $O(N)$ JVPs of the step per step: one per position and state of every hidden
    group ($N$ positions), since the full Jacobian mixes positions and its diagonal is read off one
    column at a time. The traces' memory is D-RTRL's.

    **Fields:**

    - `window`: `K >= 1`: back-propagate each loss exactly through the last `K` steps and use the
      traces beyond; `0`: the learning signal carried back one step through the per-position
      diagonal blocks of the full step Jacobian (plus what the loss reads of $h_{t-1}$ directly).

    **References:**

    J. Menick, E. Elsen, U. Evci, S. Osindero, K. Simonyan and A. Graves, *Practical real time
    recurrent learning with a sparse approximation*, ICLR 2021.
    """

    window: int = eqx.field(static=True, default=1)
    batch_native: ClassVar[bool] = True

    def __check_init__(self):
        check_window(self.window)

    def init(self, graph: ETraceGraph, params, state) -> DRTRLTraces:
        return _snap1_init(graph, params, state, window=self.window)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, DRTRLTraces, _snap1_init)
        return trace_step(graph, params, traces, x, target, loss_fn, full_jacobian=True, batched=batched)

    def traces_relation(self, relation: HiddenParamOpRelation) -> bool:
        return relation.per_position
