"""Brute-force references of the online approximations, from full Jacobians.

The references read which variables are hidden states and which equations are ETP operations
from the compiled graph, re-run the step with a small interpreter of their own, and get every
derivative from `jax.jacfwd`/`jax.grad` of whole functions: no per-operation rule, no trace layout,
no tangent-of-ones trick. Approximations are applied by masking full matrices.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eqtrace._compiler._run import flatten_step_inputs, unflatten_step_outputs
from eqtrace._jax_internals import bind_equation, Literal, Var
from eqtrace._ops import etp_op_of


def _run(graph, weights, xs, hidden, *, cut=False, detach=False, add=None, weight_override=None):
    """Evaluate the step; returns (outputs, raw new values of the perturbation points).

    - `cut`: the input operand of every ETP equation is held fixed (`stop_gradient`).
    - `detach`: later reads of a new hidden value see it held fixed.
    - `add[k]`: added to perturbation point `k` where it is produced.
    - `weight_override[(eqn, operand)]`: replaces that weight operand of that ETP equation.
    """
    closed = graph.module_info.closed_jaxpr
    pvars = list(graph.hidden_perturb.perturb_vars)
    env = {}
    raw = {}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for v, val in zip(closed.jaxpr.constvars, closed.consts):
        env[v] = val
    for v, val in zip(closed.jaxpr.invars, [*weights, *xs, *hidden]):
        env[v] = val
    for e, eqn in enumerate(closed.jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        op = etp_op_of(eqn.primitive)
        if op is not None:
            if cut and op.has_input:
                invals[0] = jax.lax.stop_gradient(invals[0])
            for j in range(len(invals)):
                if weight_override and (e, j) in weight_override:
                    invals[j] = weight_override[(e, j)]
        outs = bind_equation(eqn, invals)
        for v, val in zip(eqn.outvars, outs):
            if not isinstance(v, Var):
                continue
            if v in pvars:
                k = pvars.index(v)
                if add is not None:
                    val = val + add[k]
                raw[k] = val
                if detach:
                    val = jax.lax.stop_gradient(val)
            env[v] = val
    return [read(v) for v in closed.jaxpr.outvars], [raw[k] for k in range(len(pvars))]


def _flat(arrays):
    return jnp.concatenate([jnp.ravel(a) for a in arrays])


def _layout(graph):
    """Offsets of each perturbation point in the flat hidden vector, and a mask that keeps only
    same-group, same-position entries of an (hidden × hidden) Jacobian."""
    paths = graph.hidden_perturb.hidden_paths
    sizes = [int(np.prod(graph.hid_path_to_group[p].varshape)) for p in paths]
    offsets = np.cumsum([0] + sizes)
    n = offsets[-1]
    mask = np.zeros((n, n), bool)
    for a, pa in enumerate(paths):
        for b, pb in enumerate(paths):
            if graph.hid_path_to_group[pa] is graph.hid_path_to_group[pb]:
                for i in range(sizes[a]):
                    mask[offsets[a] + i, offsets[b] + i] = True
    return offsets, mask


def _traced_hidden(graph, hidden):
    index = {p: i for i, p in enumerate(graph.module_info.hidden_paths)}
    return [index[p] for p in graph.hidden_perturb.hidden_paths]


def d_rtrl_reference_step(graph, model, state, x, target, loss_fn, memory):
    """One step of D-RTRL from full Jacobians.

    `memory[r]` is the approximate `∂h_{t-1}/∂W` of relation `r` as a full (hidden × weight) matrix.
    Returns `(new_memory, grads, new_state)`; `grads` as a flat list over the weight leaves.
    """
    weights, xs, hidden = flatten_step_inputs(graph, model, x, state)
    traced = _traced_hidden(graph, hidden)
    offsets, mask = _layout(graph)

    def q_of_hidden(flat_h, detach):
        h = list(hidden)
        for k, i in enumerate(traced):
            h[i] = flat_h[offsets[k] : offsets[k + 1]].reshape(hidden[i].shape)
        return _flat(_run(graph, weights, xs, h, cut=True, detach=detach)[1])

    h0 = _flat([hidden[i] for i in traced])
    j_total = jnp.where(mask, jax.jacfwd(lambda h: q_of_hidden(h, False))(h0), 0.0)
    j_local = jnp.where(mask, jax.jacfwd(lambda h: q_of_hidden(h, True))(h0), 0.0)

    # The learning signal: the loss's derivative by an additive perturbation at each new value.
    def loss_of_perturbation(flat_p):
        adds = [flat_p[offsets[k] : offsets[k + 1]].reshape(hidden[i].shape) for k, i in enumerate(traced)]
        outs, _ = _run(graph, weights, xs, hidden, add=adds)
        return loss_fn(unflatten_step_outputs(graph, outs)[0], target)

    delta = jax.grad(loss_of_perturbation)(jnp.zeros_like(h0))

    # The exact same-step gradient, straight from the model.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    g_same = eqx.filter_grad(lambda p: loss_fn(eqx.combine(p, static)(x, state)[0], target))(params)
    grads = list(jax.tree.leaves(g_same))
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}

    new_memory = {}
    for r, rel in enumerate(graph.hidden_param_op_relations):
        if not rel.position_diagonal:
            continue
        w = weights[index[rel.weight_path]]
        rows = np.zeros(len(h0), bool)
        for k, p in enumerate(graph.hidden_perturb.hidden_paths):
            if graph.hid_path_to_group[p] in rel.hidden_groups:
                rows[offsets[k] : offsets[k + 1]] = True

        def q_of_weight(wv):
            over = {(rel.eqn_index, rel.operand_index): wv.reshape(w.shape)}
            return _flat(_run(graph, weights, xs, hidden, cut=True, weight_override=over)[1])

        instant = jnp.where(rows[:, None], jax.jacfwd(q_of_weight)(jnp.ravel(w)), 0.0)
        old = memory.get(r, jnp.zeros_like(instant))
        g = index[rel.weight_path]
        grads[g] = grads[g] + (delta @ j_local @ old).reshape(w.shape)
        new_memory[r] = j_total @ old + instant
    new_state = model(x, state)[1]
    return new_memory, grads, new_state


def memory_as_traces(graph, memory, model):
    """The reference memory in D-RTRL's trace layout (`weight.shape + (S,)` per relation and
    group), and the largest entry that layout cannot hold (off the position diagonal)."""
    offsets, _ = _layout(graph)
    paths = graph.hidden_perturb.hidden_paths
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    weights = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    traces, off_diagonal = [], 0.0
    for r, rel in enumerate(graph.hidden_param_op_relations):
        if not rel.position_diagonal:
            continue
        w = weights[index[rel.weight_path]]
        for group in rel.hidden_groups:
            pn = group.num_positions
            ln = w.size // pn
            ks = [k for k, p in enumerate(paths) if p in group.hidden_paths]
            block = jnp.stack([memory[r][offsets[k] : offsets[k + 1]] for k in ks])  # (S, P, W)
            block = block.reshape(len(ks), pn, ln, pn)
            diag = jnp.diagonal(block, axis1=1, axis2=3)  # (S, L, P)
            off = block * (1 - jnp.eye(pn, dtype=block.dtype))[None, :, None, :]
            off_diagonal = max(off_diagonal, float(jnp.max(jnp.abs(off))))
            traces.append(jnp.moveaxis(diag, 0, -1).reshape(w.shape + (len(ks),)))
    return traces, off_diagonal
