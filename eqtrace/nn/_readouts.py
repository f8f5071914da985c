import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._linear import Linear
from ._misc import canonical_dtype, check_input, check_positive_float, check_positive_int


class LeakyRateReadoutState(eqx.Module):
    """State of a [`eqtrace.nn.LeakyRateReadout`][]: the leaky output rate `r`."""

    r: Float[Array, "*batch out_size"]


class LeakyRateReadout(eqx.Module):
    r"""A leaky (low-pass filtered) linear readout, as used to read spiking networks:

    $$r_t = \kappa\, r_{t-1} + (1 - \kappa)\,(x_t W + b), \qquad \kappa = e^{-\Delta t / \tau}.$$

    Field `W` is a [`eqtrace.nn.Linear`][]. `readout(x, state) -> new_state`; the output is
    `new_state.r`. Because `r` is a hidden state, `W` is trained through its own eligibility trace.
    """

    W: Linear
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    tau: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        *,
        tau: float = 5.0,
        dt: float = 1.0,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `in_size`: size of the input vector (e.g. the spikes of a layer).
        - `out_size`: size of the output $r$.
        - `tau`: time constant $\tau > 0$ of the low-pass filter.
        - `dt`: time step $\Delta t > 0$.
        - `use_bias`: whether `W` has a bias.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for `W`.
        """
        check_positive_int(in_size, "in_size", "LeakyRateReadout")
        check_positive_int(out_size, "out_size", "LeakyRateReadout")
        self.tau = check_positive_float(tau, "tau", "LeakyRateReadout")
        self.dt = check_positive_float(dt, "dt", "LeakyRateReadout")
        dtype = canonical_dtype(dtype, "LeakyRateReadout")
        self.W = Linear(in_size, out_size, use_bias, dtype=dtype, key=key)
        self.in_size = in_size
        self.out_size = out_size

    def __call__(self, x: Float[Array, " in_size"], state: LeakyRateReadoutState) -> LeakyRateReadoutState:
        """**Arguments:**

        - `x`: input at this step, shape `(in_size,)`.
        - `state`: previous [`eqtrace.nn.LeakyRateReadoutState`][].

        **Returns:**

        The new [`eqtrace.nn.LeakyRateReadoutState`][]; its `r` is the output.
        """
        check_input("LeakyRateReadout", x, self.in_size, self.W.weight.dtype)
        kappa = math.exp(-self.dt / self.tau)
        return LeakyRateReadoutState(r=kappa * state.r + (1 - kappa) * self.W(x))

    def init_state(self) -> LeakyRateReadoutState:
        """**Returns:**

        `LeakyRateReadoutState(r=zeros(out_size))`.
        """
        return LeakyRateReadoutState(r=jnp.zeros((self.out_size,), self.W.weight.dtype))
