"""What every online rule needs from one step, computed once.

Step `t` is linearised over its *window*: the last `K` steps, run exactly from the stored anchor
state `h_{t-K}` (`K = 1`: from `h_{t-1}`). One VJP of the loss gives the exact gradient through the
window and the learning signal `λ = ∂L_t/∂h_{t-K}` that the traces carry further back. The window's
first step (the one the traces advance over) is also linearised with ETP outputs held fixed: the
per-position Jacobian blocks `D = ∂h/∂h_prev` and `D_f = ∂h/∂y`. On request (`full_jacobian`), `D`
is instead the per-position diagonal of the full step Jacobian, the ETP operations' mixing included.
"""

import functools
import operator
from collections.abc import Callable, Collection

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._compiler import ETraceGraph, evaluate, HiddenGroup
from .._compiler._freeze import trainable_mask
from .._compiler._run import flatten_step_inputs, flatten_weights, unflatten_step_outputs
from ._inputs import check_scalar_loss
from ._window import window_advance, window_inputs, WindowBuffer


class StepLinearisation(eqx.Module):
    """One step of the model, linearised over its window.

    - `y`, `new_state`, `loss`: the step's output, new state pytree and loss.
    - `grads`: the exact gradient of the loss through the window, the anchor state held fixed, for
      every trainable weight leaf (flat, `None` for the others: frozen, not inexact or deferred).
      With `K = 1`: the same-step gradient.
    - `signal`: per group, the learning signal `λ[..., c] = ∂L_t/∂h_anchor[..., c]` (`varshape +
      (S,)`): the history term of the gradient is `λ · ∂h_anchor/∂W`, which the traces estimate.
    - `advanced`: whether the window's first step is a real one (the traces advance over it).
    - `buffer`: the window buffer for the next step (`None` for `K = 1`).
    - `operands`: per ETP equation index, its operands in the window's first step.
    - `d_total`: per group, the blocks `∂h/∂h_prev` of the first step (`varshape + (S, S)`, `[..., s, c]`),
      with ETP outputs held fixed, or of the full step Jacobian (`full_jacobian`).
    - `d_f`: per relation equation index and group index, `∂h/∂y` of the first step (`varshape + (S,)`).
    - `delta`: with `diagonal`, per group, the same-step learning signal `δ = ∂L_t/∂h_t` at the new
      hidden values (`h_{t-1}` held fixed; `varshape + (S,)`); else empty.
    - `d_local`: the blocks `δ` goes back through: with `diagonal`, those of `d_total` with the
      step's other new values held fixed (`δ` of a value already holds the paths through the values
      computed from it, as an LSTM's `δ_c` holds those through `h_t`); else `d_total` itself.
    - `output_cotangents`: per equation index of a deferred weight's `etp_matmul`, the cotangent
      `c = ∂L_t/∂y` at its output, so that the weight's gradient is `Σ xᵀ c` over its equations.
    """

    y: object
    new_state: object
    loss: jax.Array
    grads: list
    signal: tuple
    advanced: jax.Array
    buffer: WindowBuffer | None
    operands: dict
    d_total: tuple
    d_f: dict
    delta: tuple = ()
    d_local: tuple = ()
    output_cotangents: dict = eqx.field(default_factory=dict)


def _group_columns(paths, graph: ETraceGraph) -> list[list[int]]:
    """For each group, the positions of its states among `paths`."""
    index = {p: k for k, p in enumerate(paths)}
    return [[index[p] for p in g.hidden_paths] for g in graph.hidden_groups]


def _blocks(
    jvp: Callable, hidden: list, group: HiddenGroup, cols: list[int], *, position_wise: bool | None = None
) -> jax.Array:
    """Per-position `S×S` blocks of a Jacobian whose JVP is `jvp`, for the states `cols` of `group`.

    A position-wise Jacobian needs one JVP per state (a tangent of ones); otherwise the diagonal
    blocks are read off a JVP per (position, state) pair. `position_wise` defaults to the group's
    own, which holds with ETP outputs held fixed.
    """
    zeros = [jnp.zeros_like(h) for h in hidden]

    def column(c, tangent_c):
        t = list(zeros)
        t[cols[c]] = tangent_c
        out = jvp(t)
        return jnp.stack([out[k] for k in cols], axis=-1)  # varshape + (S,)

    shape, dtype, n = group.varshape, group.dtype, group.num_positions
    if group.position_wise if position_wise is None else position_wise:
        cols_out = [column(c, jnp.ones(shape, dtype)) for c in range(len(cols))]
    else:
        basis = jnp.eye(n, dtype=dtype).reshape((n,) + shape)
        cols_out = []
        for c in range(len(cols)):
            full = jax.vmap(lambda e: column(c, e))(basis)  # (n,) + varshape + (S,)
            diag = jnp.diagonal(full.reshape((n, n, len(cols))), axis1=0, axis2=1)  # (S, n)
            cols_out.append(jnp.moveaxis(diag, 0, -1).reshape(shape + (len(cols),)))
    return jnp.stack(cols_out, axis=-1)  # varshape + (S, S): [..., s, c]


def _select(pred, a, b):
    """`where(pred, a, b)` leaf-wise, `pred` broadcast over the leaves' trailing axes."""
    return jtu.tree_map(
        lambda u, v: jnp.where(pred.reshape(pred.shape + (1,) * (u.ndim - pred.ndim)), u, v), a, b
    )


def matmul_weights(graph: ETraceGraph) -> dict[int, tuple[int, ...]]:
    """The trainable weights used in the step only as the weight `w` of `etp_matmul` equations,
    each with those equations' indices (`module_info.matmul_weights`). Their gradient through one
    step is `Σ xᵀ c` over those equations (`c` the cotangent at the output), which
    `linearise_step(..., defer=...)` can leave to its caller."""
    trainable = trainable_mask(graph)
    return {i: eqns for i, eqns in graph.module_info.matmul_weights.items() if trainable[i]}


def _add_at(at: dict, var, p) -> None:
    """Add the perturbation `p` to `var`'s value, after any hook already at `var`."""
    before = at.get(var, lambda val: val)
    at[var] = lambda val: before(val) + p


def linearise_step(
    graph: ETraceGraph,
    params,
    x,
    state,
    target,
    loss_fn: Callable,
    *,
    buffer=None,
    diagonal: bool = False,
    full_jacobian: bool = False,
    batched: bool = False,
    defer: Collection[int] = (),
) -> StepLinearisation:
    """Linearise step `t` of the compiled model (see [`StepLinearisation`][]).

    - `state`: the hidden state `h_{t-1}`; `buffer`: the [`WindowBuffer`][] of a window `K > 1`
      (`None`: `K = 1`).
    - `diagonal`: carry the learning signal back through the per-position blocks with ETP outputs
      held fixed (plus every path by which the loss reads `h_{t-1}` directly), not exactly.
    - `full_jacobian`: `d_total` (and, with `diagonal`, the blocks the signal goes through) are the
      per-position diagonal blocks of the full step Jacobian, the mixing of ETP operations that read
      `h_{t-1}` included, not those with ETP outputs held fixed. This costs one JVP per (position,
      state) pair of every group.
    - `batched`: `x`, `state`, `target` (and the buffer) carry a leading batch axis; the loss is the
      batch mean and weight gradients contract the batch inside one matmul; every other field
      gains the leading batch axis.
    - `defer`: weights of [`matmul_weights`][] (`K = 1` only) that the VJP holds constant: it gives
      the cotangent at the output of each of their equations instead (`output_cotangents`), from
      which the caller forms their gradient, and `grads` is `None` for them.
    """
    info = graph.module_info
    closed = info.closed_jaxpr
    weights = flatten_weights(graph, params)
    perturb = graph.hidden_perturb
    traced_paths = perturb.hidden_paths if perturb is not None else ()
    pvars = perturb.perturb_vars if perturb is not None else ()
    hidden_index = {p: i for i, p in enumerate(info.hidden_paths)}
    traced = [hidden_index[p] for p in traced_paths]
    defer = sorted(defer)
    eligible = matmul_weights(graph) if defer else {}
    if defer and (buffer is not None or not set(defer) <= set(eligible)):
        raise ValueError(
            f"`defer` must name weights of `matmul_weights(graph)` ({sorted(eligible)}) in a step "
            f"without a window buffer (`K <= 1`), got {defer}"
            + (" with a buffer." if buffer is not None else ".")
        )
    deferred_eqns = sorted(e for i in defer for e in eligible[i])
    deferred_vars = [closed.jaxpr.eqns[e].outvars[0] for e in deferred_eqns]
    # Frozen and deferred weights are constants of the step.
    differentiated = [ok and i not in defer for i, ok in enumerate(trainable_mask(graph))]
    diff_weights = [w for w, ok in zip(weights, differentiated) if ok]

    def merge(dw):
        it = iter(dw)
        return [next(it) if ok else w for w, ok in zip(weights, differentiated)]

    def example(dw, anchor_traced, ps, qs, x, state, buffer, target):
        _, x_leaves, hidden = flatten_step_inputs(graph, params, x, state)
        anchor, inputs, valid = window_inputs(buffer, state, x_leaves)
        if buffer is not None:
            hidden = flatten_step_inputs(graph, params, x, anchor)[2]
        w = merge(dw)
        h = list(hidden)
        for i, v in zip(traced, anchor_traced):
            h[i] = v
        first: dict = {}
        k_last = inputs[0].shape[0] - 1 if inputs else 0
        direct = None
        for k in range(k_last + 1):
            xs_k = [a[k] for a in inputs]
            args = [*w, *xs_k, *h]
            at: dict = {}
            if k == k_last and diagonal:
                # The learning signal `δ` at the new hidden values (perturbations `p`, with `h_{t-1}`
                # held fixed), and, from a second run whose new hidden values are held fixed, what
                # the loss reads of `h_{t-1}` directly; that run adds no gradient to the weights.
                detach = {v: jax.lax.stop_gradient for v in pvars}
                outs = evaluate(closed, [*jax.lax.stop_gradient(w), *xs_k, *h], at_vars=detach)
                direct = _loss(loss_fn, graph, outs, target)
                args = [*w, *xs_k, *hidden]
                for v, p in zip(pvars, ps):
                    _add_at(at, v, p)
            if k == k_last:
                # The deferred weights' same-step gradient, through the cotangents at their outputs.
                for v, q in zip(deferred_vars, qs):
                    _add_at(at, v, q)
            record: dict = {}
            outs = evaluate(
                closed,
                args,
                at_vars=at,
                on_etp=(lambda i, a, o: record.__setitem__(i, (a, o))) if k == 0 else None,
            )
            new_h = outs[info.num_outputs :]
            if k < k_last:  # an empty slot leaves the state as it is
                new_h = _select(valid[k], new_h, h)
            if k == 0:
                first = {
                    "record": record,
                    "xs": xs_k,
                    "hidden": [jax.lax.stop_gradient(a) for a in h],
                    "after": new_h,
                }
            h = new_h
        y, new_state = unflatten_step_outputs(graph, outs)
        loss = _loss(loss_fn, graph, outs, target)
        if direct is not None:
            loss = loss + (direct - jax.lax.stop_gradient(direct))
        if buffer is not None:
            after = unflatten_step_outputs(graph, [*outs[: info.num_outputs], *first["after"]])[1]
            # `after` is the anchor itself where the first slot was empty.
            buffer = window_advance(buffer, inputs, valid, after)
        return loss, (y, new_state, valid[0], buffer, first["record"], first["xs"], first["hidden"])

    if batched:

        def loss_of(dw, anchor_traced, ps, qs):
            losses, aux = jax.vmap(lambda a, p, q, *rest: example(dw, a, p, q, *rest))(
                anchor_traced, ps, qs, x, state, buffer, target
            )
            return jnp.mean(losses), (losses, aux)

        anchor0 = jax.vmap(lambda s, b: _traced_leaves(traced, s if b is None else b.anchor))(state, buffer)
        lead = (jtu.tree_leaves(x)[0].shape[0],)
    else:

        def loss_of(dw, anchor_traced, ps, qs):
            loss, aux = example(dw, anchor_traced, ps, qs, x, state, buffer, target)
            return loss, (loss, aux)

        anchor0 = _traced_leaves(traced, state if buffer is None else buffer.anchor)
        lead = ()

    avals = [info.hidden_avals[i] for i in traced]  # the perturbed new values keep the state's avals
    zeros_p = [jnp.zeros(lead + a.shape, a.dtype) for a in avals] if diagonal else []
    zeros_q = [jnp.zeros(lead + v.aval.shape, v.aval.dtype) for v in deferred_vars]
    _, vjp, (loss, aux) = jax.vjp(loss_of, diff_weights, anchor0, zeros_p, zeros_q, has_aux=True)
    y, new_state, advanced, new_buffer, record, xs0, hidden0 = aux
    g_w, g_h, g_p, g_q = vjp(jnp.ones((), loss.dtype))
    it = iter(g_w)
    grads = [next(it) if ok else None for ok in differentiated]
    operands = {i: a for i, (a, _) in record.items()}
    outputs = {i: o for i, (_, o) in record.items()}

    def jacobians(xs, hidden, outputs):
        return _jacobians(graph, weights, xs, hidden, outputs, diagonal, full_jacobian)

    d_total, d_local, d_f = (jax.vmap(jacobians) if batched else jacobians)(xs0, hidden0, outputs)
    cols = _group_columns(traced_paths, graph)
    signal = tuple(jnp.stack([g_h[k] for k in c], axis=-1) for c in cols)
    delta: tuple = ()
    if diagonal:
        delta = tuple(jnp.stack([g_p[k] for k in c], axis=-1) for c in cols)
        signal = tuple(s + jnp.einsum("...s,...sc->...c", dl, d) for s, dl, d in zip(signal, delta, d_local))
    return StepLinearisation(
        y,
        new_state,
        loss,
        grads,
        signal,
        advanced,
        new_buffer,
        operands,
        d_total,
        d_f,
        delta,
        d_local,
        dict(zip(deferred_eqns, g_q)),
    )


def _loss(loss_fn: Callable, graph: ETraceGraph, outs: list, target) -> jax.Array:
    loss = loss_fn(unflatten_step_outputs(graph, outs)[0], target)
    check_scalar_loss(loss)
    return loss


def _traced_leaves(traced: list[int], state) -> list:
    leaves = jtu.tree_leaves(eqx.filter(state, eqx.is_array))
    return [leaves[i] for i in traced]


def _jacobians(
    graph: ETraceGraph,
    weights: list,
    xs: list,
    hidden: list,
    outputs: dict,
    diagonal: bool,
    full_jacobian: bool = False,
):
    """For one example: the blocks `∂h_t/∂h_{t-1}` (total, and with the step's other new values
    held fixed when `diagonal`) and `∂h_t/∂y` of every relation's operation, all with ETP outputs
    held fixed; with `full_jacobian`, the blocks `∂h_t/∂h_{t-1}` are those of the full step, the
    ETP operations computed from `h_{t-1}` (one JVP per position and state)."""
    info = graph.module_info
    closed = info.closed_jaxpr
    perturb = graph.hidden_perturb
    if perturb is None:
        return (), (), {}
    pvars = perturb.perturb_vars
    hidden_index = {p: i for i, p in enumerate(info.hidden_paths)}
    traced = [hidden_index[p] for p in perturb.hidden_paths]
    cols = _group_columns(perturb.hidden_paths, graph)

    # The cut transition: new hidden values from old ones with every ETP output held fixed.
    def transition(h_traced, ys, detach):
        h = list(hidden)
        for i, v in zip(traced, h_traced):
            h[i] = v
        raw: dict = {}
        at = {}
        if detach:
            at = {
                v: (lambda v: lambda val: (raw.__setitem__(v, val), jax.lax.stop_gradient(val))[1])(v)
                for v in pvars
            }
        outs = evaluate(closed, [*weights, *xs, *h], etp_outputs=ys, at_vars=at)
        new = outs[info.num_outputs :]
        return [raw[v] for v in pvars] if detach else [new[i] for i in traced]

    h0 = [hidden[i] for i in traced]
    fixed = None if full_jacobian else outputs

    # A step that calls a `jax.custom_vjp` function (an ODE solve with Diffrax's default adjoint)
    # has no forward-mode derivative: it is linearised in reverse mode, with the function's own
    # derivative, as `jax.grad` (and BPTT) would. A VJP with a cotangent on state `s` gives the row
    # `[..., s, :]` of the blocks where a JVP gives a column, so the blocks come out transposed.
    reverse = not info.forward_differentiable

    def linear(f, primal):
        if reverse:
            vjp = jax.vjp(f, primal)[1]
            return lambda ct: vjp(ct)[0]
        return jax.linearize(f, primal)[1]

    def blocks(f):
        pw = False if full_jacobian else None
        out = tuple(
            _blocks(linear(f, h0), h0, g, c, position_wise=pw) for g, c in zip(graph.hidden_groups, cols)
        )
        return tuple(jnp.swapaxes(b, -1, -2) for b in out) if reverse else out

    d_total = blocks(lambda h: transition(h, fixed, False))
    d_local = d_total
    # With ETP outputs computed, a new value may also reach another through an ETP operation.
    if diagonal and (perturb.chained or full_jacobian):
        d_local = blocks(lambda h: transition(h, fixed, True))

    d_f: dict = {}
    rel_eqns = sorted({r.eqn_index for r in graph.hidden_param_op_relations})
    if rel_eqns and reverse:
        # `∂h/∂y` is diagonal where a relation holds: one VJP per state gives every relation's.
        vjp_y = linear(lambda ys: transition(h0, {**outputs, **ys}, False), {e: outputs[e] for e in rel_eqns})
        for g, c in zip(graph.hidden_groups, cols):
            per_state = []
            for k in c:
                ct = [jnp.zeros_like(h) for h in h0]
                ct[k] = jnp.ones_like(h0[k])
                per_state.append(vjp_y(ct))
            for e in rel_eqns:
                same = outputs[e].shape == g.varshape
                d_f.setdefault(e, {})[g.index] = jnp.stack(
                    [d[e] if same else jnp.zeros(g.varshape, g.dtype) for d in per_state], axis=-1
                )
    elif rel_eqns:
        jvp_y = linear(lambda ys: transition(h0, {**outputs, **ys}, False), {e: outputs[e] for e in rel_eqns})
        for e in rel_eqns:
            t = {k: jnp.zeros_like(outputs[k]) for k in rel_eqns}
            t[e] = jnp.ones_like(outputs[e])
            out = jvp_y(t)
            d_f[e] = {
                g.index: jnp.stack([out[k] for k in c], axis=-1) for g, c in zip(graph.hidden_groups, cols)
            }
    return d_total, d_local, d_f


def apply_blocks(d: jax.Array, trace: jax.Array) -> jax.Array:
    """`Σ_c d[n, s, c] trace[..., n, c]`: per-position blocks acting on a trace whose trailing axes
    are `varshape + (S,)` (leading axes, e.g. a weight's input axis, are broadcast)."""
    d = jnp.broadcast_to(d, trace.shape[:-1] + d.shape[-2:])
    # Broadcast products, not an einsum (whose reshapes around a size-1 state axis keep XLA from
    # updating a trace in place): element-wise, fused into the update.
    return functools.reduce(operator.add, [d[..., c] * trace[..., c : c + 1] for c in range(trace.shape[-1])])


def advance(lin: StepLinearisation, new, old):
    """`new` where the window's first step was a real one, else `old` (the traces wait)."""
    return _select(lin.advanced, new, old)


def unflatten_grads(params, flat_grads: list):
    """Flat weight gradients (`None` for frozen and non-inexact leaves) in the structure of
    `eqx.filter(params, eqx.is_inexact_array)`."""
    return jtu.tree_unflatten(jtu.tree_structure(eqx.filter(params, eqx.is_array)), flat_grads)


def trainable_part(graph: ETraceGraph, params):
    """The trainable leaves of `params` (the structure of the gradients), `None` elsewhere."""
    weights = flatten_weights(graph, params)
    return unflatten_grads(params, [w if ok else None for w, ok in zip(weights, trainable_mask(graph))])
