"""Frozen weights: the inexact leaves of a model that a filter, as in `eqx.partition(model,
filter_spec)`, leaves out of training. The graph lists them and keeps them out of every relation, so
that no rule keeps a trace for them or computes their gradient."""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._graph import ETraceGraph, Path


def frozen_paths(model, filter_spec) -> tuple[Path, ...]:
    """Key paths of the inexact-array leaves of `model` that `filter_spec` (a callable or a pytree of
    bools and callables, a prefix of `model`, as for `eqx.partition`) does not select."""
    from ._compile import key_to_path  # `_compile` freezes the graphs it compiles

    try:
        selected = eqx.filter(eqx.filter(model, filter_spec), eqx.is_inexact_array)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "`filter_spec` must be a callable or a pytree of bools (and callables) whose structure is a "
            "prefix of the model's, as for `eqx.partition(model, filter_spec)`, e.g. "
            "`eqx.tree_at(lambda m: m.rnn.Wz.weight, jtu.tree_map(eqx.is_inexact_array, model), "
            f"replace=False)`; it does not fit this model: {error}"
        ) from error
    kept = {key_to_path(p) for p, _ in jtu.tree_flatten_with_path(selected)[0]}
    leaves = jtu.tree_flatten_with_path(eqx.filter(model, eqx.is_inexact_array))[0]
    return tuple(path for path in (key_to_path(p) for p, _ in leaves) if path not in kept)


def trainable_spec(model, frozen: tuple[Path, ...]):
    """A pytree of bools shaped like `model` (a `filter_spec`): `True` at its inexact-array leaves
    except those at `frozen`, `False` elsewhere."""
    from ._compile import key_to_path

    out = set(frozen)
    return jtu.tree_map_with_path(
        lambda p, leaf: eqx.is_inexact_array(leaf) and key_to_path(p) not in out, model
    )


def freeze(graph: ETraceGraph, frozen: tuple[Path, ...]) -> ETraceGraph:
    """`graph` with the weights at `frozen` out of every relation and listed as frozen."""
    if not frozen:
        return graph
    out = set(frozen)

    def keep(records):
        return tuple(r for r in records if r.weight_path not in out)

    return dataclasses.replace(
        graph,
        hidden_param_op_relations=keep(graph.hidden_param_op_relations),
        excluded_weights=keep(graph.excluded_weights),
        partly_traced_weights=keep(graph.partly_traced_weights),
        frozen_weights=tuple(frozen),
    )


def trainable_mask(graph: ETraceGraph) -> list[bool]:
    """For each weight leaf of the graph (`module_info.weight_paths`), whether it is trained: an
    inexact array that is not frozen."""
    info = graph.module_info
    frozen = set(graph.frozen_weights)
    weight_vars = info.closed_jaxpr.jaxpr.invars[: info.num_weights]
    return [
        bool(jnp.issubdtype(v.aval.dtype, jnp.inexact)) and path not in frozen
        for path, v in zip(info.weight_paths, weight_vars)
    ]
