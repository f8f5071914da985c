"""Run a compiled step on new values, checking them against what the graph was compiled for."""

import equinox as eqx
import jax.tree_util as jtu

from ._compile import canonical_dtype, key_to_path
from ._evaluate import evaluate
from ._graph import ETraceGraph


def _check_leaves(name: str, tree, paths, avals) -> list:
    leaves_with_path = jtu.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    got_paths = tuple(key_to_path(p) for p, _ in leaves_with_path)
    if name == "params" and set(got_paths) < set(paths):
        raise ValueError(
            f"`params` has no array at {[p for p in paths if p not in got_paths]}: is it the trainable "
            "part of `eqx.partition(model, filter_spec)`? The step runs the whole model, frozen leaves "
            "included: pass the model itself as `params`, and freeze leaves with the `filter_spec` of "
            "`eqtrace.compile_etrace_graph(model, x, state, filter_spec=...)` (or of "
            "`eqtrace.online_grad`): frozen leaves get no trace and a `None` gradient."
        )
    if got_paths != tuple(paths):
        raise ValueError(
            f"`{name}` does not have the structure the graph was compiled for: expected array leaves at "
            f"{list(paths)}, got {list(got_paths)}. Compile a new graph for a model of another structure."
        )
    leaves = [leaf for _, leaf in leaves_with_path]
    for path, leaf, aval in zip(paths, leaves, avals):
        if leaf.shape != aval.shape or canonical_dtype(leaf.dtype) != aval.dtype:
            raise ValueError(
                f"`{name}` leaf {path} has {leaf.dtype}{list(leaf.shape)}, but the graph was compiled for "
                f"{aval.dtype}{list(aval.shape)}."
                + (
                    " Batch with `jax.vmap` rather than adding a batch axis."
                    if leaf.ndim > len(aval.shape)
                    else f" If `{name}` is one step of a sequence, the sequence lacks its leading time axis: "
                    f"it must be shaped (T, *{tuple(aval.shape)})."
                    if leaf.ndim < len(aval.shape) and name == "x"
                    else " Pass arrays of the compiled shapes and dtypes, or recompile the graph for these "
                    "with `eqtrace.compile_etrace_graph(model, x, state)`."
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


def _same(a, b) -> bool:
    """`a == b` for static values, elementwise through tuples; identity where `==` gives no bool."""
    if a is b:
        return True
    if isinstance(a, tuple | list) and type(a) is type(b):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def _treedef_difference(want, got) -> str | None:
    """Where two tree structures differ (node type or static data), or `None` if they do not."""
    if _same(want, got):
        return None
    want_node, got_node = want.node_data(), got.node_data()
    if want_node is None or got_node is None:
        return None if want_node is got_node else f"a subtree {got} where the graph has {want}"
    (want_type, want_aux), (got_type, got_aux) = want_node, got_node
    if want_type is not got_type:
        return f"a `{got_type.__name__}` where the graph has a `{want_type.__name__}`"
    if not _same(want_aux, got_aux):
        return f"a `{got_type.__name__}` with static data {got_aux}, where the graph has {want_aux}"
    want_children, got_children = want.children(), got.children()
    if len(want_children) != len(got_children):
        return (
            f"a `{got_type.__name__}` with {len(got_children)} children, where the graph has "
            f"{len(want_children)}"
        )
    for w, g in zip(want_children, got_children):
        difference = _treedef_difference(w, g)
        if difference is not None:
            return difference
    return None


def check_graph_matches(graph: ETraceGraph, model, x=None, state=None) -> None:
    """Raise unless `model` (and `x`, `state`, unless `None`) have the structure and static values
    (activation functions, static fields, classes) that `graph` was compiled for: a graph runs the
    step it traced, so a graph of another model would silently run that model."""
    info = graph.module_info
    for k, (name, value) in enumerate((("model", model), ("x", x), ("state", state))):
        if value is None:
            continue
        dynamic, static = eqx.partition(value, eqx.is_array)
        want_static, want_def = jtu.tree_flatten(info.in_static[k])
        difference = _treedef_difference(info.in_treedef.children()[k], jtu.tree_structure(dynamic))
        if difference is None:
            difference = _treedef_difference(want_def, jtu.tree_structure(static))
        if difference is None:
            for (path, got), want in zip(jtu.tree_flatten_with_path(static)[0], want_static):
                if not _same(want, got):
                    difference = f"{got!r} at {key_to_path(path)}, where the graph has {want!r}"
                    break
        if difference is not None:
            raise ValueError(
                f"`graph` was compiled for another model: `{name}` has {difference}. Recompile the "
                "graph for this model with `eqtrace.compile_etrace_graph(model, x, state)`."
            )
