r"""RTRL: real-time recurrent learning, exact, with the full influence matrix.

The influence matrix $M_t = \partial h_t / \partial \theta$ (Williams & Zipser, 1989) relates every
floating-point leaf of the hidden state, flattened to $N$ entries, to every trainable weight,
flattened to $P$ entries. One step updates it with the full Jacobians of the step,
$M_t = J_{h,t} M_{t-1} + J_{\theta,t}$, where $J_{h,t} = \partial h_t / \partial h_{t-1}$ and
$J_{\theta,t} = \partial h_t / \partial \theta |_{h_{t-1}}$, and credits the loss of the step with
$\nabla_\theta L_t = \partial L_t / \partial \theta |_{h_{t-1}} + (\partial L_t / \partial h_{t-1})
\, M_{t-1}$. Nothing is dropped: the gradient equals BPTT's, step by step, on every model. The cost
is $N \cdot P$ memory per example and $N$ backward passes of the step per step.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Inexact

from .._compiler import ETraceGraph, evaluate
from .._compiler._freeze import trainable_mask
from .._compiler._run import flatten_step_inputs, flatten_weights, unflatten_step_outputs
from ._inputs import check_scalar_loss
from ._one_step import unflatten_grads
from ._rule import AbstractOnlineAlgorithm


class RTRLTraces(eqx.Module):
    """The state that RTRL carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `influence`: $M_t = \\partial h_t / \\partial \\theta$, shaped `(N, P)`: the floating-point
      state leaves flattened in order (rows) against the inexact weight leaves flattened in order
      (columns).
    """

    state: object
    influence: Inexact[Array, "hidden weights"]


def _inexact(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _layout(graph: ETraceGraph, params):
    """The trainable weight leaves (indices, shapes), the inexact state leaves (the same), and the
    dtype the influence matrix is kept in."""
    weights = flatten_weights(graph, params)
    w_index = [i for i, ok in enumerate(trainable_mask(graph)) if ok]
    avals = graph.module_info.hidden_avals
    h_index = [i for i, a in enumerate(avals) if _inexact(a.dtype)]
    dtypes = [weights[i].dtype for i in w_index] + [avals[i].dtype for i in h_index]
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)
    num_weights = sum(weights[i].size for i in w_index)
    num_hidden = sum(avals[i].size for i in h_index)
    return w_index, h_index, num_hidden, num_weights, dtype


def _zero_traces(graph: ETraceGraph, params, state) -> RTRLTraces:
    _, _, n, p, dtype = _layout(graph, params)
    return RTRLTraces(state=state, influence=jnp.zeros((n, p), dtype))


_zero_traces.__name__ = "RTRL().init"  # how `check_traces` names the function that makes traces


def _ravel(leaves: list, index: list[int], dtype) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaves[i]).astype(dtype) for i in index] + [jnp.zeros(0, dtype)])


def _unravel(flat: jax.Array, like: list, index: list[int]) -> list:
    """`like` with the leaves at `index` replaced by consecutive pieces of `flat`."""
    out, start = list(like), 0
    for i in index:
        out[i] = flat[start : start + like[i].size].reshape(like[i].shape).astype(like[i].dtype)
        start += like[i].size
    return out


class FlatStep(eqx.Module):
    """One step as a function of the flattened inexact weights and state, for the rules that keep
    the influence matrix (or an estimate of it) over all of them.

    - `run(w_flat, h_flat) -> ((new_h_flat, loss), outs)`: the step, its outputs as an auxiliary.
    - `w_flat`, `h_flat`: the current point.
    """

    run: Callable
    w_flat: jax.Array
    h_flat: jax.Array
    weights: list
    w_index: list

    def grads(self, params, grad_flat: jax.Array):
        """A flat gradient in the structure of `eqx.filter(params, eqx.is_inexact_array)`."""
        grads = _unravel(grad_flat, self.weights, self.w_index)
        return unflatten_grads(params, [g if i in self.w_index else None for i, g in enumerate(grads)])


def flat_step(graph: ETraceGraph, params, x, state, target, loss_fn: Callable) -> FlatStep:
    info = graph.module_info
    weights, x_leaves, hidden = flatten_step_inputs(graph, params, x, state)
    w_index, h_index, _, _, dtype = _layout(graph, params)

    def run(w_flat, h_flat):
        w, h = _unravel(w_flat, weights, w_index), _unravel(h_flat, hidden, h_index)
        outs = evaluate(info.closed_jaxpr, [*w, *x_leaves, *h])
        loss = loss_fn(unflatten_step_outputs(graph, outs)[0], target)
        check_scalar_loss(loss)
        return (_ravel(outs[info.num_outputs :], h_index, dtype), loss), outs

    return FlatStep(run, _ravel(weights, w_index, dtype), _ravel(hidden, h_index, dtype), weights, w_index)


class RTRL(AbstractOnlineAlgorithm):
    """Real-time recurrent learning (Williams & Zipser, 1989): the exact online gradient, through
    the full influence matrix $M_t = \\partial h_t / \\partial \\theta$ of every floating-point state
    leaf ($N$ entries in all) with respect to every trainable leaf ($P$ entries).
    `eqtrace.online_grad(..., algorithm=eqtrace.RTRL())` equals [`eqtrace.bptt_grad`][] on any model,
    with memory constant in the sequence length but $N \\cdot P$ per example.

    It reads the step's full Jacobians, not the graph's relations: every weight, tagged or not, is
    credited exactly, and `traces_relation` is `True` for every relation. Its traces hold the state
    and the `(N, P)` matrix `influence`; integer and PRNG-key state leaves are carried untraced.

    Use it as the exact reference for small models; for larger ones, [`eqtrace.DRTRL`][] and
    [`eqtrace.ESDRTRL`][] keep the diagonal of $M_t$ or a factorisation of it.

    **Fields:**

    - `max_size`: the largest influence matrix, in entries ($N \\cdot P$), that `init` accepts
      (default $10^7$); `None` for no limit.

    **References:**

    R. J. Williams and D. Zipser, *A learning algorithm for continually running fully recurrent
    neural networks*, Neural Computation 1(2), 1989.
    """

    max_size: int | None = eqx.field(static=True, default=10**7)
    batch_native: ClassVar[bool] = False
    exact: ClassVar[bool] = True

    def __check_init__(self):
        if self.max_size is not None and (
            isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size < 0
        ):
            raise ValueError(f"`max_size` must be an integer >= 0 or `None`, got {self.max_size!r}.")

    def init(self, graph: ETraceGraph, params, state) -> RTRLTraces:
        _, _, n, p, _ = _layout(graph, params)
        if self.max_size is not None and n * p > self.max_size:
            raise ValueError(
                f"RTRL's influence matrix for this model has {n} state entries x {p} weight entries "
                f"= {n * p} entries per example, above `max_size={self.max_size}`. Use a cheaper rule "
                "(`eqtrace.DRTRL()`, `eqtrace.ESDRTRL()`), or raise the limit with "
                "`eqtrace.RTRL(max_size=...)` (`None`: no limit)."
            )
        return _zero_traces(graph, params, state)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, RTRLTraces, _zero_traces)
        step = flat_step(graph, params, x, traces.state, target, loss_fn)
        (new_h, loss), pullback, outs = jax.vjp(step.run, step.w_flat, step.h_flat, has_aux=True)
        # One pullback per row of the step's Jacobian, and one for the loss.
        n = new_h.size
        eye = jnp.eye(n + 1, n, dtype=new_h.dtype)
        ct_loss = (jnp.arange(n + 1) == n).astype(loss.dtype)
        d_w, d_h = jax.vmap(pullback)((eye, ct_loss))
        j_theta, j_h = d_w[:n], d_h[:n]  # (N, P), (N, N)
        grad = d_w[n] + d_h[n] @ traces.influence
        influence = j_h @ traces.influence + j_theta
        y, new_state = unflatten_step_outputs(graph, outs)
        return RTRLTraces(state=new_state, influence=influence), y, loss, step.grads(params, grad)

    def traces_relation(self, relation) -> bool:
        return True
