import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._misc import check_positive_float


def _heaviside(v: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return (v > 0).astype(v.dtype)


def _spike_function(name: str, derivative):
    """A spike function `name(v, shape)`: the Heaviside step of `v` forward, and `derivative(v, shape)`
    as its derivative backward.

    It is a `custom_jvp` whose primal body is element-wise (`gt`, `convert_element_type`), so that the
    compiler sees it as position-wise; `shape` is a non-differentiable Python float.
    """

    def spike(v, shape):
        return _heaviside(v)

    spike.__name__ = spike.__qualname__ = name  # as jaxprs show it
    spike = jax.custom_jvp(spike, nondiff_argnums=(1,))

    @spike.defjvp
    def _jvp(shape, primals, tangents):
        (v,), (dv,) = primals, tangents
        return _heaviside(v), dv * derivative(v, shape)

    return spike


def _sigmoid_derivative(v, alpha):
    sg = jax.nn.sigmoid(alpha * v)
    return alpha * sg * (1 - sg)


_sigmoid_spike = _spike_function("_sigmoid_spike", _sigmoid_derivative)
_triangle_spike = _spike_function(
    "_triangle_spike", lambda v, width: jnp.maximum(0.0, 1 - jnp.abs(v) / width) / width
)
_arctan_spike = _spike_function(
    "_arctan_spike", lambda v, alpha: alpha / (2 * (1 + (math.pi / 2 * alpha * v) ** 2))
)


class AbstractSurrogate(eqx.Module):
    r"""A spike function: the Heaviside step $H(v) = [v > 0]$ forward, a smooth surrogate derivative
    backward (a `jax.custom_jvp`).

    Surrogates hold only static configuration (no array leaves), so they are hashable and can sit
    anywhere in a model.
    """

    @abc.abstractmethod
    def __call__(self, v: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """**Arguments:**

        - `v`: the distance to threshold, e.g. $V - v_{\\mathrm{th}}$.

        **Returns:**

        $H(v)$ in `v`'s dtype: `1` where `v > 0`, `0` elsewhere.
        """


class SigmoidSurrogate(AbstractSurrogate):
    r"""Heaviside forward; derivative of a steep sigmoid backward:

    $$\frac{\partial s}{\partial v} = \alpha\, \sigma(\alpha v)\,(1 - \sigma(\alpha v)).$$
    """

    alpha: float = eqx.field(static=True)

    def __init__(self, alpha: float = 4.0):
        """**Arguments:**

        - `alpha`: steepness $\\alpha > 0$; the peak derivative is $\\alpha / 4$ at $v = 0$.
        """
        self.alpha = check_positive_float(alpha, "alpha", "SigmoidSurrogate")

    def __call__(self, v: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _sigmoid_spike(v, self.alpha)


class TriangleSurrogate(AbstractSurrogate):
    r"""Heaviside forward; a triangle (piecewise-linear, "ReLU-grad") derivative backward:

    $$\frac{\partial s}{\partial v} = \frac{\max(0,\, 1 - |v| / w)}{w},$$

    which integrates to one over $[-w, w]$.
    """

    width: float = eqx.field(static=True)

    def __init__(self, width: float = 1.0):
        """**Arguments:**

        - `width`: half-width $w > 0$ of the triangle.
        """
        self.width = check_positive_float(width, "width", "TriangleSurrogate")

    def __call__(self, v: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _triangle_spike(v, self.width)


class ArctanSurrogate(AbstractSurrogate):
    r"""Heaviside forward; the derivative of $\frac{1}{\pi}\arctan(\frac{\pi}{2}\alpha v) + \frac12$
    backward (SpikingJelly's `ATan`, braintrace's `Arctan`):

    $$\frac{\partial s}{\partial v} = \frac{\alpha}{2\,\bigl(1 + (\frac{\pi}{2} \alpha v)^2\bigr)}.$$
    """

    alpha: float = eqx.field(static=True)

    def __init__(self, alpha: float = 2.0):
        """**Arguments:**

        - `alpha`: steepness $\\alpha > 0$; the peak derivative is $\\alpha / 2$ at $v = 0$.
        """
        self.alpha = check_positive_float(alpha, "alpha", "ArctanSurrogate")

    def __call__(self, v: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _arctan_spike(v, self.alpha)
