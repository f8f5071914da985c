"""Learning from a live stream: one step per call, an optimiser update every `every` steps."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree

from .._compiler import ETraceGraph
from .._compiler._run import check_graph_matches
from ._drivers import as_algorithm
from ._one_step import trainable_part
from ._rule import AbstractOnlineAlgorithm


class StreamState(eqx.Module):
    """What a [`eqtrace.Stream`][] carries from step to step.

    **Fields:**

    - `traces`: the rule's traces, which carry the model's hidden state (`traces.state`).
    - `grads`: the gradient summed over the steps since the last update, in the structure of the
      rule's gradients (`eqx.filter(params, eqx.is_inexact_array)`, `None` at frozen leaves).
    - `opt_state`: the optimiser's state.
    - `count`: the number of steps since the last update (an integer scalar array).
    """

    traces: PyTree
    grads: PyTree
    opt_state: PyTree
    count: Int[Array, ""]


class Stream(eqx.Module):
    r"""Online learning from a live stream: each call of `step` takes one time step, adds its
    gradient to a running sum, and every `every` steps applies the optimiser to that sum.

    After $k$ steps since an update, the sum is exactly what [`eqtrace.online_grad`][] returns for
    those $k$ steps (with the same traces), so `every=k` updates the weights with the online gradient
    of $\sum_t L_t$ over each block of $k$ steps; the traces run on across updates. `init` and `step`
    are pure functions: wrap `step` in `eqx.filter_jit` (with `donate="all"` to reuse the buffers of
    the weights, traces and optimiser state), as for any Equinox model.

    **Arguments:**

    - `graph`: the model's [`eqtrace.ETraceGraph`][].
    - `loss_fn`: `loss_fn(y, target) -> scalar`, the per-step loss $L_t$.
    - `optim`: an Optax optimiser (anything with `init(params)` and `update(grads, opt_state,
      params)`).
    - `algorithm`: the rule, e.g. [`eqtrace.DRTRL`][]`()` (the default, `"d_rtrl"`) or
      [`eqtrace.ESDRTRL`][]`(decay=0.9)`, or a shorthand string.
    - `every`: apply the optimiser every `every` steps (default 1: every step).

    !!! example

        ```python
        graph = eqtrace.compile_etrace_graph(model, x0, model.init_state())
        stream = eqtrace.Stream(graph, loss_fn, optax.adam(1e-3), every=10)
        carry = stream.init(model, model.init_state())
        step = eqx.filter_jit(stream.step, donate="all")
        for x, target in live_source:
            model, carry, y, loss = step(model, carry, x, target)
        ```
    """

    graph: ETraceGraph = eqx.field(static=True)
    loss_fn: Callable = eqx.field(static=True)
    optim: Any = eqx.field(static=True)
    algorithm: AbstractOnlineAlgorithm
    every: int = eqx.field(static=True)

    def __init__(
        self,
        graph: ETraceGraph,
        loss_fn: Callable,
        optim,
        algorithm: str | AbstractOnlineAlgorithm = "d_rtrl",
        *,
        every: int = 1,
    ):
        if not isinstance(graph, ETraceGraph):
            raise TypeError(
                "`graph` must be an `eqtrace.ETraceGraph`, made by `eqtrace.compile_etrace_graph(model, "
                f"x, state)`, got {type(graph).__name__}."
            )
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be a function `loss_fn(y, target) -> scalar`, got {loss_fn!r}.")
        if not (callable(getattr(optim, "init", None)) and callable(getattr(optim, "update", None))):
            raise TypeError(
                "`optim` must be an Optax optimiser (with `init` and `update`), e.g. `optax.adam(1e-3)`, "
                f"got {type(optim).__name__}."
            )
        if isinstance(every, bool) or not (isinstance(every, int) and every >= 1):
            raise ValueError(f"`every` must be an integer >= 1 (steps per update), got {every!r}.")
        self.graph = graph
        self.loss_fn = loss_fn
        self.optim = optim
        self.algorithm = as_algorithm(algorithm, {})
        self.every = every

    def init(self, params: PyTree, state: PyTree) -> StreamState:
        """The stream's carry before the first step.

        **Arguments:**

        - `params`: the model, or its array part `eqx.filter(model, eqx.is_array)`.
        - `state`: the model's initial hidden state.

        **Returns:**

        A [`eqtrace.StreamState`][]: the rule's initial traces, a zero gradient sum, the
        optimiser's initial state and a zero step count.
        """
        check_graph_matches(self.graph, params, state=state)
        trainable = trainable_part(self.graph, params)
        return StreamState(
            traces=self.algorithm.init(self.graph, params, state),
            grads=jtu.tree_map(jnp.zeros_like, trainable),
            opt_state=self.optim.init(trainable),
            count=jnp.zeros((), jnp.int32),
        )

    def step(
        self, params: PyTree, carry: StreamState, x: PyTree, target: PyTree
    ) -> tuple[PyTree, StreamState, PyTree, Float[Array, ""]]:
        """Take one time step, and update `params` if it is the `every`-th since the last update.

        **Arguments:**

        - `params`: the model (or its array part), as `init` got it or the previous step returned
          it.
        - `carry`: the [`eqtrace.StreamState`][] after the previous step.
        - `x`, `target`: this step's input and target (no time axis).

        **Returns:**

        `(params, carry, y, loss)`: the weights (updated on every `every`-th step, else as given),
        the new carry, the model's output and this step's loss $L_t$.
        """
        if not isinstance(carry, StreamState):
            raise TypeError(
                "`carry` must be the `eqtrace.StreamState` that `stream.init(params, state)` or the "
                f"previous `stream.step` returned, got {type(carry).__name__}."
            )
        check_graph_matches(self.graph, params, x)
        traces, y, loss, grads = self.algorithm.step(
            self.graph, params, carry.traces, x, target, self.loss_fn
        )
        grads = jtu.tree_map(jnp.add, carry.grads, grads)
        count = carry.count + 1
        dynamic, static = eqx.partition(params, eqx.is_array)

        def update(dynamic, grads, opt_state):
            params = eqx.combine(dynamic, static)
            # Optax mixes Python scalars and arrays of other dtypes inside its updates.
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = self.optim.update(grads, opt_state, trainable_part(self.graph, params))
                params = eqx.apply_updates(params, updates)
            zeros = jtu.tree_map(jnp.zeros_like, grads)
            return eqx.filter(params, eqx.is_array), zeros, opt_state, jnp.zeros_like(count)

        def wait(dynamic, grads, opt_state):
            return dynamic, grads, opt_state, count

        dynamic, grads, opt_state, count = jax.lax.cond(
            count >= self.every, update, wait, dynamic, grads, carry.opt_state
        )
        carry = StreamState(traces=traces, grads=grads, opt_state=opt_state, count=count)
        return eqx.combine(dynamic, static), carry, y, loss
