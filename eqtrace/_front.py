"""A braintrace-style front: an immutable algorithm object whose compile step returns a compiled
algorithm, with the graph and the learning methods bound to it."""

import abc
import copy
import dataclasses
from collections.abc import Callable

import equinox as eqx

from ._algorithms import AbstractOnlineAlgorithm, DRTRL, ESDRTRL
from ._algorithms._drivers import online_grad
from ._compiler import compile_etrace_graph, ETraceGraph, run_step, show_graph
from ._compiler._run import check_graph_matches


class CompiledAlgorithm(eqx.Module):
    """An online-learning algorithm bound to a model and its compiled graph.

    **Fields:**

    - `model`: the model.
    - `graph`: its [`eqtrace.ETraceGraph`][] (static: passing this object through `eqx.filter_jit`
      does not retrace).
    - `algorithm`: the rule, e.g. [`eqtrace.DRTRL`][]`(window=1)`.
    """

    model: eqx.Module
    graph: ETraceGraph = eqx.field(static=True)
    algorithm: AbstractOnlineAlgorithm

    def __reduce__(self):
        return self.graph.__reduce__()  # raises: graphs are recompiled, not pickled

    def __deepcopy__(self, memo) -> "CompiledAlgorithm":
        return dataclasses.replace(self, model=copy.deepcopy(self.model, memo))

    def show_graph(self) -> None:
        """Print the compiled graph (see [`eqtrace.show_graph`][])."""
        show_graph(self.graph)

    def __call__(self, x, state):
        """Run one step `(y, new_state)` of the compiled model, checking `x` and `state` against the
        shapes the graph was compiled for."""
        check_graph_matches(self.graph, self.model, x, state)
        return run_step(self.graph, self.model, x, state)

    def init_traces(self, state):
        """The algorithm's initial traces, carrying the hidden `state`."""
        check_graph_matches(self.graph, self.model, state=state)
        return self.algorithm.init(self.graph, self.model, state)

    def step(self, traces, x, target, loss_fn: Callable):
        """One online step: `(traces, y, loss, grads)`, as [`eqtrace.d_rtrl_step`][]."""
        check_graph_matches(self.graph, self.model, x, getattr(traces, "state", None))
        return self.algorithm.step(self.graph, self.model, traces, x, target, loss_fn)

    def online_grad(self, state, xs, targets, loss_fn: Callable):
        """`(grads, losses)` over a sequence, as [`eqtrace.online_grad`][]."""
        return online_grad(self.model, state, xs, targets, loss_fn, self.algorithm, graph=self.graph)


class _Algorithm(eqx.Module):
    model: eqx.AbstractVar[eqx.Module]

    @abc.abstractmethod
    def _rule(self) -> AbstractOnlineAlgorithm:
        """The rule object with this front's options."""

    def compile_graph(self, x, state=None, *, filter_spec=eqx.is_inexact_array) -> CompiledAlgorithm:
        """Compile the model's graph for inputs shaped like `x` (and `state`, default
        `model.init_state()`), with the leaves that `filter_spec` leaves out frozen (see
        [`eqtrace.compile_etrace_graph`][]), and return the compiled algorithm."""
        graph = compile_etrace_graph(self.model, x, state, filter_spec=filter_spec)
        return CompiledAlgorithm(self.model, graph, self._rule())


class D_RTRL(_Algorithm):
    """Diagonal RTRL, braintrace style: `D_RTRL(model).compile_graph(x)` compiles the graph and
    returns a [`eqtrace.CompiledAlgorithm`][] with `.graph`, `.show_graph()`, `.init_traces`,
    `.step` and `.online_grad`.

    **Arguments:**

    - `model`: a model with `model(x, state) -> (y, new_state)` and `model.init_state()`.
    - `window`: back-propagate each loss exactly through the last `window` steps (see
      [`eqtrace.d_rtrl_init`][]).

    !!! example

        ```python
        algo = eqtrace.D_RTRL(model).compile_graph(jnp.zeros(10))
        algo.show_graph()
        grads, losses = algo.online_grad(model.init_state(), xs, targets, loss_fn)
        ```
    """

    model: eqx.Module
    window: int = eqx.field(static=True, default=1)

    def _rule(self):
        return DRTRL(window=self.window)


class ES_D_RTRL(_Algorithm):
    """ES-D-RTRL (pp_prop), braintrace style; see [`eqtrace.D_RTRL`][].

    **Arguments:**

    - `model`: a model with `model(x, state) -> (y, new_state)` and `model.init_state()`.
    - `decay`: the input traces' decay $\\alpha \\in [0, 1]$.
    - `normalise`, `window`, `exact_step`: see [`eqtrace.es_d_rtrl_init`][].
    """

    model: eqx.Module
    decay: float = eqx.field(static=True, default=0.9)
    normalise: bool = eqx.field(static=True, default=True)
    window: int = eqx.field(static=True, default=1)
    exact_step: bool = eqx.field(static=True, default=True)

    def _rule(self):
        return ESDRTRL(
            decay=self.decay, normalise=self.normalise, window=self.window, exact_step=self.exact_step
        )


pp_prop = ES_D_RTRL
