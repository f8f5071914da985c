from collections.abc import Callable

from jaxtyping import Array, Float

from ._checks import check_operand
from ._registry import register_etp_op


def _element_wise_impl(w, *, fn):
    return fn(w)


element_wise_op = register_etp_op(
    "etp_element_wise", _element_wise_impl, has_input=False, position_diagonal=lambda *_: True
)
etp_element_wise_p = element_wise_op.primitive


def element_wise(w: Float[Array, "*shape"], fn: Callable = lambda w: w) -> Float[Array, "*shape"]:
    r"""Tagged per-neuron parameter: returns `fn(w)`, for learnable time constants, thresholds, ...

    `fn` must act element by element (it keeps `w`'s shape), e.g. `lambda w: jnp.exp(-dt / w)` for a
    decay factor from a time constant. The tag makes `w` an online-trainable weight whose trace has
    `w`'s own shape.

    **Arguments:**

    - `w`: the parameter array.
    - `fn`: an element-wise function; the identity by default.

    **Returns:**

    `fn(w)`, of `w`'s shape.
    """
    check_operand("w", w, range(0, 64), "eqtrace.element_wise")
    if not callable(fn):
        raise TypeError(f"`eqtrace.element_wise`: `fn` must be callable, got {type(fn).__name__}.")
    return etp_element_wise_p.bind(w, fn=fn)
