"""Hidden groups: the hidden states that evolve together, position by position, within one step."""

import jax.numpy as jnp

from ._dataflow import hidden_dependencies, UnionFind
from ._graph import HiddenGroup


def find_hidden_groups(jaxpr, hidden_in, hidden_out, hidden_paths, hidden_avals, traced) -> list[HiddenGroup]:
    """Connected components of new-state ← old-state dependencies, with ETP outputs held fixed.

    Decided by data flow only, never by names or shapes; states of one group must share a shape.
    """
    deps = hidden_dependencies(jaxpr, hidden_in)
    uf = UnionFind(len(hidden_paths))
    traced_set = set(traced)
    for i in traced:
        for h in deps.get(hidden_out[i], {}):
            if h in traced_set:
                uf.union(i, h)
    members: dict[int, list[int]] = {}
    for i in traced:
        members.setdefault(uf.find(i), []).append(i)
    groups: list[HiddenGroup] = []
    for idx, ms in enumerate(sorted(members.values(), key=min)):
        shapes = {hidden_avals[i].shape for i in ms}
        dtypes = {hidden_avals[i].dtype for i in ms}
        if len(shapes) > 1 or len(dtypes) > 1:
            got = ", ".join(
                f"{hidden_paths[i]}: {hidden_avals[i].dtype}{list(hidden_avals[i].shape)}" for i in ms
            )
            raise ValueError(
                f"These hidden states evolve together within one step but differ in shape or dtype: "
                f"{got}. States of one group need one shape, so that each position has an S×S "
                "Jacobian block."
            )
        own = [(h, flag) for i in ms for h, flag in deps.get(hidden_out[i], {}).items() if h in traced_set]
        position_wise = all(flag for _, flag in own)
        group = HiddenGroup(
            index=idx,
            hidden_paths=tuple(hidden_paths[i] for i in ms),
            varshape=tuple(hidden_avals[ms[0]].shape),
            dtype=jnp.dtype(hidden_avals[ms[0]].dtype),
            position_wise=position_wise,
            recurrent=bool(own),
        )
        groups.append(group)

    return groups
