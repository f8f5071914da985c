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


def _run(
    graph,
    weights,
    xs,
    hidden,
    *,
    cut=False,
    detach=False,
    add=None,
    weight_override=None,
    y_add=None,
    record=None,
):
    """Evaluate the step; returns (outputs, raw new values of the perturbation points).

    - `cut`: the input operand of every ETP equation is held fixed (`stop_gradient`).
    - `detach`: later reads of a new hidden value see it held fixed.
    - `add[k]`: added to perturbation point `k` where it is produced.
    - `weight_override[(eqn, operand)]`: replaces that weight operand of that ETP equation.
    - `y_add[eqn]`: added to the output of that ETP equation.
    - `record[eqn]`: filled with the operands of every ETP equation.
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
            if record is not None:
                record[e] = list(invals)
        outs = bind_equation(eqn, invals)
        if y_add and e in y_add:
            outs = [outs[0] + y_add[e]]
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


def _step_parts(graph, model, state, x, target, loss_fn, cut=True):
    """Full Jacobians of one step: the hidden Jacobian (cut at ETP inputs unless `cut=False`,
    masked to same-group, same-position entries), the learning signal `λ = ∂L_t/∂h_{t-1}` that
    multiplies the old trace (by window: `0`, through the masked Jacobian with the step's other new
    values held fixed, plus what the loss reads of `h_{t-1}` directly; `1`, exactly), and the exact
    same-step gradient."""
    weights, xs, hidden = flatten_step_inputs(graph, model, x, state)
    traced = _traced_hidden(graph, hidden)
    offsets, mask = _layout(graph)

    def q_of_hidden(flat_h, detach):
        h = list(hidden)
        for k, i in enumerate(traced):
            h[i] = flat_h[offsets[k] : offsets[k + 1]].reshape(hidden[i].shape)
        return _flat(_run(graph, weights, xs, h, cut=cut, detach=detach)[1])

    h0 = _flat([hidden[i] for i in traced])
    j_total = jnp.where(mask, jax.jacfwd(lambda h: q_of_hidden(h, False))(h0), 0.0)
    j_local = jnp.where(mask, jax.jacfwd(lambda h: q_of_hidden(h, True))(h0), 0.0)

    # The learning signal: the loss's derivative by an additive perturbation at each new value.
    def loss_of_perturbation(flat_p):
        adds = [flat_p[offsets[k] : offsets[k + 1]].reshape(hidden[i].shape) for k, i in enumerate(traced)]
        outs, _ = _run(graph, weights, xs, hidden, add=adds)
        return loss_fn(unflatten_step_outputs(graph, outs)[0], target)

    delta = jax.grad(loss_of_perturbation)(jnp.zeros_like(h0))

    # What the loss reads of the old state directly, not through a new hidden value.
    def loss_of_old_hidden(flat_h):
        h = list(hidden)
        for k, i in enumerate(traced):
            h[i] = flat_h[offsets[k] : offsets[k + 1]].reshape(hidden[i].shape)
        outs, _ = _run(graph, weights, xs, h, detach=True)
        return loss_fn(unflatten_step_outputs(graph, outs)[0], target)

    direct = jax.grad(loss_of_old_hidden)(h0)

    # The exact same-step gradient and `∂L_t/∂h_{t-1}`, straight from the model.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    g_same = eqx.filter_grad(lambda p: loss_fn(eqx.combine(p, static)(x, state)[0], target))(params)
    full = jax.grad(lambda h: loss_fn(model(x, with_traced_hidden(graph, state, h))[0], target))(h0)
    signals = {0: delta @ j_local + direct, 1: full}
    return weights, xs, hidden, offsets, j_total, signals, list(jax.tree.leaves(g_same))


def with_traced_hidden(graph, state, flat_h):
    """`state` with its traced leaves read from the flat vector `flat_h`."""
    offsets, _ = _layout(graph)
    leaves, treedef = jax.tree.flatten(state)
    index = {p: i for i, p in enumerate(graph.module_info.hidden_paths)}
    for k, p in enumerate(graph.hidden_perturb.hidden_paths):
        i = index[p]
        leaves[i] = flat_h[offsets[k] : offsets[k + 1]].reshape(leaves[i].shape)
    return jax.tree.unflatten(treedef, leaves)


def traced_hidden_vector(graph, state):
    leaves = jax.tree.leaves(state)
    index = {p: i for i, p in enumerate(graph.module_info.hidden_paths)}
    return _flat([leaves[index[p]] for p in graph.hidden_perturb.hidden_paths])


def _group_rows(graph, offsets, groups, n):
    rows = np.zeros(n, bool)
    for k, p in enumerate(graph.hidden_perturb.hidden_paths):
        if graph.hid_path_to_group[p] in groups:
            rows[offsets[k] : offsets[k + 1]] = True
    return rows


def d_rtrl_reference_step(graph, model, state, x, target, loss_fn, memory, window=1, override=None, cut=True):
    """One step of D-RTRL (`window` 0 or 1) from full Jacobians.

    `memory[r]` is the approximate `∂h_{t-1}/∂W` of relation `r` as a full (hidden × weight) matrix.
    Returns `(new_memory, grads, new_state)`; `grads` as a flat list over the weight leaves.
    `override = (signal, grads)` replaces this step's learning signal and exact gradient (see
    `window_reference`). `cut=False` gives SnAp-1 (see `snap1_reference_step`).
    """
    weights, xs, hidden, offsets, j_total, signals, grads = _step_parts(
        graph, model, state, x, target, loss_fn, cut=cut
    )
    signal = signals[window]
    if override is not None:
        signal, grads = override
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    new_memory = {}
    for r, rel in enumerate(graph.hidden_param_op_relations):
        if not rel.per_position:
            continue
        w = weights[index[rel.weight_path]]
        rows = _group_rows(graph, offsets, rel.hidden_groups, len(signal))

        def q_of_weight(wv):
            over = {(rel.eqn_index, rel.operand_index): wv.reshape(w.shape)}
            return _flat(_run(graph, weights, xs, hidden, cut=True, weight_override=over)[1])

        instant = jnp.where(rows[:, None], jax.jacfwd(q_of_weight)(jnp.ravel(w)), 0.0)
        old = memory.get(r, jnp.zeros_like(instant))
        g = index[rel.weight_path]
        grads[g] = grads[g] + (signal @ old).reshape(w.shape)
        new_memory[r] = j_total @ old + instant
    new_state = model(x, state)[1]
    return new_memory, grads, new_state


def snap1_reference_step(graph, model, state, x, target, loss_fn, memory, window=1, override=None):
    """One step of SnAp-1 (`window` 0 or 1) from full Jacobians: D-RTRL's reference with the memory
    carried through the full step Jacobian, *not* cut at ETP inputs (so the mixing of every ETP
    operation that reads `h_{t-1}` counts), masked to same-group, same-position entries:
    `M_t = J_masked M_{t-1} + instant`, the instantaneous term cut at ETP inputs as D-RTRL's. The
    gradient is the exact same-step gradient plus `λ · M_{t-1}`, `λ = ∂L_t/∂h_{t-1}` (`window=1`:
    exactly; `0`: through the uncut masked Jacobian with the step's other new values held fixed,
    plus what the loss reads of `h_{t-1}` directly)."""
    return d_rtrl_reference_step(graph, model, state, x, target, loss_fn, memory, window, override, cut=False)


def memory_as_traces(graph, memory, model):
    """The reference memory in D-RTRL's trace layout (`weight.shape + (S,)` per relation and
    group, after the positions of a weight shared along `shared_axes`), and the largest entry that
    layout cannot hold (off the position diagonal)."""
    offsets, _ = _layout(graph)
    paths = graph.hidden_perturb.hidden_paths
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    weights = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    traces, off_diagonal = [], 0.0
    for r, rel in enumerate(graph.hidden_param_op_relations):
        if not rel.per_position:
            continue
        w = weights[index[rel.weight_path]]
        for group in rel.hidden_groups:
            pn = group.num_positions
            ln = w.size // pn
            ks = [k for k, p in enumerate(paths) if p in group.hidden_paths]
            block = jnp.stack([memory[r][offsets[k] : offsets[k + 1]] for k in ks])  # (S, P, W)
            if rel.shared_axes:
                trace, off = _shared_as_trace(rel, group, block, w.shape)
                traces.append(trace)
                off_diagonal = max(off_diagonal, off)
                continue
            block = block.reshape(len(ks), pn, ln, pn)
            diag = jnp.diagonal(block, axis1=1, axis2=3)  # (S, L, P)
            off = block * (1 - jnp.eye(pn, dtype=block.dtype))[None, :, None, :]
            off_diagonal = max(off_diagonal, float(jnp.max(jnp.abs(off))))
            traces.append(jnp.moveaxis(diag, 0, -1).reshape(w.shape + (len(ks),)))
    return traces, off_diagonal


def _shared_as_trace(rel, group, block, w_shape):
    """A (S, positions, weight) memory block of a weight shared along `rel.shared_axes`, as the
    per-position trace (`shared positions + weight.shape + (S,)`): the entries where the position's
    other output axes equal the weight's other axes; and the largest entry elsewhere."""
    n_s, n_y = len(rel.shared_axes), len(group.varshape)
    y_others = [a for a in range(n_y) if a not in rel.shared_axes]
    w_others = [a for a in range(len(w_shape)) if a not in rel.input_axes]
    block = block.reshape((block.shape[0],) + group.varshape + tuple(w_shape))
    # (S, shared, y others, w others, w inputs)
    perm = [0] + [1 + a for a in rel.shared_axes] + [1 + a for a in y_others]
    perm += [1 + n_y + a for a in w_others] + [1 + n_y + a for a in rel.input_axes]
    block = jnp.transpose(block, perm)
    n_o = int(np.prod([w_shape[a] for a in w_others]))
    sp = block.shape[1 : 1 + n_s]
    w_in = tuple(w_shape[a] for a in rel.input_axes)
    block = block.reshape((block.shape[0],) + sp + (n_o, n_o) + w_in)
    eye = np.eye(n_o, dtype=bool).reshape((1,) * (1 + n_s) + (n_o, n_o) + (1,) * len(w_in))
    off = float(jnp.max(jnp.abs(jnp.where(eye, 0.0, block))))
    diag = jnp.moveaxis(jnp.diagonal(block, axis1=1 + n_s, axis2=2 + n_s), -1, 1 + n_s)  # (S, sp, n_o, w_in)
    diag = diag.reshape((diag.shape[0],) + sp + tuple(w_shape[a] for a in w_others) + w_in)
    # back to the weight's axis order, the state axis last
    order = list(w_others) + list(rel.input_axes)
    inverse = [1 + n_s + order.index(a) for a in range(len(w_shape))]
    diag = jnp.transpose(diag, [0] + list(range(1, 1 + n_s)) + inverse)
    return jnp.moveaxis(diag, 0, -1), off


def new_value_signal(graph, weights, xs, hidden, target, loss_fn):
    """`λ_t = ∂L_t/∂h_t` with each new hidden value an input of its own: the derivative `δ_t` by
    additive perturbations `p` at the new values (whose effect reaches the values computed from them
    and the loss), through the inverse of `∂h_t/∂p` (ETP inputs held fixed, as the output traces
    are): `δ_t = λ_t ∂h_t/∂p`."""
    traced = _traced_hidden(graph, hidden)
    offsets, _ = _layout(graph)

    def adds(flat_p):
        return [flat_p[offsets[k] : offsets[k + 1]].reshape(hidden[i].shape) for k, i in enumerate(traced)]

    def loss_of_perturbation(flat_p):
        outs, _ = _run(graph, weights, xs, hidden, add=adds(flat_p))
        return loss_fn(unflatten_step_outputs(graph, outs)[0], target)

    zeros = jnp.zeros_like(_flat([hidden[i] for i in traced]))
    delta = jax.grad(loss_of_perturbation)(zeros)
    reach = jax.jacfwd(lambda p: _flat(_run(graph, weights, xs, hidden, cut=True, add=adds(p))[1]))(zeros)
    return jnp.linalg.solve(reach.T, delta)


def _untraced_matmul_grads(graph, weights, xs, hidden, target, loss_fn, grads, traced):
    """Add to `grads` the exact same-step gradient of each `traced` weight used only by
    `etp_matmul` through its equations that reach no hidden state (in no relation)."""
    traced_eqns = {r.eqn_index for r in graph.hidden_param_op_relations}
    for i, eqns in graph.module_info.matmul_weights.items():
        for e in set(eqns) - traced_eqns if i in traced else ():

            def loss_of_weight(w, e=e):
                outs, _ = _run(graph, weights, xs, hidden, weight_override={(e, 1): w})
                return loss_fn(unflatten_step_outputs(graph, outs)[0], target)

            grads[i] = grads[i] + jax.grad(loss_of_weight)(weights[i])


def es_d_rtrl_reference_step(
    graph,
    model,
    state,
    x,
    target,
    loss_fn,
    memory,
    decay,
    window=1,
    normalise=True,
    override=None,
    exact_step=True,
):
    """One step of ES-D-RTRL (`window` 0 or 1) from full Jacobians.

    `memory["x"][e]` is the input trace of ETP equation `e` (a sum of `decay`-weighted inputs),
    `memory["w"]` the sum of their weights, `memory["f"][e]` its output trace as a full
    (hidden × output) matrix. Returns `(new_memory, grads, new_state)`.

    `exact_step=False` (`window=0`): a traced weight's whole gradient is `x̂_t ⊗ F_t` (both traces
    after the step) paired with `λ_t` of `new_value_signal`; a weight used only by `etp_matmul`
    keeps the exact same-step gradient of its untraced equations, every untraced weight its own.
    """
    weights, xs, hidden, offsets, j_total, signals, grads = _step_parts(
        graph, model, state, x, target, loss_fn
    )
    signal = signals[window]
    if override is not None:
        signal, grads = override
    weight = memory.get("w", 0.0)
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    if not exact_step:
        signal = new_value_signal(graph, weights, xs, hidden, target, loss_fn)
        traced = {index[r.weight_path] for r in graph.hidden_param_op_relations}
        for g in traced:
            grads[g] = jnp.zeros_like(grads[g])
        _untraced_matmul_grads(graph, weights, xs, hidden, target, loss_fn, grads, traced)
    record = {}
    _run(graph, weights, xs, hidden, record=record)
    eqns = graph.module_info.closed_jaxpr.jaxpr.eqns
    new = {"x": {}, "f": {}, "w": decay * weight + 1.0}
    for e in sorted({r.eqn_index for r in graph.hidden_param_op_relations}):
        rels = [r for r in graph.hidden_param_op_relations if r.eqn_index == e]
        op = etp_op_of(eqns[e].primitive)
        y = eqns[e].outvars[0].aval
        rows = _group_rows(graph, offsets, rels[0].hidden_groups, len(signal))

        def q_of_y(dy):
            return _flat(_run(graph, weights, xs, hidden, cut=True, y_add={e: dy.reshape(y.shape)})[1])

        dq_dy = jnp.where(rows[:, None], jax.jacfwd(q_of_y)(jnp.zeros(int(np.prod(y.shape)), y.dtype)), 0.0)
        f_old = memory["f"].get(e, jnp.zeros_like(dq_dy))
        new["f"][e] = j_total @ f_old + dq_dy
        operands = list(record[e])
        if op.has_input:
            x_old = memory["x"].get(e, jnp.zeros_like(operands[0]))
            new["x"][e] = decay * x_old + operands[0]
            x_in, w_in = (x_old, weight) if exact_step else (new["x"][e], new["w"])
            operands[0] = x_in / max(w_in, 1.0) if normalise else x_in
        cot = signal @ (f_old if exact_step else new["f"][e])
        for rel in rels:
            j = rel.operand_index

            def y_of_weight(wv):
                ops = list(operands)
                ops[j] = wv.reshape(operands[j].shape)
                return jnp.ravel(op.impl(*ops, **eqns[e].params))

            jac = jax.jacfwd(y_of_weight)(jnp.ravel(operands[j]))
            g = index[rel.weight_path]
            grads[g] = grads[g] + (cot @ jac).reshape(weights[g].shape)
    return new, grads, model(x, state)[1]


def output_traces(graph, memory):
    """The reference output traces in ES-D-RTRL's layout (`varshape + (S,)` per traced equation and
    group), and the largest entry that layout cannot hold (off the position diagonal)."""
    offsets, _ = _layout(graph)
    paths = graph.hidden_perturb.hidden_paths
    traces, off_diagonal = [], 0.0
    eqn_groups = {r.eqn_index: list(r.hidden_groups) for r in graph.hidden_param_op_relations}
    for e in sorted(eqn_groups):
        for group in eqn_groups[e]:
            pn = group.num_positions
            ks = [k for k, p in enumerate(paths) if p in group.hidden_paths]
            block = jnp.stack([memory["f"][e][offsets[k] : offsets[k + 1]] for k in ks])  # (S, P, P)
            diag = jnp.diagonal(block, axis1=1, axis2=2)
            off = block * (1 - jnp.eye(pn, dtype=block.dtype))[None]
            off_diagonal = max(off_diagonal, float(jnp.max(jnp.abs(off))))
            traces.append(jnp.moveaxis(diag, 0, -1).reshape(group.varshape + (len(ks),)))
    return traces, off_diagonal


def window_reference(graph, model, state, xs, targets, loss_fn, window, reference_step, memory):
    """Per-step gradients of a rule with `window=K`: `∂L_t/∂θ` exactly through the last `K` steps
    (by `jax.grad` of the model itself), plus the history term of the traces at the window's
    anchor, which `reference_step` (a reference above, with its options bound) advances over each
    anchor step. Yields `(grads, memory)` per step."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    anchor_state, anchor_index = state, 0
    for t in range(len(xs)):

        def loss_t(params, h):
            m = eqx.combine(params, static)
            s = with_traced_hidden(graph, anchor_state, h)
            for i in range(anchor_index, t + 1):
                y, s = m(xs[i], s)
            return loss_fn(y, targets[t])

        g, lam = jax.grad(loss_t, argnums=(0, 1))(params, traced_hidden_vector(graph, anchor_state))
        override = (lam, list(jax.tree.leaves(g)))
        x_a, t_a = xs[anchor_index], targets[anchor_index]
        new_memory, grads, new_anchor = reference_step(
            graph, model, anchor_state, x_a, t_a, loss_fn, memory, override=override
        )
        if t - anchor_index + 1 == window:  # the window is full: the anchor moves on by one step
            memory, anchor_state, anchor_index = new_memory, new_anchor, anchor_index + 1
        yield grads, memory
