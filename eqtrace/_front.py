"""A braintrace-style front: an immutable algorithm object whose compile step returns the graph."""

import equinox as eqx

from ._compiler import compile_etrace_graph, ETraceGraph, run_step, show_graph


class CompiledAlgorithm(eqx.Module):
    """An online-learning algorithm bound to a model and its compiled graph.

    **Fields:**

    - `model`: the model.
    - `graph`: its [`eqtrace.ETraceGraph`][] (static: passing this object through `eqx.filter_jit`
      does not retrace).
    - `name`: the algorithm's name.
    """

    model: eqx.Module
    graph: ETraceGraph = eqx.field(static=True)
    name: str = eqx.field(static=True)

    def show_graph(self) -> None:
        """Print the compiled graph (see [`eqtrace.show_graph`][])."""
        show_graph(self.graph)

    def __call__(self, x, state):
        """Run one step `(y, new_state)` of the compiled model, checking `x` and `state` against the
        shapes the graph was compiled for."""
        return run_step(self.graph, self.model, x, state)


class D_RTRL(eqx.Module):
    """Diagonal RTRL, braintrace style: `D_RTRL(model).compile_graph(x)` compiles the graph.

    **Arguments:**

    - `model`: a model with `model(x, state) -> (y, new_state)` and `model.init_state()`.

    !!! example

        ```python
        algo = eqtrace.D_RTRL(model).compile_graph(jnp.zeros(10))
        algo.show_graph()
        ```
    """

    model: eqx.Module

    def compile_graph(self, x, state=None) -> CompiledAlgorithm:
        """Compile the model's graph for inputs shaped like `x` (and `state`, default
        `model.init_state()`), and return the compiled algorithm."""
        graph = compile_etrace_graph(self.model, x, state)
        return CompiledAlgorithm(self.model, graph, "d_rtrl")
