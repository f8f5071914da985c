"""Checks of what the drivers and steps receive (sequences, batched states, traces, the loss), and
one-step examples built from shapes alone. Each error names the argument at fault, what was expected,
what was got and the likely fix."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._compiler import key_to_path
from .._compiler._compile import canonical_dtype
from .._compiler._freeze import frozen_paths


def check_scalar_loss(loss) -> None:
    """Raise unless `loss` (what `loss_fn(y, target)` returned) is a scalar array."""
    if not (isinstance(loss, jax.Array) and loss.shape == ()):
        raise ValueError(
            f"`loss_fn(y, target)` must return a scalar array, got {getattr(loss, 'shape', type(loss))}. "
            "Reduce the per-step loss to a scalar, e.g. with `jnp.sum` or `jnp.mean`."
        )


def check_sequences(xs, targets, axes: Sequence[str] = ("time",)) -> tuple[int, ...]:
    """Raise unless every leaf of `xs` and `targets` has the leading `axes` (e.g. `("time",)`, or
    `("batch", "time")` for `batch_grad`), of one size across leaves. Returns those sizes."""
    names = ", ".join(axes)
    wanted = "(" + names + ", ...)"
    sizes: list[set] = [set() for _ in axes]
    for arg, tree in (("xs", xs), ("targets", targets)):
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
            shape = np.shape(leaf)
            if len(shape) < len(axes):
                raise ValueError(
                    f"`{arg}` leaf at {key_to_path(path)} has shape {shape}, with no leading "
                    f"{names} axis: every leaf of `xs` and `targets` must be shaped {wanted}. For a "
                    "single step, add a time axis of length 1 (`x[None]`)."
                )
            for k, n in enumerate(shape[: len(axes)]):
                sizes[k].add(n)
    if any(len(s) > 1 for s in sizes):
        got = jtu.tree_map(np.shape, (xs, targets))
        raise ValueError(
            f"`xs` and `targets` must share their leading ({names}) "
            + ("axis" if len(axes) == 1 else "axes")
            + f", every leaf shaped {wanted}; got shapes {got}. For a single step, add a time axis of "
            "length 1 (`x[None]`)."
        )
    return tuple(next(iter(s), 0) for s in sizes)


def check_batch_axis(states, batch_size: int) -> None:
    """Raise unless every leaf of `states` has a leading batch axis of `batch_size`."""
    for path, leaf in jtu.tree_flatten_with_path(states)[0]:
        shape = np.shape(leaf)
        if shape[:1] != (batch_size,):
            raise ValueError(
                f"`states` leaf at {key_to_path(path)} has shape {shape}: missing batch axis? Every "
                f"leaf of `states` needs a leading batch axis of size {batch_size} (the batch of `xs`). "
                "Give each example its state, e.g. "
                f"`jax.tree.map(lambda a: jnp.broadcast_to(a, ({batch_size},) + a.shape), state)`."
            )


def check_frozen(graph, model, filter_spec) -> None:
    """Raise unless `filter_spec` (unless `None`) freezes the leaves that `graph` was compiled with
    frozen."""
    if filter_spec is None:
        return
    frozen = frozen_paths(model, filter_spec)
    if set(frozen) != set(graph.frozen_weights):
        raise ValueError(
            f"`filter_spec` freezes the leaves {list(frozen)}, but `graph` was compiled with "
            f"{list(graph.frozen_weights)} frozen. Give the same `filter_spec` to "
            "`eqtrace.compile_etrace_graph(model, x, state, filter_spec=...)`, or leave it out here to "
            "use the graph's."
        )


def zeros_shaped(shape: tuple[int, ...], like) -> np.ndarray | jax.Array:
    """Zeros of `shape` with the dtype of the array `like`, from its shape and dtype only (it may be a
    tracer). PRNG-key arrays give keys."""
    if jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jnp.broadcast_to(jax.random.key(0, impl=jax.random.key_impl(like)), shape)
    return np.zeros(shape, cast(np.dtype, canonical_dtype(like.dtype)))  # not a key: a NumPy dtype


def step_example(tree, lead: int):
    """Zeros shaped like one element of `tree` along its `lead` leading axes (one step of `xs`, one
    example of a batched state). Works for empty axes (`T = 0`)."""
    return jtu.tree_map(lambda a: zeros_shaped(np.shape(a)[lead:], a), tree)


def check_traces(traces, kind: type, init: Callable, graph, params, *, batched: bool = False) -> None:
    """Raise unless `traces` are a `kind` with the structure, shapes and dtypes that `init(graph,
    params, state, **options)` makes for their own state and options (their static fields), with a
    leading batch axis on every array when `batched`."""
    make = f"eqtrace.{init.__name__}(graph, params, state)"
    if type(traces) is not kind:
        raise TypeError(
            f"`traces` must be the `{kind.__name__}` that `{make}` made for this graph, got "
            f"{type(traces).__name__}."
        )
    fields = dataclasses.fields(traces)
    options = {f.name: getattr(traces, f.name) for f in fields if f.metadata.get("static", False)}
    state = step_example(traces.state, 1) if batched else traces.state
    expected = eqx.filter_eval_shape(init, graph, params, state, **options)

    def arrays(t):
        return {f.name: getattr(t, f.name) for f in fields if f.name != "state" and f.name not in options}

    want_leaves, want_def = jtu.tree_flatten(arrays(expected))
    got_leaves, got_def = jtu.tree_flatten_with_path(arrays(traces))
    if got_def != want_def:
        raise TypeError(
            f"`traces` must be the `{kind.__name__}` that `{make}` made for this graph "
            f"({len(want_leaves)} arrays besides the state), got {len(got_leaves)} arrays: they were "
            "made for another graph."
        )
    for (path, got), want in zip(got_leaves, want_leaves):
        shape = (tuple(np.shape(got)[:1]) if batched else ()) + tuple(want.shape)
        if tuple(np.shape(got)) != shape or got.dtype != want.dtype:
            raise ValueError(
                f"`traces` leaf {jtu.keystr(path)} has {got.dtype}{list(np.shape(got))}, but this graph "
                f"and `params` need {want.dtype}{list(shape)}: the traces were made for another graph "
                f"or model. Make them with `{make}`."
            )
