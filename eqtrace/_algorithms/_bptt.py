from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._compiler._compile import naming_state_mismatch
from ._inputs import check_scalar_loss, check_sequences


def bptt_grad(model, state, xs, targets, loss_fn: Callable):
    r"""Back-propagation through time: `jax.grad` of $\sum_t L_t$ through `jax.lax.scan`.

    The reference for every online algorithm; its memory grows with the sequence length.

    **Arguments:**

    - `model`: `model(x, state) -> (y, new_state)`.
    - `state`: the initial hidden state.
    - `xs`, `targets`: inputs and targets with a leading time axis (arrays or pytrees of arrays).
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar`.

    **Returns:**

    `(grads, losses)`: gradients in the structure of `eqx.filter(model, eqx.is_inexact_array)`,
    and the per-step losses, shape `(T,)`.
    """
    check_sequences(xs, targets)
    return _bptt(model, state, xs, targets, loss_fn, batched=False)


def bptt_grad_of_batch(model, states, xs, targets, loss_fn: Callable):
    """[`eqtrace.bptt_grad`][] of a batch (`xs`, `targets` shaped `(batch, time, ...)`): the gradient
    of the batch-mean loss, the model `jax.vmap`-ed over the batch inside the scan, so that each
    weight gradient contracts the batch in one matmul. Equal to the mean of the per-example
    gradients; `eqtrace.batch_grad(eqtrace.bptt_grad, ...)` calls it."""
    time_major = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (xs, targets))
    return _bptt(model, states, *time_major, loss_fn, batched=True)


def _bptt(model, state, xs, targets, loss_fn: Callable, *, batched: bool):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def total(params):
        m = eqx.combine(params, static)

        def step_loss(x, s, target):
            y, s = m(x, s)
            loss = loss_fn(y, target)
            check_scalar_loss(loss)
            return s, loss

        def body(s, xt):
            if batched:
                s, losses = jax.vmap(step_loss)(xt[0], s, xt[1])
                return s, jnp.mean(losses)
            return step_loss(xt[0], s, xt[1])

        _, losses = jax.lax.scan(body, state, (xs, targets))
        return jnp.sum(losses), losses

    with naming_state_mismatch(model, jax.tree.map(lambda a: a[0], state) if batched else state):
        grads, losses = jax.grad(total, has_aux=True)(params)
    return grads, losses
