"""What every online algorithm needs from one step, computed once: the loss and its exact
same-step gradient, the learning signal `δ = ∂L_t/∂h_t`, the ETP operations' operands, and the
per-position Jacobian blocks `D = ∂h_t/∂h_{t-1}` (ETP outputs held fixed) and `D_f = ∂h_t/∂y`."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._compiler import ETraceGraph, evaluate, HiddenGroup
from .._compiler._run import flatten_step_inputs, flatten_weights, unflatten_step_outputs


class StepLinearisation(eqx.Module):
    """One step of the model, linearised around the current state.

    - `y`, `new_state`, `loss`: the step's output, new state pytree and loss.
    - `grads`: exact same-step gradient of the loss for every inexact weight leaf (flat, `None`
      for the others): `∂L_t/∂θ` with `h_{t-1}` held fixed.
    - `operands`: per ETP equation index, its operands.
    - `d_total`: per group, the blocks `∂h_t/∂h_{t-1}` (`varshape + (S, S)`, `[..., s, c]`).
    - `signal`: per group, the learning signal `δ = ∂L_t/∂h_t` (read at the perturbation points)
      carried one step back through the group's own dynamics,
      `λ[..., c] = Σ_s δ[..., s] ∂h_t[..., s]/∂h_{t-1}[..., c]`, where the Jacobian holds
      the step's other new hidden values fixed (their paths are already in `δ`): so the gradient's
      history term is `λ · ∂h_{t-1}/∂W`.
    - `d_f`: per relation equation index and group index, `∂h_t/∂y` (`varshape + (S,)`).
    """

    y: object
    new_state: object
    loss: jax.Array
    grads: list
    operands: dict
    d_total: tuple
    signal: tuple
    d_f: dict


def _group_columns(graph: ETraceGraph) -> list[list[int]]:
    """For each group, the positions of its states among the perturbation points."""
    index = {p: k for k, p in enumerate(graph.hidden_perturb.hidden_paths)}
    return [[index[p] for p in g.hidden_paths] for g in graph.hidden_groups]


def _blocks(jvp: Callable, hidden: list, group: HiddenGroup, cols: list[int]) -> jax.Array:
    """Per-position `S×S` blocks of a Jacobian whose JVP is `jvp`, for the states `cols` of `group`.

    A position-wise group needs one JVP per state (a tangent of ones); otherwise the diagonal blocks
    are read off a JVP per (position, state) pair.
    """
    zeros = [jnp.zeros_like(h) for h in hidden]

    def column(c, tangent_c):
        t = list(zeros)
        t[cols[c]] = tangent_c
        out = jvp(t)
        return jnp.stack([out[k] for k in cols], axis=-1)  # varshape + (S,)

    shape, dtype, n = group.varshape, group.dtype, group.num_positions
    if group.position_wise:
        cols_out = [column(c, jnp.ones(shape, dtype)) for c in range(len(cols))]
    else:
        basis = jnp.eye(n, dtype=dtype).reshape((n,) + shape)
        cols_out = []
        for c in range(len(cols)):
            full = jax.vmap(lambda e: column(c, e))(basis)  # (n,) + varshape + (S,)
            diag = jnp.diagonal(full.reshape((n, n, len(cols))), axis1=0, axis2=1)  # (S, n)
            cols_out.append(jnp.moveaxis(diag, 0, -1).reshape(shape + (len(cols),)))
    return jnp.stack(cols_out, axis=-1)  # varshape + (S, S): [..., s, c]


def linearise_step(
    graph: ETraceGraph, params, x, state, target, loss_fn: Callable, *, batched: bool = False
) -> StepLinearisation:
    """Linearise one step of the compiled model (see [`StepLinearisation`][]).

    With `batched`, `x`, `state` and `target` carry a leading batch axis; the loss is the batch
    mean, and the weights' gradients are taken through the whole batch at once (a matmul over the
    batch, not one gradient per example); every other field gains the leading batch axis.
    """
    info = graph.module_info
    closed = info.closed_jaxpr
    weights = flatten_weights(graph, params)
    perturb = graph.hidden_perturb
    pvars = perturb.perturb_vars if perturb is not None else ()
    inexact = [jnp.issubdtype(w.dtype, jnp.inexact) for w in weights]
    diff_weights = [w for w, ok in zip(weights, inexact) if ok]

    def merge(dw):
        it = iter(dw)
        return [next(it) if ok else w for w, ok in zip(weights, inexact)]

    def example(dw, x, state, target, ps):
        _, xs, hidden = flatten_step_inputs(graph, params, x, state)
        record: dict = {}
        at = {v: (lambda p: lambda val: val + p)(p) for v, p in zip(pvars, ps)}
        outs = evaluate(
            closed,
            [*merge(dw), *xs, *hidden],
            at_vars=at,
            on_etp=lambda i, a, o: record.__setitem__(i, (a, o)),
        )
        y, new_state = unflatten_step_outputs(graph, outs)
        loss = loss_fn(y, target)
        if not (isinstance(loss, jax.Array) and loss.shape == ()):
            raise ValueError(
                f"`loss_fn(y, target)` must return a scalar array, got {getattr(loss, 'shape', type(loss))}."
            )
        return loss, (y, new_state, record, xs, hidden)

    lead: tuple[int, ...] = ()
    if batched:
        lead = (jtu.tree_leaves(x)[0].shape[0],)

        def loss_of(dw, ps):
            losses, aux = jax.vmap(lambda *a: example(dw, *a))(x, state, target, ps)
            return jnp.mean(losses), (losses, aux)
    else:

        def loss_of(dw, ps):
            loss, aux = example(dw, x, state, target, ps)
            return loss, (loss, aux)

    zeros_p = [jnp.zeros(lead + v.aval.shape, v.aval.dtype) for v in pvars]
    _, vjp, (loss, (y, new_state, record, xs, hidden)) = jax.vjp(loss_of, diff_weights, zeros_p, has_aux=True)
    g_w, g_p = vjp(jnp.ones((), loss.dtype))
    it = iter(g_w)
    grads = [next(it) if ok else None for ok in inexact]
    operands = {i: a for i, (a, _) in record.items()}
    outputs = {i: o for i, (_, o) in record.items()}

    cols = _group_columns(graph) if perturb is not None else []
    delta = tuple(jnp.stack([g_p[k] for k in c], axis=-1) for c in cols)
    jacobians = lambda xs, hidden, outputs: _jacobians(graph, weights, xs, hidden, outputs)  # noqa: E731
    d_total, d_local, d_f = (jax.vmap(jacobians) if batched else jacobians)(xs, hidden, outputs)
    signal = tuple(jnp.einsum("...s,...sc->...c", dl, d) for dl, d in zip(delta, d_local))
    return StepLinearisation(y, new_state, loss, grads, operands, d_total, signal, d_f)


def _jacobians(graph: ETraceGraph, weights: list, xs: list, hidden: list, outputs: dict):
    """For one example: the blocks `∂h_t/∂h_{t-1}` (total and with the step's other new values held
    fixed) and `∂h_t/∂y` of every relation's operation, all with ETP outputs held fixed."""
    info = graph.module_info
    closed = info.closed_jaxpr
    perturb = graph.hidden_perturb
    if perturb is None:
        return (), (), {}
    pvars = perturb.perturb_vars
    hidden_index = {p: i for i, p in enumerate(info.hidden_paths)}
    traced = [hidden_index[p] for p in perturb.hidden_paths]
    cols = _group_columns(graph)

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
    _, jvp_h = jax.linearize(lambda h: transition(h, outputs, False), h0)
    d_total = tuple(_blocks(jvp_h, h0, g, c) for g, c in zip(graph.hidden_groups, cols))
    if perturb.chained:
        _, jvp_l = jax.linearize(lambda h: transition(h, outputs, True), h0)
        d_local = tuple(_blocks(jvp_l, h0, g, c) for g, c in zip(graph.hidden_groups, cols))
    else:
        d_local = d_total

    d_f: dict = {}
    rel_eqns = sorted({r.eqn_index for r in graph.hidden_param_op_relations})
    if rel_eqns:
        _, jvp_y = jax.linearize(
            lambda ys: transition(h0, {**outputs, **ys}, False), {e: outputs[e] for e in rel_eqns}
        )
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
    return jnp.einsum("...sc,...c->...s", d, trace)


def unflatten_grads(params, flat_grads: list):
    """Flat weight gradients (`None` for non-inexact leaves) in the structure of
    `eqx.filter(params, eqx.is_inexact_array)`."""
    return jtu.tree_unflatten(jtu.tree_structure(eqx.filter(params, eqx.is_array)), flat_grads)
