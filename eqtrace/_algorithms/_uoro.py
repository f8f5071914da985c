r"""UORO: unbiased online recurrent optimisation, a rank-one random estimate of RTRL.

UORO (Tallec & Ollivier, 2018) keeps RTRL's influence matrix $M_t = \partial h_t / \partial \theta$
(over the $N$ floating-point state entries and the $P$ inexact weight entries, flattened as RTRL
flattens them) as an outer product $\tilde h_t \tilde\theta_t^\top$ whose expectation is $M_t$. Each
step draws independent random signs $\nu \in \{-1, 1\}^N$ and updates
$\tilde h_t = \rho_0 J_{h,t} \tilde h_{t-1} + \rho_1 \nu$,
$\tilde\theta_t = \tilde\theta_{t-1} / \rho_0 + \nu^\top J_{\theta,t} / \rho_1$: the cross terms
are odd in $\nu$ and vanish in expectation, and $\mathbb E[\nu \nu^\top] = I$ gives RTRL's update.
$J_{h,t} \tilde h_{t-1}$ is one JVP of the step and $\nu^\top J_{\theta,t}$ one pullback, with the
loss's own pullback from the same linearisation: the cost per step is a small multiple of the step's,
and the memory is $N + P$ per example.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Inexact, Key

from .._compiler import ETraceGraph
from .._compiler._run import unflatten_step_outputs
from ._rtrl import _layout, flat_step
from ._rule import AbstractOnlineAlgorithm


class UOROTraces(eqx.Module):
    """The state that UORO carries from step to step.

    **Fields:**

    - `state`: the model's hidden state pytree.
    - `h_tilde`: $\\tilde h_t$, shaped `(N,)`: the floating-point state leaves flattened in order.
    - `theta_tilde`: $\\tilde\\theta_t$, shaped `(P,)`: the inexact weight leaves flattened in order.
    - `key`: the `jax.random` key that the next step splits to draw its signs $\\nu$.
    """

    state: object
    h_tilde: Inexact[Array, " hidden"]
    theta_tilde: Inexact[Array, " weights"]
    key: Key[Array, ""]


def _zero_traces(graph: ETraceGraph, params, state, *, seed: int = 0) -> UOROTraces:
    _, _, n, p, dtype = _layout(graph, params)
    return UOROTraces(
        state=state, h_tilde=jnp.zeros(n, dtype), theta_tilde=jnp.zeros(p, dtype), key=jax.random.key(seed)
    )


_zero_traces.__name__ = "UORO().init"  # how `check_traces` names the function that makes traces


class UORO(AbstractOnlineAlgorithm):
    r"""Unbiased online recurrent optimisation (Tallec & Ollivier, 2018): an unbiased, rank-one
    random estimate $\tilde h_t \tilde\theta_t^\top$ of RTRL's influence matrix
    $M_t = \partial h_t / \partial \theta$, for [`eqtrace.online_grad`][] and
    [`eqtrace.batch_grad`][]: `eqtrace.online_grad(..., algorithm=eqtrace.UORO(seed=0))`.

    Each step draws independent random signs $\nu \in \{-1, 1\}^N$ over the $N$ floating-point state
    entries and updates

    $$\tilde h_t = \rho_0 J_{h,t} \tilde h_{t-1} + \rho_1 \nu, \qquad
    \tilde\theta_t = \frac{\tilde\theta_{t-1}}{\rho_0} + \frac{\nu^\top J_{\theta,t}}{\rho_1},$$

    with $J_{h,t} = \partial h_t / \partial h_{t-1}$, $J_{\theta,t} = \partial h_t / \partial\theta
    |_{h_{t-1}}$ and the variance-minimising scales
    $\rho_0 = \sqrt{|\tilde\theta_{t-1}| / (|J_{h,t} \tilde h_{t-1}| + \varepsilon)} + \varepsilon$,
    $\rho_1 = \sqrt{|\nu^\top J_{\theta,t}| / (|\nu| + \varepsilon)} + \varepsilon$. The gradient of
    the step is $\partial L_t / \partial \theta |_{h_{t-1}} + (\lambda_t \cdot \tilde h_{t-1})\,
    \tilde\theta_{t-1}$, $\lambda_t = \partial L_t / \partial h_{t-1}$: its expectation over the signs
    is RTRL's (and BPTT's) gradient, on every model, and at the first step it is exact. Its variance
    grows with the length of the sequence and the size of the model: average over examples, or use
    it where an unbiased estimate matters more than a precise one.

    $J_{h,t} \tilde h_{t-1}$ is one JVP of the step and $\nu^\top J_{\theta,t}$ one pullback, from
    one linearisation that also gives the loss's pullback; no Jacobian is formed. The traces (a
    [`eqtrace.UOROTraces`][]) hold the state, $\tilde h_t$ ($N$ entries), $\tilde\theta_t$ ($P$
    entries) and a `jax.random` key, which each step splits; integer and PRNG-key state leaves are
    carried untraced. Like [`eqtrace.RTRL`][], it reads the step's Jacobians, not the graph's
    relations, and `traces_relation` is `True` for every relation.

    The traces start from the key `jax.random.key(seed)`, so that [`eqtrace.batch_grad`][] gives
    every example of a batch the same sequence of signs. For independent noise per example (or per
    sequence), replace the key of the traces and pass them as `traces=`:
    `eqx.tree_at(lambda t: t.key, rule.init(graph, model, state), key)`. A sequence continued from
    returned traces (`return_traces=True`) continues their key.

    **Fields:**

    - `seed`: the seed of the key the traces start from (default `0`).
    - `eps`: $\varepsilon$, which keeps $\rho_0$, $\rho_1$ finite and non-zero where a norm is zero
      (default `1e-7`).

    **References:**

    C. Tallec and Y. Ollivier, *Unbiased online recurrent optimization*, International Conference
    on Learning Representations, 2018.
    """

    seed: int = eqx.field(static=True, default=0)
    eps: float = eqx.field(static=True, default=1e-7)
    batch_native: ClassVar[bool] = False
    exact: ClassVar[bool] = False

    def __check_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"`eps` must be a number > 0, got {self.eps!r}.")

    def init(self, graph: ETraceGraph, params, state) -> UOROTraces:
        return _zero_traces(graph, params, state, seed=self.seed)

    def step(self, graph, params, traces, x, target, loss_fn, *, batched=False):
        self._check_step(graph, params, traces, batched, UOROTraces, _zero_traces)
        step = flat_step(graph, params, x, traces.state, target, loss_fn)
        if graph.module_info.forward_differentiable:
            (new_h, loss), linear, outs = jax.linearize(step.run, step.w_flat, step.h_flat, has_aux=True)
            pullback = jax.linear_transpose(linear, step.w_flat, step.h_flat)
            j_h = lambda t: linear(jnp.zeros_like(step.w_flat), t)[0]  # noqa: E731
        else:
            # A `jax.custom_vjp` function in the step has no JVP: `J_h` row by row, in reverse mode.
            (new_h, loss), pullback, outs = jax.vjp(step.run, step.w_flat, step.h_flat, has_aux=True)
            zero_loss = jnp.zeros((), loss.dtype)
            rows = jax.vmap(lambda e: pullback((e, zero_loss))[1])(jnp.eye(new_h.size, dtype=new_h.dtype))
            j_h = lambda t: rows @ t  # noqa: E731
        key, sub = jax.random.split(traces.key)
        nu = jax.random.rademacher(sub, new_h.shape, new_h.dtype)
        h_tilde, theta_tilde = traces.h_tilde, traces.theta_tilde
        # The loss's pullback and the signs' pullback, together; J_h h̃ by one JVP.
        ct_h = jnp.stack([jnp.zeros_like(nu), nu])
        ct_loss = jnp.array([1, 0], loss.dtype)
        (d_w, d_h) = jax.vmap(pullback)((ct_h, ct_loss))
        grad = d_w[0] + jnp.dot(d_h[0], h_tilde) * theta_tilde
        nu_j_theta = d_w[1]
        j_h_tilde = j_h(h_tilde)
        norm = jnp.linalg.norm
        rho0 = jnp.sqrt(norm(theta_tilde) / (norm(j_h_tilde) + self.eps)) + self.eps
        rho1 = jnp.sqrt(norm(nu_j_theta) / (norm(nu) + self.eps)) + self.eps
        new_traces_h = rho0 * j_h_tilde + rho1 * nu
        new_traces_theta = theta_tilde / rho0 + nu_j_theta / rho1
        y, new_state = unflatten_step_outputs(graph, outs)
        new = UOROTraces(state=new_state, h_tilde=new_traces_h, theta_tilde=new_traces_theta, key=key)
        return new, y, loss, step.grads(params, grad)

    def traces_relation(self, relation) -> bool:
        return True
