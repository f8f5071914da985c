"""Relations (weight → ETP operation → hidden groups) and the weights outside every relation."""

import types

import jax
import jax.numpy as jnp

from .._jax_internals import BODIES, Literal, STOP_GRADIENT, Var, WEIGHT_LAYOUT
from .._ops import etp_op_of
from ._dataflow import ETP, EW, MIX, reach, shape, weight_dependencies
from ._flow import equation_flow
from ._graph import ExcludedWeight, HiddenGroup, HiddenParamOpRelation
from ._infer import declared_positions


_REASON_PRIORITY = ("not_element_wise", "via_other_etp_op", "non_temporal", "weight_to_weight", "no_etp_op")


def find_relations(
    jaxpr,
    weight_vars,
    weight_paths,
    hidden_out,
    hidden_paths,
    traced,
    groups: list[HiddenGroup],
    *,
    inferred: frozenset = frozenset(),
    inside: dict[int, str] | None = None,
) -> tuple[list[HiddenParamOpRelation], list[ExcludedWeight], list[ExcludedWeight]]:
    """Each ETP equation's weight operands and the groups its output reaches element-wise; every
    other inexact weight leaf with the reason it is in no relation; and the weights in a relation
    that also reach a hidden state by another, untraced, use. `inferred`: the indices of the ETP
    equations that the compiler inferred in an untagged model; `inside`: per weight index, where a
    product of it stays inside a loop, branch or custom derivative (see `eqtrace._compiler._hoist`)."""
    group_of = {hidden_paths.index(p): g for g in groups for p in g.hidden_paths}
    weight_index = {v: i for i, v in enumerate(weight_vars)}
    wdeps = weight_dependencies(jaxpr, weight_vars)
    relations: list[HiddenParamOpRelation] = []
    notes: dict[int, list[tuple[str, str]]] = {}
    used: set[int] = set()
    for e, eqn in enumerate(jaxpr.eqns):
        op = etp_op_of(eqn.primitive)
        if op is None:
            continue
        kind = reach(jaxpr, e)
        reached = {i: kind.get(hidden_out[i], 0) for i in traced}
        ew = sorted({group_of[i].index for i, k in reached.items() if k == EW})
        mixed = [hidden_paths[i] for i, k in reached.items() if k == MIX]
        via_etp = [hidden_paths[i] for i, k in reached.items() if k == ETP]
        for j in op.weight_operands(len(eqn.invars)):
            v = eqn.invars[j]
            if isinstance(v, Literal):
                continue
            if v not in weight_index:
                for w in wdeps.get(v, ()):
                    used.add(w)
                    notes.setdefault(w, []).append(
                        ("weight_to_weight", f"transformed before entering {op.name} (equation {e})")
                    )
                continue
            w = weight_index[v]
            used.add(w)
            if mixed:
                notes.setdefault(w, []).append(
                    (
                        "not_element_wise",
                        f"{op.name} output reaches {', '.join(map(str, mixed))} through "
                        "an operation that mixes positions",
                    )
                )
            elif ew:
                shapes = [shape(v) for v in eqn.invars]
                input_axes = op.input_axes(j, shapes, shape(eqn.outvars[0]), eqn.params)
                pad, shared = (), ()
                declared = declared_positions(eqn)
                if declared is not None:
                    input_axes, pad, shared = declared
                elif input_axes is None:
                    layout = op.shared_layout(j, shapes, shape(eqn.outvars[0]), eqn.params)
                    if layout is not None:
                        input_axes, shared = layout
                relations.append(
                    HiddenParamOpRelation(
                        weight_path=weight_paths[w],
                        primitive=eqn.primitive,
                        hidden_groups=tuple(groups[g] for g in ew),
                        eqn_index=e,
                        operand_index=j,
                        y_shape=shape(eqn.outvars[0]),
                        position_diagonal=input_axes is not None and not shared,
                        input_axes=input_axes or (),
                        shared_axes=shared,
                        position_pad=pad if any(any(p) for p in pad) else (),
                        weight_index=w,
                        params=types.MappingProxyType(dict(eqn.params)),
                        operand_weights=tuple(
                            None if isinstance(u, Literal) else weight_index.get(u) for u in eqn.invars
                        ),
                        input_aval=(
                            jax.ShapeDtypeStruct(shape(eqn.invars[0]), eqn.invars[0].aval.dtype)
                            if op.has_input
                            else None
                        ),
                        inferred=e in inferred,
                    )
                )
            elif via_etp:
                notes.setdefault(w, []).append(
                    (
                        "via_other_etp_op",
                        f"{op.name} output reaches {', '.join(map(str, via_etp))} only "
                        "through another ETP operation",
                    )
                )
            else:
                notes.setdefault(w, []).append(("non_temporal", f"{op.name} output reaches no hidden state"))

    in_relation = {r.weight_path for r in relations}
    partly = []
    for w, path in enumerate(weight_paths):
        if path in in_relation:
            traced_uses = {(r.eqn_index, r.operand_index) for r in relations if r.weight_path == path}
            detail = _untraced_use(jaxpr, weight_vars[w], traced_uses, [hidden_out[i] for i in traced])
            if detail is not None:
                partly.append(ExcludedWeight(path, "untraced_use", detail))
    excluded: list[ExcludedWeight] = []
    for w, path in enumerate(weight_paths):
        if path in in_relation or not jnp.issubdtype(weight_vars[w].aval.dtype, jnp.inexact):
            continue
        if _only_through_stop_gradient(jaxpr, weight_vars[w]):
            detail = "enters the step only through stop_gradient: its gradient is zero"
            excluded.append(ExcludedWeight(path, "stop_gradient", detail))
            continue
        if w not in used:
            detail = (inside or {}).get(w, "used by no ETP operation")
            excluded.append(ExcludedWeight(path, "no_etp_op", detail))
            continue
        reason, detail = min(notes[w], key=lambda rd: _REASON_PRIORITY.index(rd[0]))
        excluded.append(ExcludedWeight(path, reason, detail))
    return relations, excluded, partly


def _untraced_use(jaxpr, var, traced_uses: set, hidden_vars: list) -> str | None:
    """How `var` reaches a new hidden value other than through its traced uses (ETP operands of its
    relations), e.g. a weight used by both `eqtrace.matmul` and a plain `@`; `None` if it does not."""
    live, first = {var}, {}
    for e, eqn in enumerate(jaxpr.eqns):
        reads = [j for j, v in enumerate(eqn.invars) if not isinstance(v, Literal) and v in live]
        reads = [j for j in reads if (e, j) not in traced_uses]
        if reads and eqn.primitive in BODIES:  # an operand its bodies do not read is no use
            flow = equation_flow(eqn, 0)
            reads = [j for j in reads if any(j in edges for edges in flow)]
        if reads:
            for o in eqn.outvars:
                live.add(o)
                first[o] = first.get(eqn.invars[reads[0]], (e, eqn.primitive.name))
    reached = [first[h] for h in hidden_vars if h in live and h in first]
    if not reached:
        return None
    e, name = reached[0]
    return (
        f"also used by `{name}` (equation {e}), outside its traced ETP operation(s): that path to the "
        "hidden state is credited within the window only"
    )


def _only_through_stop_gradient(jaxpr, var) -> bool:
    """Whether every use of the weight `var` (after layout-only operations) is a `stop_gradient`."""
    layout, stopped = {var}, False
    for eqn in jaxpr.eqns:
        if not any(isinstance(v, Var) and v in layout for v in eqn.invars):
            continue
        if eqn.primitive is STOP_GRADIENT:
            stopped = True
        elif eqn.primitive in WEIGHT_LAYOUT and len(eqn.invars) == 1:
            layout.update(eqn.outvars)
        else:
            return False
    return stopped and not any(isinstance(v, Var) and v in layout for v in jaxpr.outvars)
