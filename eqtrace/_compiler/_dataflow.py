"""Forward data-flow analyses over a flat step jaxpr: which inputs a value depends on, and how."""

from collections.abc import Sequence

from .._jax_internals import closed_call_body, custom_call_body, ELEMENTWISE, Literal, Var
from .._ops import etp_op_of


ETP, EW, MIX = 1, 2, 3  # how a value reaches another: via another ETP op < element-wise < mixing


def shape(v) -> tuple[int, ...]:
    return tuple(v.aval.shape)


def _body_is_elementwise(closed) -> bool:
    for eqn in closed.jaxpr.eqns:
        if not _eqn_is_elementwise(eqn):
            return False
    return True


def _eqn_is_elementwise(eqn) -> bool:
    if eqn.primitive in ELEMENTWISE:
        return True
    body = custom_call_body(eqn) or closed_call_body(eqn)
    return body is not None and _body_is_elementwise(body)


def _operand_is_position_wise(eqn, var) -> bool:
    """Whether output position `i` of `eqn` depends on `var` at position `i` only."""
    return _eqn_is_elementwise(eqn) and all(shape(var) == shape(o) for o in eqn.outvars)


def hidden_dependencies(jaxpr, hidden_vars: Sequence[Var]) -> dict:
    """For every variable, the hidden inputs it depends on when ETP outputs are held fixed, each
    with a flag: `True` if every such path is position-wise."""
    deps: dict = {v: {i: True} for i, v in enumerate(hidden_vars)}
    for eqn in jaxpr.eqns:
        out: dict[int, bool] = {}
        if etp_op_of(eqn.primitive) is None:
            for v in eqn.invars:
                if isinstance(v, Literal) or v not in deps:
                    continue
                pw = _operand_is_position_wise(eqn, v)
                for h, flag in deps[v].items():
                    out[h] = out.get(h, True) and flag and pw
        for o in eqn.outvars:
            if out:
                deps[o] = out
    return deps


def reach(jaxpr, start: int) -> dict:
    """How the output of equation `start` reaches every later variable (`ETP`, `EW` or `MIX`)."""
    kind = {eqn_out: EW for eqn_out in jaxpr.eqns[start].outvars}
    for eqn in jaxpr.eqns[start + 1 :]:
        k_out = 0
        is_etp = etp_op_of(eqn.primitive) is not None
        for v in eqn.invars:
            if isinstance(v, Literal) or v not in kind:
                continue
            k = kind[v]
            if is_etp:
                k = ETP  # the op's input is cut: what happened before it no longer matters
            elif k == EW and not _operand_is_position_wise(eqn, v):
                k = MIX
            k_out = max(k_out, k)
        if k_out:
            for o in eqn.outvars:
                kind[o] = k_out
    return kind


def weight_dependencies(jaxpr, weight_vars: Sequence[Var]) -> dict:
    deps: dict = {v: frozenset([i]) for i, v in enumerate(weight_vars)}
    for eqn in jaxpr.eqns:
        got = frozenset().union(*(deps.get(v, frozenset()) for v in eqn.invars if not isinstance(v, Literal)))
        if got:
            for o in eqn.outvars:
                deps[o] = got
    return deps


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)
