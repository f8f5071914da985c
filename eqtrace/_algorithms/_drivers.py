"""Drivers: scan an online algorithm over a sequence, and average over a batch."""

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from .._compiler import compile_etrace_graph, ETraceGraph
from .._compiler._compile import canonical_dtype
from .._compiler._freeze import freeze, frozen_paths
from .._compiler._run import check_graph_matches
from ._bptt import bptt_grad, bptt_grad_of_batch
from ._d_rtrl import DRTRL
from ._es_d_rtrl import ESDRTRL
from ._inputs import check_batch_axis, check_frozen, check_sequences, step_example, zeros_shaped
from ._one_step import trainable_part
from ._rule import AbstractDeferringAlgorithm, AbstractOnlineAlgorithm


# The strings `online_grad` accepts for a rule with its default options (or the options given).
SHORTHANDS: dict[str, type[AbstractOnlineAlgorithm]] = {
    "d_rtrl": DRTRL,
    "es_d_rtrl": ESDRTRL,
    "pp_prop": ESDRTRL,
}

_GRAPHS: collections.OrderedDict = collections.OrderedDict()  # least recently used first
_MAX_GRAPHS = 64

# How many rows (steps × rows per step) one contraction of deferred weight gradients aims at: enough
# for an efficient matmul, few enough that the factors kept stay small. 0: no deferral.
CONTRACTION_ROWS = 256


def graph_for(model, x, state, filter_spec=None) -> ETraceGraph:
    """The compiled graph for this model structure and these input/state shapes, with the leaves
    that `filter_spec` leaves out frozen (`None`: none), compiled once.

    Works inside `jit`/`vmap`: only the structure, shapes and dtypes are used.
    """
    frozen = () if filter_spec is None else frozen_paths(model, filter_spec)
    dynamic, static = eqx.partition((model, x, state), eqx.is_array)
    leaves, treedef = jtu.tree_flatten(dynamic)
    static_leaves, static_def = jtu.tree_flatten(static)
    shapes = tuple((tuple(a.shape), canonical_dtype(a.dtype)) for a in leaves)
    key = (treedef, static_def, tuple(static_leaves), shapes, frozen)
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
        graph = freeze(graph, frozen)
    if key is not None:
        _GRAPHS[key] = graph
        if len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    return graph


def as_algorithm(algorithm, options: dict) -> AbstractOnlineAlgorithm:
    """The rule object for `algorithm`: a rule itself, or a shorthand string built with `options`."""
    if isinstance(algorithm, AbstractOnlineAlgorithm):
        if options:
            raise ValueError(
                f"Options {sorted(options)} were given beside the rule object {algorithm!r}: set them "
                f"as its fields instead, e.g. `eqtrace.{type(algorithm).__name__}(...)`."
            )
        return algorithm
    if not (isinstance(algorithm, str) and algorithm in SHORTHANDS):
        raise ValueError(
            f"`algorithm` must be a rule object (e.g. `eqtrace.DRTRL()`, `eqtrace.ESDRTRL(decay=0.9)`) "
            f"or one of {sorted(SHORTHANDS)}, got {algorithm!r}."
        )
    cls = SHORTHANDS[algorithm]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"`{algorithm}` takes the options {fields}, got unknown {unknown}.")
    return cls(**options)


@overload
def online_grad(
    model: PyTree,
    state: PyTree,
    xs: PyTree,
    targets: PyTree,
    loss_fn: Callable,
    algorithm: str | AbstractOnlineAlgorithm = "d_rtrl",
    *,
    graph: ETraceGraph | None = None,
    traces: PyTree = None,
    return_traces: Literal[False] = False,
    filter_spec: PyTree = None,
    **options: Any,
) -> tuple[PyTree, Float[Array, " time"]]: ...


@overload
def online_grad(
    model: PyTree,
    state: PyTree,
    xs: PyTree,
    targets: PyTree,
    loss_fn: Callable,
    algorithm: str | AbstractOnlineAlgorithm = "d_rtrl",
    *,
    graph: ETraceGraph | None = None,
    traces: PyTree = None,
    return_traces: Literal[True],
    filter_spec: PyTree = None,
    **options: Any,
) -> tuple[PyTree, Float[Array, " time"], PyTree]: ...


def online_grad(
    model: PyTree,
    state: PyTree,
    xs: PyTree,
    targets: PyTree,
    loss_fn: Callable,
    algorithm: str | AbstractOnlineAlgorithm = "d_rtrl",
    *,
    graph: ETraceGraph | None = None,
    traces: PyTree = None,
    return_traces: bool = False,
    filter_spec: PyTree = None,
    **options: Any,
) -> tuple[PyTree, Float[Array, " time"]] | tuple[PyTree, Float[Array, " time"], PyTree]:
    r"""Online gradient of $\sum_t L_t$ over a sequence, forward in time with constant memory.

    Compiles the model's graph once per model structure (or uses `graph`), then scans the
    algorithm's step over time. Same contract as [`eqtrace.bptt_grad`][].

    **Arguments:**

    - `model`: `model(x, state) -> (y, new_state)`.
    - `state`: the initial hidden state.
    - `xs`, `targets`: inputs and targets with a leading time axis.
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar`.
    - `algorithm`: the rule: an object such as [`eqtrace.DRTRL`][]`(window=2)` or
      [`eqtrace.ESDRTRL`][]`(decay=0.9)`, or the shorthand `"d_rtrl"`, `"es_d_rtrl"` (alias
      `"pp_prop"`) for such an object built from `options`.
    - `graph`: a precompiled [`eqtrace.ETraceGraph`][] (optional).
    - `traces`: the traces a previous call returned (`return_traces=True`), to continue a sequence
      where it stopped, exactly as one call over the whole sequence would; `state` is then `None`
      (the traces carry it) and the options are the traces' own.
    - `return_traces`: also return the traces after the last step.
    - `filter_spec`: which leaves are trained, as for `eqx.partition(model, filter_spec)`; the
      inexact leaves it leaves out are frozen: they get no trace and a `None` gradient. Default:
      the frozen leaves of `graph`, or none.
    - `options`: with a shorthand string, the rule's fields: `window=K` (default 1) for both
      rules, and `decay=0.9`, `normalise=True`, `exact_step=True` for ES-D-RTRL.

    **Returns:**

    `(grads, losses)`: gradients in the structure of `eqx.filter(model, eqx.is_inexact_array)`
    (`None` at frozen leaves), and the per-step losses, shape `(T,)`; `(grads, losses, traces)`
    with `return_traces`.
    """
    return _online_grad(
        model,
        state,
        xs,
        targets,
        loss_fn,
        algorithm,
        graph,
        options,
        traces,
        return_traces,
        batched=False,
        filter_spec=filter_spec,
    )


def _online_grad(
    model,
    state,
    xs,
    targets,
    loss_fn,
    algorithm,
    graph,
    options,
    traces,
    return_traces,
    *,
    batched: bool,
    filter_spec=None,
):
    """`online_grad`; with `batched`, `state` has a leading batch axis and `xs`, `targets` are
    `(time, batch, ...)`: each step runs on the whole batch and its gradients are averaged at once,
    so the carry holds one gradient accumulator, not one per example."""
    check_sequences(xs, targets, ("time", "batch") if batched else ("time",))
    if traces is not None:
        if state is not None or options:
            raise ValueError(
                "Given `traces`, `state` must be `None` and no algorithm options may be given: the "
                f"traces carry the state and their rule's options; got state={type(state).__name__} "
                f"and options {sorted(options)}."
            )
        state = traces.state
    rule = as_algorithm(algorithm, options)
    x, s = step_example(xs, 2 if batched else 1), step_example(state, 1 if batched else 0)
    if graph is None:
        graph = graph_for(model, x, s, filter_spec)
    else:
        check_graph_matches(graph, model, x, s)
        check_frozen(graph, model, filter_spec)
    if traces is None:
        init = lambda s: rule.init(graph, model, s)  # noqa: E731
        traces = jax.vmap(init)(state) if batched else init(state)
    zeros = jtu.tree_map(jnp.zeros_like, trainable_part(graph, model))
    if isinstance(rule, AbstractDeferringAlgorithm) and CONTRACTION_ROWS > 0:

        def step(traces, xt):
            return rule.deferred_step(graph, model, traces, xt[0], xt[1], loss_fn, batched=batched)

        # Tracing the step once tells which weights it defers, and their rows per step.
        factors = jax.eval_shape(step, traces, step_example((xs, targets), 1))[4]
        length = jtu.tree_leaves(xs)[0].shape[0]
        if factors and length:
            rows = max(f.left.shape[0] for f in factors)
            grads, losses, traces = _scan_in_chunks(
                step, model, traces, zeros, (xs, targets), _chunk_length(rows, length)
            )
            return (grads, losses, traces) if return_traces else (grads, losses)

    def body(carry, xt):
        traces, acc = carry
        traces, _, loss, g = rule.step(graph, model, traces, xt[0], xt[1], loss_fn, batched=batched)
        return (traces, jtu.tree_map(jnp.add, acc, g)), jnp.mean(loss)

    (traces, grads), losses = jax.lax.scan(body, (traces, zeros), (xs, targets))
    return (grads, losses, traces) if return_traces else (grads, losses)


def _chunk_length(rows: int, length: int) -> int:
    """Steps per chunk: about `CONTRACTION_ROWS / rows`, at most the sequence's `length`; a divisor
    of `length` where one is at least half that, else chunks as even as may be (the last shorter)."""
    target = min(length, -(-CONTRACTION_ROWS // rows))
    for chunk in range(target, (target - 1) // 2, -1):
        if length % chunk == 0:
            return chunk
    chunks = -(-length // target)
    return -(-length // chunks)


def _scan_in_chunks(step: Callable, model, traces, zeros, xs, chunk: int):
    """Scan a rule's `deferred_step` over `xs` in chunks of `chunk` steps (the last may be shorter):
    the dense gradients are summed step by step, and each chunk's factors, kept in the inner scan's
    output, are contracted at its end in one matmul per factor (length `chunk × rows`).

    Returns `(grads, losses, traces)`."""
    struct = jtu.tree_structure(eqx.filter(model, eqx.is_array))  # flat order: `weight_index`

    def body(carry, xt):
        traces, acc = carry
        traces, _, loss, g, factors = step(traces, xt)
        acc = jtu.tree_map(lambda a, d: a if d is None else a + d, acc, g, is_leaf=lambda v: v is None)
        return (traces, acc), (jnp.mean(loss), factors)

    def run_chunk(carry, xs_chunk):
        (traces, acc), (losses, factors) = jax.lax.scan(body, carry, xs_chunk)
        flat = struct.flatten_up_to(acc)
        for f in factors:
            left, right = (a.reshape(-1, a.shape[-1]) for a in (f.left, f.right))
            flat[f.weight_index] = flat[f.weight_index] + left.T @ right
        return (traces, jtu.tree_unflatten(struct, flat)), losses

    def run_chunk_at(carry, start):  # slices `xs` in the loop: no chunked copy of the sequence
        return run_chunk(carry, jtu.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk), xs))

    length = jtu.tree_leaves(xs)[0].shape[0]
    full, rest = divmod(length, chunk)
    carry, losses = jax.lax.scan(run_chunk_at, (traces, zeros), jnp.arange(full) * chunk)
    losses = losses.reshape(-1)
    if rest:
        carry, last = run_chunk(carry, jtu.tree_map(lambda a: a[full * chunk :], xs))
        losses = jnp.concatenate([losses, last])
    traces, grads = carry
    return grads, losses, traces


def _vmapped_mean(grad_fn: Callable, model, states, xs, targets, loss_fn: Callable, **kwargs):
    """`grad_fn` over each example with `jax.vmap`, then the mean."""
    if "traces" in kwargs:  # per-example traces are batched like the states
        traces = kwargs.pop("traces")
        out = jax.vmap(lambda tr, x, t: grad_fn(model, None, x, t, loss_fn, traces=tr, **kwargs))(
            traces, xs, targets
        )
    else:
        out = jax.vmap(lambda s, x, t: grad_fn(model, s, x, t, loss_fn, **kwargs))(states, xs, targets)
    mean = jtu.tree_map(lambda g: jnp.mean(g, axis=0), out[:2])
    return (*mean, out[2]) if kwargs.get("return_traces") else mean


def _online_grad_of_batch(
    model,
    states,
    xs,
    targets,
    loss_fn,
    algorithm="d_rtrl",
    *,
    graph=None,
    traces=None,
    return_traces=False,
    filter_spec=None,
    **options,
):
    """`online_grad` of a batch: a batch-native rule steps the whole batch at once (one gradient
    accumulator, not one per example); the others are `jax.vmap`-ed over examples."""
    if not as_algorithm(algorithm, options).batch_native:
        kwargs = dict(
            options, algorithm=algorithm, graph=graph, return_traces=return_traces, filter_spec=filter_spec
        )
        if traces is not None:
            kwargs["traces"] = traces
        return _vmapped_mean(online_grad, model, states, xs, targets, loss_fn, **kwargs)
    xs, targets = jtu.tree_map(lambda a: jnp.swapaxes(a, 0, 1), (xs, targets))
    return _online_grad(
        model,
        states,
        xs,
        targets,
        loss_fn,
        algorithm,
        graph,
        options,
        traces,
        return_traces,
        batched=True,
        filter_spec=filter_spec,
    )


# Gradient functions with a form of their own for a whole batch, which `batch_grad` uses.
BATCH_FORMS: dict[Callable, Callable] = {online_grad: _online_grad_of_batch, bptt_grad: bptt_grad_of_batch}


def batch_grad(
    grad_fn: Callable,
    model: PyTree,
    states: PyTree,
    xs: PyTree,
    targets: PyTree,
    loss_fn: Callable,
    **kwargs: Any,
) -> tuple[PyTree, ...]:
    """Average `grad_fn` (`online_grad` or `bptt_grad`) over a batch.

    `bptt_grad` becomes the gradient of the batch-mean loss (each weight gradient contracts the
    batch inside one matmul); `online_grad` with a batch-native rule (ES-D-RTRL) runs each time
    step on the whole batch and averages its gradient at once (one accumulator, not one per
    example); any other `grad_fn` or rule is `jax.vmap`-ed over the examples.

    **Arguments:**

    - `grad_fn`: [`eqtrace.online_grad`][] or [`eqtrace.bptt_grad`][] (or a function with their
      contract).
    - `states`, `xs`, `targets`: with a leading batch axis (`xs` is `(batch, time, ...)`).
    - `kwargs`: passed on to `grad_fn` (e.g. `algorithm=`, `window=`, `traces=`, `return_traces=`,
      `filter_spec=`).

    **Returns:**

    `(grads, losses)`: the batch-mean gradient and per-step losses (shape `(T,)`), and the batched
    traces after the last step with `return_traces=True`.
    """
    check_batch_axis(states, check_sequences(xs, targets, ("batch", "time"))[0])
    batch_form = BATCH_FORMS.get(grad_fn, functools.partial(_vmapped_mean, grad_fn))
    return batch_form(model, states, xs, targets, loss_fn, **kwargs)
