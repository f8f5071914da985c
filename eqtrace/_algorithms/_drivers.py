"""Drivers: scan an online algorithm over a sequence, and average over a batch."""

import collections
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._compiler import compile_etrace_graph, ETraceGraph
from .._compiler._run import check_graph_matches
from ._d_rtrl import d_rtrl_init, d_rtrl_step
from ._es_d_rtrl import es_d_rtrl_init, es_d_rtrl_step
from ._inputs import check_batch_axis, check_sequences, step_example, zeros_shaped


ALGORITHMS: dict[str, tuple[Callable, Callable]] = {
    "d_rtrl": (d_rtrl_init, d_rtrl_step),
    "es_d_rtrl": (es_d_rtrl_init, es_d_rtrl_step),
}
# Algorithms whose step takes a whole batch (`batched=True`): their weight gradients then contract
# the batch inside the operation's transpose. The others are `jax.vmap`-ed over examples: D-RTRL's
# traces are per example anyway, and measured faster that way.
BATCH_NATIVE = frozenset({"es_d_rtrl"})

_GRAPHS: collections.OrderedDict = collections.OrderedDict()  # least recently used first
_MAX_GRAPHS = 64


def graph_for(model, x, state) -> ETraceGraph:
    """The compiled graph for this model structure and these input/state shapes, compiled once.

    Works inside `jit`/`vmap`: only the structure, shapes and dtypes are used.
    """
    dynamic, static = eqx.partition((model, x, state), eqx.is_array)
    leaves, treedef = jtu.tree_flatten(dynamic)
    static_leaves, static_def = jtu.tree_flatten(static)
    dtypes = [jax.dtypes.canonicalize_dtype(a.dtype, allow_extended_dtype=True) for a in leaves]
    shapes = tuple((tuple(a.shape), dtype) for a, dtype in zip(leaves, dtypes))
    key = (treedef, static_def, tuple(static_leaves), shapes)
    try:
        _GRAPHS.move_to_end(key)
        return _GRAPHS[key]
    except TypeError:  # an unhashable static value: compile without caching
        key = None
    except KeyError:
        pass
    with jax.ensure_compile_time_eval():
        concrete = [zeros_shaped(a.shape, a) for a in leaves]
        graph = compile_etrace_graph(*eqx.combine(jtu.tree_unflatten(treedef, concrete), static))
    if key is not None:
        _GRAPHS[key] = graph
        if len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    return graph


def _check_algorithm(algorithm: str) -> str:
    name = {"pp_prop": "es_d_rtrl"}.get(algorithm, algorithm)
    if name not in ALGORITHMS:
        raise ValueError(
            f"`algorithm` must be one of {sorted(ALGORITHMS)} (or 'pp_prop'), got {algorithm!r}."
        )
    return name


def online_grad(
    model,
    state,
    xs,
    targets,
    loss_fn: Callable,
    algorithm: str = "d_rtrl",
    *,
    graph=None,
    traces=None,
    return_traces: bool = False,
    **options,
):
    r"""Online gradient of $\sum_t L_t$ over a sequence, forward in time with constant memory.

    Compiles the model's graph once per model structure (or uses `graph`), then scans the
    algorithm's step over time. Same contract as [`eqtrace.bptt_grad`][].

    **Arguments:**

    - `model`: `model(x, state) -> (y, new_state)`.
    - `state`: the initial hidden state.
    - `xs`, `targets`: inputs and targets with a leading time axis.
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar`.
    - `algorithm`: `"d_rtrl"`, or `"es_d_rtrl"` (alias `"pp_prop"`).
    - `graph`: a precompiled [`eqtrace.ETraceGraph`][] (optional).
    - `traces`: the traces a previous call returned (`return_traces=True`), to continue a sequence
      where it stopped, exactly as one call over the whole sequence would; `state` is then `None`
      (the traces carry it) and the options are the traces' own.
    - `return_traces`: also return the traces after the last step.
    - `options`: passed to the algorithm's init: `window=K` (default 1) for both rules, and
      `decay=0.9`, `normalise=True` for ES-D-RTRL.

    **Returns:**

    `(grads, losses)`: gradients in the structure of `eqx.filter(model, eqx.is_inexact_array)`,
    and the per-step losses, shape `(T,)`; `(grads, losses, traces)` with `return_traces`.
    """
    return _online_grad(
        model, state, xs, targets, loss_fn, algorithm, graph, options, traces, return_traces, batched=False
    )


def _online_grad(
    model, state, xs, targets, loss_fn, algorithm, graph, options, traces, return_traces, *, batched: bool
):
    """`online_grad`; with `batched`, `state` has a leading batch axis and `xs`, `targets` are
    `(time, batch, ...)`: each step runs on the whole batch and its gradients are averaged at once,
    so the carry holds one gradient accumulator, not one per example."""
    init, step = ALGORITHMS[_check_algorithm(algorithm)]
    check_sequences(xs, targets, ("time", "batch") if batched else ("time",))
    if traces is not None:
        if state is not None or options:
            raise ValueError(
                "Given `traces`, `state` must be `None` and no algorithm options may be given: the "
                f"traces carry the state and their rule's options; got state={type(state).__name__} "
                f"and options {sorted(options)}."
            )
        state = traces.state
    x, s = step_example(xs, 2 if batched else 1), step_example(state, 1 if batched else 0)
    if graph is None:
        graph = graph_for(model, x, s)
    else:
        check_graph_matches(graph, model, x, s)
    if traces is None:
        if batched:
            traces = jax.vmap(lambda s: init(graph, model, s, **options))(state)
        else:
            traces = init(graph, model, state, **options)
    zeros = jtu.tree_map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
    batch_option = {"batched": True} if batched else {}

    def body(carry, xt):
        traces, acc = carry
        traces, _, loss, g = step(graph, model, traces, xt[0], xt[1], loss_fn, **batch_option)
        return (traces, jtu.tree_map(jnp.add, acc, g)), jnp.mean(loss)

    (traces, grads), losses = jax.lax.scan(body, (traces, zeros), (xs, targets))
    return (grads, losses, traces) if return_traces else (grads, losses)


def batch_grad(grad_fn: Callable, model, states, xs, targets, loss_fn: Callable, **kwargs):
    """Average `grad_fn` (`online_grad` or `bptt_grad`) over a batch.

    For `online_grad` with ES-D-RTRL, each time step runs on the whole batch and averages its
    gradient at once (one accumulator, not one per example); otherwise `grad_fn` is `jax.vmap`-ed.

    **Arguments:**

    - `grad_fn`: [`eqtrace.online_grad`][] or [`eqtrace.bptt_grad`][].
    - `states`, `xs`, `targets`: with a leading batch axis (`xs` is `(batch, time, ...)`).
    - `kwargs`: passed on to `grad_fn` (e.g. `algorithm=`, `window=`, `traces=`, `return_traces=`).

    **Returns:**

    `(grads, losses)`: the batch-mean gradient and per-step losses (shape `(T,)`), and the batched
    traces after the last step with `return_traces=True`.
    """
    check_batch_axis(states, check_sequences(xs, targets, ("batch", "time"))[0])
    if grad_fn is online_grad and _check_algorithm(kwargs.get("algorithm", "d_rtrl")) in BATCH_NATIVE:
        algorithm = kwargs.pop("algorithm")
        graph = kwargs.pop("graph", None)
        time_major = jtu.tree_map(lambda a: jnp.swapaxes(a, 0, 1), (xs, targets))
        traces = kwargs.pop("traces", None)
        return_traces = kwargs.pop("return_traces", False)
        return _online_grad(
            model, states, *time_major, loss_fn, algorithm, graph, kwargs, traces, return_traces, batched=True
        )
    if "traces" in kwargs:  # per-example traces are batched like the states
        traces = kwargs.pop("traces")
        out = jax.vmap(lambda tr, x, t: grad_fn(model, None, x, t, loss_fn, traces=tr, **kwargs))(
            traces, xs, targets
        )
    else:
        out = jax.vmap(lambda s, x, t: grad_fn(model, s, x, t, loss_fn, **kwargs))(states, xs, targets)
    mean = jtu.tree_map(lambda g: jnp.mean(g, axis=0), out[:2])
    return (*mean, out[2]) if kwargs.get("return_traces") else mean
