"""Run a compiled step on new values, checking them against what the graph was compiled for."""

import equinox as eqx
import jax.tree_util as jtu

from ._compile import key_to_path
from ._evaluate import evaluate
from ._graph import ETraceGraph


def _check_leaves(name: str, tree, paths, avals) -> list:
    leaves_with_path = jtu.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    got_paths = tuple(key_to_path(p) for p, _ in leaves_with_path)
    if got_paths != tuple(paths):
        raise ValueError(
            f"`{name}` does not have the structure the graph was compiled for: expected array leaves at "
            f"{list(paths)}, got {list(got_paths)}. Compile a new graph for a model of another structure."
        )
    leaves = [leaf for _, leaf in leaves_with_path]
    for path, leaf, aval in zip(paths, leaves, avals):
        if leaf.shape != aval.shape or leaf.dtype != aval.dtype:
            raise ValueError(
                f"`{name}` leaf {path} has {leaf.dtype}{list(leaf.shape)}, but the graph was compiled for "
                f"{aval.dtype}{list(aval.shape)}."
                + (
                    " Batch with `jax.vmap` rather than adding a batch axis."
                    if leaf.ndim > len(aval.shape)
                    else ""
                )
            )
    return leaves


def flatten_weights(graph: ETraceGraph, params) -> list:
    """The array leaves of `params` (a model or its array part), checked against the compiled ones."""
    info = graph.module_info
    avals = [v.aval for v in info.closed_jaxpr.jaxpr.invars[: info.num_weights]]
    return _check_leaves("params", params, info.weight_paths, avals)


def flatten_step_inputs(graph: ETraceGraph, model, x, state) -> tuple[list, list, list]:
    """The array leaves of `model`, `x` and `state`, checked against the compiled ones."""
    info = graph.module_info
    return (
        flatten_weights(graph, model),
        _check_leaves("x", x, info.input_paths, info.input_avals),
        _check_leaves("state", state, info.hidden_paths, info.hidden_avals),
    )


def unflatten_step_outputs(graph: ETraceGraph, outs):
    """`(y, new_state)` from the flat outputs of the step's jaxpr."""
    info = graph.module_info
    return eqx.combine(jtu.tree_unflatten(info.out_treedef, outs), info.out_static)


def run_step(graph: ETraceGraph, model, x, state):
    """One step `(y, new_state)` of the compiled model with new weights, input and state."""
    weights, xs, hidden = flatten_step_inputs(graph, model, x, state)
    return unflatten_step_outputs(graph, evaluate(graph.module_info.closed_jaxpr, [*weights, *xs, *hidden]))
