"""The exact window of the online rules: the last `K - 1` inputs and the hidden state before them.

With `window=K`, step `t` back-propagates `L_t` exactly through steps `t-K+1 … t` from the stored
state `h_{t-K}` (the *anchor*), and credits everything before the anchor through the traces, which
therefore run `K - 1` steps behind the model. Memory is `O(K)`, constant in the sequence length.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool

from .._compiler import ETraceGraph


class WindowBuffer(eqx.Module):
    """What a rule with `window=K > 1` keeps besides its traces.

    **Fields:**

    - `anchor`: the hidden state before the window's first step, $h_{t-K}$.
    - `inputs`: the window's inputs before the current one, one array per input leaf of the step,
      each with a leading axis of size `K - 1` (oldest first).
    - `valid`: which of those slots hold a real input (the first `K - 1` steps of a sequence have
      fewer); an empty slot is a step that leaves the state unchanged.
    """

    anchor: object
    inputs: tuple
    valid: Bool[Array, " slots"]


def check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(
            f"`window` must be an integer >= 0 (0: the learning signal through the per-position "
            f"diagonal only; K >= 1: exact back-propagation through the last K steps), got {window!r}."
        )
    return window


def window_init(graph: ETraceGraph, state, window: int) -> WindowBuffer | None:
    """An empty window buffer for `window=K` (`None` when `K <= 1`: the anchor is the state)."""
    if check_window(window) <= 1:
        return None
    avals = graph.module_info.input_avals
    inputs = tuple(jnp.zeros((window - 1,) + a.shape, a.dtype) for a in avals)
    return WindowBuffer(anchor=state, inputs=inputs, valid=jnp.zeros(window - 1, bool))


def window_inputs(buffer: WindowBuffer | None, state, x_leaves: list):
    """The anchor, every input of the window (each leaf with a leading `K` axis, current last),
    and which of them are real."""
    if buffer is None:
        return state, [x[None] for x in x_leaves], jnp.ones(1, bool)
    inputs = [jnp.concatenate([b, x[None]]) for b, x in zip(buffer.inputs, x_leaves)]
    return buffer.anchor, inputs, jnp.concatenate([buffer.valid, jnp.ones(1, bool)])


def window_advance(buffer: WindowBuffer | None, inputs: list, valid, new_anchor) -> WindowBuffer | None:
    """The buffer for the next step: the oldest input leaves the window, and when it was real the
    anchor moves past it."""
    if buffer is None:
        return None
    return WindowBuffer(anchor=new_anchor, inputs=tuple(x[1:] for x in inputs), valid=valid[1:])
