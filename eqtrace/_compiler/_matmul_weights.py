"""The weights a step uses only as the weight of dense layers: their gradient through one step is a
sum of outer products `xᵀ c` (input rows against output cotangents), which the rules can leave to
be contracted over many steps at once."""

import types
from collections.abc import Mapping, Sequence

from .._jax_internals import Literal
from .._ops import etp_matmul_p


def matmul_only_weights(jaxpr, weight_vars: Sequence) -> Mapping[int, tuple[int, ...]]:
    """For each weight (index into `weight_vars`) used in `jaxpr` only as the `w` of `etp_matmul`
    equations (`x @ w + b`, a 2-D `w`, not under an ensemble's `jax.vmap`), the indices of those
    equations. A weight with any other use, an output of the step included, is left out."""
    index = {v: i for i, v in enumerate(weight_vars)}
    uses: dict[int, list[int]] = {i: [] for i in range(len(weight_vars))}
    other = {index[v] for v in jaxpr.outvars if not isinstance(v, Literal) and v in index}
    for e, eqn in enumerate(jaxpr.eqns):
        for j, v in enumerate(eqn.invars):
            if isinstance(v, Literal) or v not in index:
                continue
            plain = eqn.primitive is etp_matmul_p and not eqn.params.get("vmap_in_axes")
            if plain and j == 1 and v.aval.ndim == 2:
                uses[index[v]].append(e)
            else:
                other.add(index[v])
    return types.MappingProxyType({i: tuple(e) for i, e in uses.items() if e and i not in other})
