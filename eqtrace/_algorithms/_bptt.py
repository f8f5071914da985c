from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._compiler._compile import naming_state_mismatch
from .._compiler._freeze import frozen_paths, trainable_spec
from ._inputs import check_scalar_loss, check_sequences


def bptt_grad(
    model: PyTree,
    state: PyTree,
    xs: PyTree,
    targets: PyTree,
    loss_fn: Callable,
    *,
    filter_spec: PyTree = eqx.is_inexact_array,
) -> tuple[PyTree, Float[Array, " time"]]:
    r"""Back-propagation through time: `jax.grad` of $\sum_t L_t$ through `jax.lax.scan`.

    The reference for every online algorithm; its memory grows with the sequence length.

    **Arguments:**

    - `model`: `model(x, state) -> (y, new_state)`.
    - `state`: the initial hidden state.
    - `xs`, `targets`: inputs and targets with a leading time axis (arrays or pytrees of arrays).
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar`.
    - `filter_spec`: which leaves are trained, as for `eqx.partition(model, filter_spec)`; the
      others get a `None` gradient, as `eqx.filter_grad` gives. Default: every inexact array.

    **Returns:**

    `(grads, losses)`: gradients in the structure of `eqx.filter(model, eqx.is_inexact_array)`
    (`None` at frozen leaves), and the per-step losses, shape `(T,)`.
    """
    check_sequences(xs, targets)
    return _bptt(model, state, xs, targets, loss_fn, batched=False, filter_spec=filter_spec)


def bptt_grad_of_batch(model, states, xs, targets, loss_fn: Callable, *, filter_spec=eqx.is_inexact_array):
    """[`eqtrace.bptt_grad`][] of a batch (`xs`, `targets` shaped `(batch, time, ...)`): the gradient
    of the batch-mean loss, the model `jax.vmap`-ed over the batch inside the scan, so that each
    weight gradient contracts the batch in one matmul. Equal to the mean of the per-example
    gradients; `eqtrace.batch_grad(eqtrace.bptt_grad, ...)` calls it."""
    xs, targets = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (xs, targets))
    return _bptt(model, states, xs, targets, loss_fn, batched=True, filter_spec=filter_spec)


def _bptt(model, state, xs, targets, loss_fn: Callable, *, batched: bool, filter_spec):
    params, static = eqx.partition(model, trainable_spec(model, frozen_paths(model, filter_spec)))

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
