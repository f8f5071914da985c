"""Text, Mermaid and Graphviz renderings of an `ETraceGraph`."""

from ._graph import ETraceGraph, HiddenParamOpRelation, Path


def _p(path: Path) -> str:
    return "(" + ", ".join(repr(k) for k in path) + ("," if len(path) == 1 else "") + ")"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _part(graph: ETraceGraph, r: HiddenParamOpRelation) -> str:
    """`; entries lo:hi of axis a` for a relation whose operation reads a part of its weight."""
    axes = [a for a, pad in enumerate(r.position_pad) if any(pad)]
    if not axes:
        return ""
    size = graph.module_info.closed_jaxpr.jaxpr.invars[r.weight_index].aval.shape[axes[0]]
    before, after = r.position_pad[axes[0]]
    return f"; entries {before}:{size - after} of axis {axes[0]}"


def format_graph(graph: ETraceGraph) -> str:
    lines = [
        f"ETraceGraph: {_plural(len(graph.hidden_groups), 'hidden group')}, "
        f"{_plural(len(graph.hidden_param_op_relations), 'relation')}, "
        f"{_plural(len(graph.excluded_weights), 'weight')} outside any relation",
        "",
        "Hidden groups",
    ]
    for g in graph.hidden_groups:
        kind = "position-wise" if g.position_wise else "mixes positions (dense Jacobian diagonal)"
        if not g.recurrent:
            kind = "no recurrence outside ETP ops (D = 0: each trace holds one step)"
        lines.append(
            f"  [{g.index}] {_plural(g.num_state, 'state')} of shape {g.varshape}, {g.dtype}; {kind}"
        )
        for path in g.hidden_paths:
            lines.append(f"      {_p(path)}")
    if not graph.hidden_groups:
        lines.append("  (none)")
    lines += ["", "Relations: weight --ETP op--> hidden groups (traced)"]
    width = max((len(_p(r.weight_path)) for r in graph.hidden_param_op_relations), default=0)
    for r in graph.hidden_param_op_relations:
        groups = ", ".join(f"[{g.index}]" for g in r.hidden_groups)
        shared = ""
        if r.shared_axes:
            shared = f"  (shared along output axes {r.shared_axes}: traced per position)"
        elif not r.position_diagonal:
            shared = "  (shared across positions: traced by ES-D-RTRL only)"
        inferred = "  (inferred" + _part(graph, r) + ")" if r.inferred else ""
        lines.append(f"  {_p(r.weight_path):<{width}}  --{r.primitive.name}-->  {groups}{shared}{inferred}")
    if not graph.hidden_param_op_relations:
        lines.append("  (none)")
    lines += ["", "Weights outside any relation (no trace: exact gradient within the window only)"]
    width = max((len(_p(w.weight_path)) for w in graph.excluded_weights), default=0)
    for w in graph.excluded_weights:
        lines.append(f"  {_p(w.weight_path):<{width}}  {w.reason}: {w.detail}")
    if not graph.excluded_weights:
        lines.append("  (none)")
    if graph.frozen_weights:
        lines += ["", "Frozen weights (no trace, no gradient)"]
        lines += [f"  {_p(p)}" for p in graph.frozen_weights]
    if graph.partly_traced_weights:
        lines += ["", "Weights partly traced (a use outside their ETP operations is not traced)"]
        width = max(len(_p(w.weight_path)) for w in graph.partly_traced_weights)
        for w in graph.partly_traced_weights:
            lines.append(f"  {_p(w.weight_path):<{width}}  {w.reason}: {w.detail}")
    if graph.untraced_hidden_paths:
        lines += ["", "Hidden states not traced (integer, or passed through unchanged)"]
        lines += [f"  {_p(p)}" for p in graph.untraced_hidden_paths]
    lines += ["", "Perturbation points (where each new hidden value is produced)"]
    if graph.hidden_perturb is None:
        lines.append("  (none)")
    else:
        for path, prod in zip(graph.hidden_perturb.hidden_paths, graph.hidden_perturb.producers):
            lines.append(f"  {_p(path)} <- {prod}")
    return "\n".join(lines)


def show_graph(graph: ETraceGraph) -> None:
    """Print the compiled graph: hidden groups, weight → ETP op → hidden-group relations, the
    weights outside any relation with their reasons, and the perturbation points.

    **Arguments:**

    - `graph`: an [`eqtrace.ETraceGraph`][].
    """
    print(format_graph(graph))


def _edges(graph: ETraceGraph):
    """Nodes and edges shared by the Mermaid and DOT renderings."""
    weights = {}
    ops = {}
    edges = []
    for r in graph.hidden_param_op_relations:
        w = weights.setdefault(r.weight_path, f"w{len(weights)}")
        name = r.primitive.name + (" (inferred)" if r.inferred else "")
        o = ops.setdefault(r.eqn_index, (f"op{len(ops)}", name))[0]
        edges.append((w, o))
        for g in r.hidden_groups:
            edges.append((o, f"g{g.index}"))
    excluded = {w.weight_path: (f"x{i}", w.reason) for i, w in enumerate(graph.excluded_weights)}
    return weights, ops, sorted(set(edges)), excluded


def graph_to_mermaid(graph: ETraceGraph) -> str:
    weights, ops, edges, excluded = _edges(graph)
    lines = ["flowchart LR"]
    for path, node in weights.items():
        lines.append(f'    {node}["{_p(path)}"]')
    for node, name in ops.values():
        label = f'"{name}"' if " " in name else name  # "(inferred)" is quoted out of Mermaid's syntax
        lines.append(f"    {node}{{{{{label}}}}}")
    for g in graph.hidden_groups:
        paths = "<br/>".join(_p(p) for p in g.hidden_paths)
        lines.append(f'    g{g.index}(["group {g.index}<br/>{paths}"])')
    for a, b in edges:
        lines.append(f"    {a} --> {b}")
    for path, (node, reason) in excluded.items():
        lines.append(f'    {node}["{_p(path)}<br/><i>{reason}</i>"]:::excluded')
    lines.append("    classDef excluded stroke-dasharray: 4 3,color:#777")
    return "\n".join(lines)


def graph_to_dot(graph: ETraceGraph) -> str:
    weights, ops, edges, excluded = _edges(graph)
    lines = ["digraph ETraceGraph {", "    rankdir=LR;"]
    for path, node in weights.items():
        lines.append(f'    {node} [shape=box, label="{_p(path)}"];')
    for node, name in ops.values():
        lines.append(f'    {node} [shape=hexagon, label="{name}"];')
    for g in graph.hidden_groups:
        paths = "\\n".join(_p(p) for p in g.hidden_paths)
        lines.append(f'    g{g.index} [shape=ellipse, label="group {g.index}\\n{paths}"];')
    for a, b in edges:
        lines.append(f"    {a} -> {b};")
    for path, (node, reason) in excluded.items():
        lines.append(f'    {node} [shape=box, style=dashed, label="{_p(path)}\\n{reason}"];')
    lines.append("}")
    return "\n".join(lines)
