"""What a learning rule is: an `eqx.Module` whose fields are its options, with `init` and `step`."""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
from jaxtyping import Array, Float, PyTree

from .._compiler import ETraceGraph, HiddenParamOpRelation
from ._inputs import check_traces


class AbstractOnlineAlgorithm(eqx.Module):
    """An online learning rule, as Diffrax's solvers and Optax's transformations are: its options
    are its fields (`eqtrace.ESDRTRL(decay=0.8, window=2)`), and it is used through two pure
    functions over a compiled graph.

    `batch_native` (a class variable) says whether `step` takes a whole batch at once
    (`batched=True`), so that its weight gradients contract the batch inside one matmul; the drivers
    `jax.vmap` the other rules over examples.

    Rules are hashable and immutable: pass them to `eqx.filter_jit` functions freely.
    """

    batch_native: eqx.AbstractClassVar[bool]
    # Whether the traces credit every temporal path (RTRL's full influence matrix), so that no
    # relation or exclusion of the graph limits what a weight gets.
    exact: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, graph: ETraceGraph, params: PyTree, state: PyTree) -> PyTree:
        """The rule's traces before the first step, carrying the hidden `state`.

        **Arguments:**

        - `graph`: the model's [`eqtrace.ETraceGraph`][].
        - `params`: the model, or its array part `eqx.filter(model, eqx.is_array)`, frozen leaves
          included (the graph's `filter_spec` says which are frozen: they get no trace).
        - `state`: the initial hidden state pytree (with a leading batch axis under `jax.vmap`).
        """

    @abc.abstractmethod
    def step(
        self,
        graph: ETraceGraph,
        params: PyTree,
        traces: PyTree,
        x: PyTree,
        target: PyTree,
        loss_fn: Callable,
        *,
        batched: bool = False,
    ) -> tuple[PyTree, PyTree, Array, PyTree]:
        """Advance the traces by one step.

        **Arguments:**

        - `graph`, `params`: as for `init`.
        - `traces`: the traces after the previous step.
        - `x`, `target`: this step's input and target.
        - `loss_fn`: `loss_fn(y, target) -> scalar`, the per-step loss $L_t$.
        - `batched`: for a `batch_native` rule, `x`, `target` and the traces carry a leading batch
          axis and the loss is the batch mean.

        **Returns:**

        `(traces, y, loss, grads)`: the new traces, the model's output, $L_t$, and this step's
        contribution to $\\nabla_\\theta \\sum_t L_t$ in the structure of
        `eqx.filter(params, eqx.is_inexact_array)`, `None` at the graph's frozen leaves.
        """

    def _check_step(
        self, graph: ETraceGraph, params: PyTree, traces: PyTree, batched: bool, kind: type, init: Callable
    ) -> None:
        """What every `step` checks first: that a rule which is not `batch_native` is not asked to step
        a batch, and that `traces` are the `kind` that `init(graph, params, state, **options)` makes
        (see `check_traces`; `init.__name__` names it in the error)."""
        if batched and not self.batch_native:
            name = type(self).__name__
            raise ValueError(f"`{name}` steps one example at a time: `jax.vmap` it over a batch.")
        check_traces(traces, kind, init, graph, params, batched=batched)

    @abc.abstractmethod
    def traces_relation(self, relation: HiddenParamOpRelation) -> bool:
        """Whether the rule keeps a trace for `relation`; a weight in no traced relation gets its
        exact gradient within the rule's window only."""


class GradFactors(eqx.Module):
    """One weight's gradient contribution left as factors: `leftᵀ @ right`, a sum of outer products
    of their rows, which a driver can contract for many steps at once.

    **Fields:**

    - `weight_index`: the weight's index among the model's array leaves (`module_info.weight_paths`).
    - `left`, `right`: `(rows, in_features)` and `(rows, out_features)`.
    """

    weight_index: int = eqx.field(static=True)
    left: Float[Array, "rows in_features"]
    right: Float[Array, "rows out_features"]


class AbstractDeferringAlgorithm(AbstractOnlineAlgorithm):
    """A rule that can leave the gradients of some weights as [`eqtrace.GradFactors`][]. At a small batch
    each step adds only a low-rank update to such a weight; the drivers keep the factors of many
    steps and contract them in one matmul, rather than read and write a weight-sized accumulator
    every step. `step` gives the same gradients dense."""

    @abc.abstractmethod
    def deferred_step(
        self,
        graph: ETraceGraph,
        params: PyTree,
        traces: PyTree,
        x: PyTree,
        target: PyTree,
        loss_fn: Callable,
        *,
        batched: bool = False,
    ) -> tuple[PyTree, PyTree, Array, PyTree, tuple[GradFactors, ...]]:
        """`step`, with the gradients of some weights left as factors.

        **Returns:**

        `(traces, y, loss, grads, factors)`: as for `step`, except that `grads` is `None` at the
        weights of `factors`, which hold their gradient (`()`: none).
        """
