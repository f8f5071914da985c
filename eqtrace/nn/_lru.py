import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import element_wise, matmul
from ._misc import canonical_dtype, check_input, check_positive_float, check_positive_int


class LRUState(eqx.Module):
    """State of an [`eqtrace.nn.LRU`][]: the real and imaginary parts of its complex hidden vector."""

    re: Float[Array, "*batch hidden_size"]
    im: Float[Array, "*batch hidden_size"]


def _modulus(nu_log):
    return jnp.exp(-jnp.exp(nu_log))


class LRU(eqx.Module):
    r"""Linear recurrent unit (Orvieto et al., 2023): a complex diagonal linear recurrence,

    $h' = \lambda \odot h + \gamma \odot (B x)$, read out by $y = \mathrm{Re}(C h) + D x$, with
    eigenvalues $\lambda = \exp(-e^{\nu} + i\, e^{\theta})$ inside the unit disc and the normalisation
    $\gamma = \sqrt{1 - |\lambda|^2}$.

    Complex numbers are kept as pairs of real arrays (`B_re`, `B_im`; the state's `re`, `im`): each
    unit is one position holding two states, coupled by the rotation $\lambda$. The recurrence is
    diagonal, so D-RTRL's traces are exact, as Zucchet et al. (2023) show for online learning of
    such units: for one LRU layer read out at each step, D-RTRL equals BPTT. $\nu$ and $\theta$ are
    traced through [`eqtrace.element_wise`][], $B$ through [`eqtrace.matmul`][]; $C$ and $D$ are
    the read-out's (same-step gradients, exact).

    `lru(x, state)` advances the state; `lru.output(x, state)` reads it out.
    """

    nu_log: Float[Array, " hidden_size"]
    theta_log: Float[Array, " hidden_size"]
    B_re: Float[Array, "input_size hidden_size"]
    B_im: Float[Array, "input_size hidden_size"]
    C_re: Float[Array, "hidden_size output_size"]
    C_im: Float[Array, "hidden_size output_size"]
    D: Float[Array, "input_size output_size"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    output_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int | None = None,
        *,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * math.pi,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `input_size`, `hidden_size`: the input's size and the number of complex units.
        - `output_size`: the read-out's size; `input_size` if `None`.
        - `r_min`, `r_max`: the eigenvalues' moduli are drawn uniformly on the ring
          $r_{\min} \le |\lambda| \le r_{\max}$, $0 \le r_{\min} < r_{\max} \le 1$.
        - `max_phase`: their phases uniformly in $[0, \text{max\_phase}]$.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key.
        """
        where = "LRU"
        check_positive_int(input_size, "input_size", where)
        check_positive_int(hidden_size, "hidden_size", where)
        output_size = (
            input_size if output_size is None else check_positive_int(output_size, "output_size", where)
        )
        if not (
            isinstance(r_min, (int, float)) and isinstance(r_max, (int, float)) and 0 <= r_min < r_max <= 1
        ):
            raise ValueError(
                f"`{where}`: need 0 <= `r_min` < `r_max` <= 1, got r_min={r_min!r}, r_max={r_max!r}."
            )
        check_positive_float(max_phase, "max_phase", where)
        dtype = canonical_dtype(dtype, where)
        k = jax.random.split(key, 7)
        u1 = jax.random.uniform(k[0], (hidden_size,), dtype)
        u2 = jax.random.uniform(k[1], (hidden_size,), dtype)
        self.nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        self.theta_log = jnp.log(max_phase * u2)
        b_scale = 1 / math.sqrt(2 * input_size)
        self.B_re = b_scale * jax.random.normal(k[2], (input_size, hidden_size), dtype)
        self.B_im = b_scale * jax.random.normal(k[3], (input_size, hidden_size), dtype)
        c_scale = 1 / math.sqrt(hidden_size)
        self.C_re = c_scale * jax.random.normal(k[4], (hidden_size, output_size), dtype)
        self.C_im = c_scale * jax.random.normal(k[5], (hidden_size, output_size), dtype)
        self.D = jax.random.normal(k[6], (input_size, output_size), dtype) / math.sqrt(input_size)
        self.input_size, self.hidden_size, self.output_size = input_size, hidden_size, output_size

    def __call__(self, x: Float[Array, " input_size"], state: LRUState) -> LRUState:
        """**Arguments:**

        - `x`: input at this step, shape `(input_size,)`, of the layer's dtype.
        - `state`: the [`eqtrace.nn.LRUState`][] after the previous step.

        **Returns:**

        The state after this step.
        """
        check_input("LRU", x, self.input_size, self.B_re.dtype)
        r = element_wise(self.nu_log, _modulus)
        phase = element_wise(self.theta_log, jnp.exp)
        lam_re, lam_im = r * jnp.cos(phase), r * jnp.sin(phase)
        gamma = jnp.sqrt(1 - r**2)
        u_re, u_im = matmul(x, self.B_re), matmul(x, self.B_im)
        return LRUState(
            re=lam_re * state.re - lam_im * state.im + gamma * u_re,
            im=lam_re * state.im + lam_im * state.re + gamma * u_im,
        )

    def output(self, x: Float[Array, " input_size"], state: LRUState) -> Float[Array, " output_size"]:
        r"""**Arguments:**

        - `x`: the step's input; `state`: the state after the step.

        **Returns:**

        $y = \mathrm{Re}(C h) + D x$, shape `(output_size,)`.
        """
        return matmul(state.re, self.C_re) - matmul(state.im, self.C_im) + matmul(x, self.D)

    def init_state(self) -> LRUState:
        """**Returns:**

        The zero state.
        """
        zeros = jnp.zeros((self.hidden_size,), self.B_re.dtype)
        return LRUState(re=zeros, im=zeros)
