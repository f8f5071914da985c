"""How values flow through one equation: for each of its outputs, the operands it depends on and
whether position by position.

Positions are the trailing `r` axes of a value (`r`: the rank of the hidden state or ETP output the
analysis follows); leading axes may come and go, as in the buffer `(n_save, *shape)` that an ODE
solve saves its states in. An output depends on an operand *position-wise* when its entry at
position `i` (any leading index) reads the operand at position `i` only. Equations with bodies
(calls, custom derivatives, loops, branches) are followed into their bodies, so that a
`lax.while_loop`, `lax.scan`, `lax.cond` or an ODE solve whose body acts position by position is
element-wise, not mixing. Integer and boolean values carry no derivative: a loop's trip count, a
branch index or the index of a slice depends on what it reads without making the derivative mix.
"""

import weakref

import jax.numpy as jnp

from .._jax_internals import (
    closed_call_body,
    COND,
    cond_branches,
    custom_call_body,
    CUSTOM_VJP_CALL,
    ELEMENTWISE,
    EQX_MAYBE_SET,
    LAYOUT,
    Literal,
    SCAN,
    scan_parts,
    WHILE,
    while_parts,
)
from .._ops import etp_op_of
from ._evaluate import _sub_jaxprs


Flow = tuple[dict[int, bool], ...]  # per output: {operand index: position-wise}

_BODY_FLOWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REDUCTIONS = tuple(LAYOUT[n] for n in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"))
_SCATTERS = tuple(LAYOUT[n] for n in ("scatter", "scatter_add", "scatter_mul", "scatter_min", "scatter_max"))


def shape(v) -> tuple[int, ...]:
    return tuple(v.aval.shape)


def propagate(jaxpr, deps: dict, ranks) -> dict:
    """Extend `deps` (variable → {source: position-wise}) forward through `jaxpr`, holding the outputs
    of ETP operations fixed; `ranks[source]` is the number of position axes of `source`. A dependence
    is position-wise when every path that carries it is."""
    for eqn in jaxpr.eqns:
        if etp_op_of(eqn.primitive) is not None:
            continue
        flows: dict[int, Flow] = {}
        for j, o in enumerate(eqn.outvars):
            out: dict[int, bool] = {}
            for k, v in enumerate(eqn.invars):
                if isinstance(v, Literal) or v not in deps:
                    continue
                for h, flag in deps[v].items():
                    r = ranks[h]
                    if r not in flows:
                        flows[r] = equation_flow(eqn, r)
                    if k in flows[r][j]:
                        out[h] = out.get(h, True) and flag and flows[r][j][k]
            if out:
                deps[o] = out
    return deps


def _body_flow(closed, r: int) -> Flow:
    """The flow from a body's inputs to its outputs (cached per body and rank)."""
    jaxpr = closed.jaxpr
    cache = _BODY_FLOWS.setdefault(jaxpr, {})
    if r not in cache:
        deps = propagate(jaxpr, {v: {k: True} for k, v in enumerate(jaxpr.invars)}, _Const(r))
        cache[r] = tuple({} if isinstance(o, Literal) else dict(deps.get(o, {})) for o in jaxpr.outvars)
    return cache[r]


def body_flow(closed, r: int) -> Flow:
    """For each output of a body (a closed jaxpr), the inputs it depends on, each with a flag:
    `True` when position by position, positions being the trailing `r` axes."""
    return _body_flow(closed, r)


class _Const:
    """`ranks` for a body: every input followed at the rank of the value the caller follows."""

    def __init__(self, r: int):
        self.r = r

    def __getitem__(self, _) -> int:
        return self.r


def _merge(into: dict[int, bool], k: int, pw: bool) -> None:
    into[k] = into.get(k, True) and pw


def _through(edges: dict[int, bool], source) -> dict[int, bool]:
    """Compose a body's flow into one output with `source(k)`, the flow into body input `k`."""
    out: dict[int, bool] = {}
    for k, pw in edges.items():
        for s, flag in source(k).items():
            _merge(out, s, flag and pw)
    return out


def _carried(body: Flow, first: int, source) -> list[dict[int, bool]]:
    """The flow into a loop's carries (operands `first, first + 1, ...`) after any number of
    iterations, as a fixed point: each carry starts as its initial value, and each iteration adds
    what the body reads to make it. `source(k, carry)` is the flow into body input `k`."""
    carry = [{first + j: True} for j in range(len(body))]
    changed = True
    while changed:
        changed = False
        for j, edges in enumerate(body):
            new = _through(edges, lambda k: source(k, carry))
            for s, flag in carry[j].items():
                _merge(new, s, flag)
            if new != carry[j]:
                carry[j], changed = new, True
    return carry


def _while_flow(eqn, r: int) -> Flow:
    # What the condition reads decides only the trip count: no dependence of the outputs.
    body, nc, nb = while_parts(eqn)
    source = lambda k, carry: {nc + k: True} if k < nb else carry[k - nb]  # noqa: E731
    return tuple(_carried(_body_flow(body, r), nc + nb, source))


def _scan_flow(eqn, r: int) -> Flow:
    body, n_consts, n_carry = scan_parts(eqn)
    flow = _body_flow(body, r)

    def source(k, carry):
        if n_consts <= k < n_consts + n_carry:
            return carry[k - n_consts]
        return {k: True}  # a constant or a scanned input

    carry = _carried(flow[:n_carry], n_consts, source)
    ys = [_through(edges, lambda k: source(k, carry)) for edges in flow[n_carry:]]
    return tuple(carry) + tuple(ys)


def _cond_flow(eqn, r: int) -> Flow:
    # The branch index (operand 0) is an integer. Each output depends on what any branch reads to
    # make it, position-wise only if every branch reads it so.
    outs: list[dict[int, bool]] = [{} for _ in eqn.outvars]
    for branch in cond_branches(eqn):
        for j, edges in enumerate(_body_flow(branch, r)):
            for k, pw in edges.items():
                _merge(outs[j], k + 1, pw)
    return tuple(outs)


def _keeps_positions(eqn, k: int, r: int) -> bool:
    """Whether a layout primitive's output reads operand `k` position by position: the operand's
    trailing `r` axes stay the output's trailing axes, and only leading axes are moved, sliced,
    broadcast or summed over."""
    p, params = eqn.primitive, eqn.params
    s, out = shape(eqn.invars[k]), shape(eqn.outvars[0])
    lead = len(s) - r
    if lead < 0 or len(out) < r or s[lead:] != out[len(out) - r :]:
        return False  # (a slice, a concatenation or a reshape that cuts the position axes)
    if p is LAYOUT["broadcast_in_dim"]:
        return tuple(params["broadcast_dimensions"][lead:]) == tuple(range(len(out) - r, len(out)))
    if p is LAYOUT["reshape"]:
        return params.get("dimensions") is None
    if p is LAYOUT["squeeze"]:
        return all(d < lead for d in params["dimensions"])
    if p is LAYOUT["transpose"]:
        return tuple(params["permutation"][lead:]) == tuple(range(lead, len(s)))
    if p in _REDUCTIONS:
        return all(a < lead for a in params["axes"])
    if p in (LAYOUT.get("stack"), LAYOUT.get("unstack")):
        return params["axis"] < (len(out) if p is LAYOUT.get("stack") else len(s)) - r
    if p is LAYOUT["gather"]:  # `xs[i]`: the indexed axes must lead, the positions come out whole
        dn = params["dimension_numbers"]
        indexed = (*dn.collapsed_slice_dims, *dn.start_index_map, *getattr(dn, "operand_batching_dims", ()))
        return (
            all(d < lead for d in indexed)
            and tuple(params["slice_sizes"][lead:]) == s[lead:]
            and tuple(dn.offset_dims[len(dn.offset_dims) - r :]) == tuple(range(len(out) - r, len(out)))
        )
    if p in _SCATTERS:  # `xs.at[i].set(x)`: the operand keeps its positions; so do whole updates
        if k == 0:
            return True
        dn = params["dimension_numbers"]
        out_lead = len(out) - r
        indexed = (
            *dn.inserted_window_dims,
            *dn.scatter_dims_to_operand_dims,
            *getattr(dn, "operand_batching_dims", ()),
        )
        window = tuple(dn.update_window_dims[len(dn.update_window_dims) - r :])
        return all(d < out_lead for d in indexed) and window == tuple(range(lead, len(s)))
    if p is EQX_MAYBE_SET:  # `xs.at[i].set(x)`, `i` one integer (the leading axis of `xs`)
        return k == 1 or (params["i_static"] is None and params["i_treedef"].num_leaves == 1)
    if p is LAYOUT["dot_general"]:
        (contract, batch) = params["dimension_numbers"]
        if any(d >= lead for d in (*contract[k], *batch[k])):
            return False
        # The output's axes are the batch axes, then the free axes of the left operand, then the
        # right's: the left operand's positions end the output only if the right has no free axis.
        other = shape(eqn.invars[1])
        return k == 1 or len(other) == len(contract[1]) + len(batch[1])
    # slice, dynamic_slice, dynamic_update_slice, concatenate: equal trailing axes mean the whole
    # position block is kept (a slice's start is clamped to 0 when its size is the axis's).
    return True


def equation_flow(eqn, r: int) -> Flow:
    """For each output of `eqn`, the operands it depends on, each with a flag: `True` when output
    position `i` depends on that operand at position `i` only, positions being the trailing `r`
    axes."""
    if eqn.primitive is WHILE:
        flow = _while_flow(eqn, r)
    elif eqn.primitive is SCAN:
        flow = _scan_flow(eqn, r)
    elif eqn.primitive is COND:
        flow = _cond_flow(eqn, r)
    else:
        body = custom_call_body(eqn) or closed_call_body(eqn)
        if body is not None:
            flow = _body_flow(body, r)
        else:
            ew = eqn.primitive in ELEMENTWISE
            layout = eqn.primitive in LAYOUT.values() or eqn.primitive is EQX_MAYBE_SET
            flow = tuple(
                {
                    k: (ew and shape(v) == shape(o)) or (layout and _keeps_positions(eqn, k, r))
                    for k, v in enumerate(eqn.invars)
                    if not isinstance(v, Literal) and (ew or jnp.issubdtype(v.aval.dtype, jnp.inexact))
                }
                for o in eqn.outvars
            )
    return tuple(
        {k: pw and _trailing_match(eqn.invars[k], o, r) for k, pw in edges.items()}
        for o, edges in zip(eqn.outvars, flow)
    )


def _trailing_match(v, o, r: int) -> bool:
    a, b = shape(v), shape(o)
    return len(a) >= r and len(b) >= r and a[len(a) - r :] == b[len(b) - r :]


def calls_custom_vjp(jaxpr) -> bool:
    """Whether `jaxpr` calls a `jax.custom_vjp` function, at any depth."""
    return any(
        eqn.primitive is CUSTOM_VJP_CALL or any(calls_custom_vjp(sub.jaxpr) for sub in _sub_jaxprs(eqn))
        for eqn in jaxpr.eqns
    )
