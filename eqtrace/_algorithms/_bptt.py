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
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def total(params):
        m = eqx.combine(params, static)

        def body(s, xt):
            y, s = m(xt[0], s)
            loss = loss_fn(y, xt[1])
            check_scalar_loss(loss)
            return s, loss

        _, losses = jax.lax.scan(body, state, (xs, targets))
        return jnp.sum(losses), losses

    with naming_state_mismatch(model, state):
        grads, losses = jax.grad(total, has_aux=True)(params)
    return grads, losses
