"""Check an online rule against BPTT, weight by weight, and say why each weight is credited as it is."""

import dataclasses
from collections.abc import Callable
from typing import cast

import equinox as eqx
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._algorithms import AbstractOnlineAlgorithm, bptt_grad, online_grad
from ._algorithms._drivers import as_algorithm, graph_for
from ._algorithms._inputs import check_frozen, check_sequences, step_example
from ._compiler import ETraceGraph
from ._compiler._compile import key_to_path
from ._compiler._freeze import trainable_spec
from ._compiler._graph import Path
from ._compiler._run import check_graph_matches
from ._compiler._show import _p


@dataclasses.dataclass(frozen=True)
class GradientCheckRow:
    r"""One trainable leaf (or the whole model) compared with BPTT.

    **Fields:**

    - `path`: the leaf's key path in the model, e.g. `('rnn', 'W', 'weight')`; `None` for the
      whole-model row.
    - `status`: how the rule credits the leaf's past: `"traced"` (in a relation that the rule
      keeps a trace for), `"partly traced"` (traced, but also used in a way the traces do not
      follow), `"window only"` (`window > 1`) or `"same-step only"` (`window <= 1`) (no trace: the
      exact gradient through the rule's window only); `"whole model"` for the whole-model row.
    - `reason`: for a leaf that is not fully traced, why: a reason of
      [`eqtrace.ExcludedWeight`][] (`non_temporal`, `untraced_use`, …), or
      `shared_across_positions` for a weight shared across positions with no per-position
      layout (a matrix shared by the rows of an einsum), which D-RTRL does not trace, or
      `no_trace_kept` under a rule that keeps no traces (truncated BPTT); `None` otherwise. Under
      an exact rule (RTRL) every leaf is `traced`.
    - `detail`: a sentence that names the operations involved (empty if there is nothing to say).
    - `cosine`: cosine similarity $\langle g, g_\text{BPTT} \rangle / (\lVert g \rVert
      \lVert g_\text{BPTT} \rVert)$ ($0$ if the online gradient is zero); `None` when the BPTT
      gradient is zero.
    - `relative_error`: $\lVert g - g_\text{BPTT} \rVert / \lVert g_\text{BPTT} \rVert$; `None`
      when the BPTT gradient is zero.
    - `norm`, `norm_bptt`: $\lVert g \rVert$ and $\lVert g_\text{BPTT} \rVert$.
    """

    path: Path | None
    status: str
    reason: str | None
    detail: str
    cosine: float | None
    relative_error: float | None
    norm: float
    norm_bptt: float

    @property
    def bptt_is_zero(self) -> bool:
        """Whether the BPTT gradient of this leaf is exactly zero (no cosine or relative error)."""
        return self.norm_bptt == 0.0


@dataclasses.dataclass(frozen=True)
class GradientCheck:
    """What [`eqtrace.check_gradient`][] found: one row per trainable leaf and one for the whole model.

    **Fields:**

    - `algorithm`: the rule checked, e.g. [`eqtrace.DRTRL`][]`(window=1)`.
    - `num_steps`: the length of the sequence checked.
    - `rows`: a [`eqtrace.GradientCheckRow`][] per trainable (inexact) leaf, in the model's order.
    - `total`: the row of the whole model's gradient, all leaves together.

    `str(check)` is the table that `verbose=True` prints; `check[path]` is the row of the leaf at
    `path`.
    """

    algorithm: AbstractOnlineAlgorithm
    num_steps: int
    rows: tuple[GradientCheckRow, ...]
    total: GradientCheckRow

    @property
    def min_cosine(self) -> float:
        """The smallest cosine similarity over the leaves whose BPTT gradient is not zero (`1.0` if
        there is none)."""
        return min((r.cosine for r in self.rows if r.cosine is not None), default=1.0)

    @property
    def max_relative_error(self) -> float:
        """The largest relative error over the leaves whose BPTT gradient is not zero (`0.0` if there
        is none)."""
        return max((r.relative_error for r in self.rows if r.relative_error is not None), default=0.0)

    def __getitem__(self, path: Path) -> GradientCheckRow:
        for row in self.rows:
            if row.path == tuple(path):
                return row
        raise KeyError(f"No trainable leaf at {path!r}; the leaves are {[r.path for r in self.rows]}.")

    def __str__(self) -> str:
        return _format(self)


def _compare(path, status, reason, detail, g: np.ndarray, g_bptt: np.ndarray) -> GradientCheckRow:
    norm, norm_bptt = float(np.linalg.norm(g)), float(np.linalg.norm(g_bptt))
    if norm_bptt == 0.0:
        cosine = error = None
    else:
        cosine = float(np.vdot(g, g_bptt) / (norm * norm_bptt)) if norm > 0.0 else 0.0
        error = float(np.linalg.norm(g - g_bptt) / norm_bptt)
    return GradientCheckRow(path, status, reason, detail, cosine, error, norm, norm_bptt)


def _status(graph: ETraceGraph, path: Path, rule: AbstractOnlineAlgorithm) -> tuple[str, str | None, str]:
    """How `rule` credits the leaf at `path`: `(status, reason, detail)`."""
    untraced = "window only" if getattr(rule, "window", 1) > 1 else "same-step only"
    if rule.exact:
        return "traced", None, ""
    relations = [r for r in graph.hidden_param_op_relations if r.weight_path == path]
    traced = [r for r in relations if rule.traces_relation(r)]
    shared = [r for r in relations if r not in traced]
    partly = [w for w in graph.partly_traced_weights if w.weight_path == path]
    excluded = [w for w in graph.excluded_weights if w.weight_path == path]
    name = type(rule).__name__
    if shared and not any(rule.traces_relation(r) for r in graph.hidden_param_op_relations):
        reason: str | None = "no_trace_kept"
        detail = f"{name} keeps no trace"
    elif shared:
        reason = "shared_across_positions"
        names = ", ".join(sorted({r.primitive.name for r in shared}))
        detail = f"{names}: it is shared across positions; {name} keeps no trace for it"
    elif partly:
        reason, detail = partly[0].reason, partly[0].detail
    elif excluded:
        reason, detail = excluded[0].reason, excluded[0].detail
    else:
        reason, detail = None, ""
    if traced and reason is None:
        if all(not g.recurrent for r in traced for g in r.hidden_groups):
            detail = (
                "its group recurs only through ETP operations (D = 0): that recurrence is credited "
                "within the window only"
            )
        return "traced", None, detail
    if traced:
        return "partly traced", reason, detail
    if reason is None:
        reason, detail = "no_etp_op", "in no relation of the graph"
    return untraced, reason, detail


def check_gradient(
    model: eqx.Module,
    state: PyTree,
    xs: PyTree,
    targets: PyTree,
    loss_fn: Callable,
    algorithm: str | AbstractOnlineAlgorithm = "d_rtrl",
    *,
    graph: ETraceGraph | None = None,
    verbose: bool = True,
    filter_spec: PyTree = None,
    **options,
) -> GradientCheck:
    r"""Compare an online rule's gradient with BPTT's on one (short) sequence, leaf by leaf.

    Runs [`eqtrace.online_grad`][] and [`eqtrace.bptt_grad`][] on the same sequence and, for every
    trainable leaf, reports how the rule credits it (from the compiled graph) and how close its
    gradient comes to BPTT's: the cosine similarity, the relative error
    $\lVert g - g_\text{BPTT} \rVert / \lVert g_\text{BPTT} \rVert$ and both norms. A leaf's status
    is one of

    - `traced`: in a relation the rule keeps a trace for. The gradient is exact where the rule is
      (one hidden group with position-wise recurrence, for D-RTRL); otherwise the numbers say how
      far it is.
    - `partly traced`: traced, and also used in a way the traces do not follow
      (`graph.partly_traced_weights`, reason `untraced_use`; or, for D-RTRL, a kernel shared across
      positions next to a traced use). That use is credited within the window only.
    - `window only` (`window > 1`) or `same-step only` (`window <= 1`): in no relation the rule
      traces (`graph.excluded_weights`, with their reason). The leaf gets the exact gradient
      through the window, nothing before it.

    A leaf whose BPTT gradient is zero has no cosine or relative error (`None`), and the table says
    so.

    This runs BPTT, whose memory grows with the sequence: use a short sequence, one example.

    **Arguments:**

    - `model`, `state`, `xs`, `targets`, `loss_fn`: as for [`eqtrace.online_grad`][] (one example:
      `xs` and `targets` with a leading time axis).
    - `algorithm`: the rule, as for [`eqtrace.online_grad`][]: an object such as
      [`eqtrace.DRTRL`][]`(window=2)`, or a shorthand string with `options`.
    - `graph`: a precompiled [`eqtrace.ETraceGraph`][] (optional).
    - `verbose`: print the table.
    - `filter_spec`: which leaves are trained, as for [`eqtrace.online_grad`][]: frozen leaves get
      no row.
    - `options`: with a shorthand string, the rule's options, as for [`eqtrace.online_grad`][].

    **Returns:**

    An [`eqtrace.GradientCheck`][]: its `rows` (one [`eqtrace.GradientCheckRow`][] per trainable
    leaf), its `total` (the whole model), and `min_cosine` / `max_relative_error` over the leaves.

    !!! example

        ```python
        check = eqtrace.check_gradient(model, state, xs, targets, loss_fn, window=0)
        assert check.total.cosine > 0.9
        print(check[("rnn", "W", "weight")].status)  # 'traced'
        ```
    """
    rule = as_algorithm(algorithm, options)
    num_steps = check_sequences(xs, targets)[0]
    if graph is None:
        graph = graph_for(model, step_example(xs, 1), state, filter_spec)
    else:
        check_graph_matches(graph, model, step_example(xs, 1), state)
        check_frozen(graph, model, filter_spec)
    online, _ = online_grad(model, state, xs, targets, loss_fn, rule, graph=graph)
    trainable = trainable_spec(model, graph.frozen_weights)
    reference, _ = bptt_grad(model, state, xs, targets, loss_fn, filter_spec=trainable)

    rows = []
    flat, flat_ref = [], []
    leaves = jtu.tree_flatten_with_path(reference)[0]
    for (keypath, g_ref), g in zip(leaves, jtu.tree_leaves(online), strict=True):
        path = key_to_path(keypath)
        g, g_ref = np.asarray(g, np.float64).ravel(), np.asarray(g_ref, np.float64).ravel()
        rows.append(_compare(path, *_status(graph, path, rule), g, g_ref))
        flat.append(g)
        flat_ref.append(g_ref)
    cat = lambda a: np.concatenate(a) if a else np.zeros(0)  # noqa: E731
    total = _compare(None, "whole model", None, "", cat(flat), cat(flat_ref))
    check = GradientCheck(rule, num_steps, tuple(rows), total)
    if verbose:
        print(check)
    return check


def _format(check: GradientCheck) -> str:
    lines = [f"check_gradient: {check.algorithm} against BPTT, {check.num_steps} steps", ""]
    paths = [_p(cast(Path, r.path)) for r in check.rows] + ["whole model"]  # leaf rows have paths
    statuses = [r.status for r in check.rows]
    wp = max(len("weight"), *map(len, paths))
    ws = max(len("status"), *map(len, statuses)) if statuses else len("status")

    def number(x, fmt):
        return "-" if x is None else format(x, fmt)

    def line(label, row):
        note = "BPTT gradient is zero" if row.bptt_is_zero else (row.reason or "")
        status = "" if row.path is None else row.status
        return (
            f"{label:<{wp}}  {status:<{ws}}  {number(row.cosine, '.6f'):>9}  "
            f"{number(row.relative_error, '.2e'):>9}  {row.norm:>9.3e}  {row.norm_bptt:>9.3e}  {note}"
        ).rstrip()

    header = (
        f"{'weight':<{wp}}  {'status':<{ws}}  {'cosine':>9}  {'rel. err':>9}  {'|g|':>9}  {'|g_bptt|':>9}"
    )
    lines += [header + "  note", "-" * (len(header) + 6)]
    lines += [line(p, r) for p, r in zip(paths, check.rows)]
    lines.append(line("whole model", check.total))
    notes = [(p, r) for p, r in zip(paths, check.rows) if r.detail]
    if notes:
        lines += ["", "Notes"]
        width = max(len(p) for p, _ in notes)
        for p, r in notes:
            lines.append(f"  {p:<{width}}  " + (f"{r.reason}: " if r.reason else "") + r.detail)
    return "\n".join(lines)
