"""Forward data-flow analyses over a flat step jaxpr: which inputs a value depends on, and how."""

from collections.abc import Sequence

from .._jax_internals import Literal, Var
from .._ops import etp_op_of
from ._flow import equation_flow, propagate, shape as shape


ETP, EW, MIX = 1, 2, 3  # how a value reaches another: via another ETP op < element-wise < mixing


def hidden_dependencies(jaxpr, hidden_vars: Sequence[Var]) -> dict:
    """For every variable, the hidden inputs it depends on when ETP outputs are held fixed, each
    with a flag: `True` if every such path is position-wise."""
    deps = propagate(
        jaxpr, {v: {i: True} for i, v in enumerate(hidden_vars)}, [len(shape(v)) for v in hidden_vars]
    )
    # Position-wise between values of one shape only (a flow may add leading axes on the way).
    return {
        o: {i: flag and shape(o) == shape(hidden_vars[i]) for i, flag in d.items()} for o, d in deps.items()
    }


def reach(jaxpr, start: int) -> dict:
    """How the output of equation `start` reaches every later variable (`ETP`, `EW` or `MIX`)."""
    [y] = jaxpr.eqns[start].outvars
    kind = {y: EW}
    for eqn in jaxpr.eqns[start + 1 :]:
        if not any(not isinstance(v, Literal) and v in kind for v in eqn.invars):
            continue
        is_etp = etp_op_of(eqn.primitive) is not None
        for o, edges in zip(eqn.outvars, equation_flow(eqn, len(shape(y)))):
            k_out = 0
            for j, pw in edges.items():
                v = eqn.invars[j]
                if isinstance(v, Literal) or v not in kind:
                    continue
                k = kind[v]
                if is_etp:
                    k = ETP  # the op's input is cut: what happened before it no longer matters
                elif k == EW and not pw:
                    k = MIX
                k_out = max(k_out, k)
            if k_out:
                kind[o] = k_out
    # Element-wise between values of one shape only (a flow may add leading axes on the way).
    return {v: MIX if k == EW and shape(v) != shape(y) else k for v, k in kind.items()}


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
