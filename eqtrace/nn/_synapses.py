import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._misc import canonical_dtype, check_input, check_positive_float, check_positive_int


class ExpSynapseState(eqx.Module):
    """State of an [`eqtrace.nn.ExpSynapse`][]: the synaptic conductance (current) `g`."""

    g: Float[Array, "*batch size"]


class ExpSynapse(eqx.Module):
    r"""Exponential synapses: a leaky integrator of the incoming drive $x_t$,

    $$g_t = e^{-\Delta t / \tau_{\mathrm{syn}}}\, g_{t-1} + x_t,$$

    whose output current is $g_t$ (`synapse.current(state)`). Feed a neuron with it in the same step
    and the compiler puts `g` in the neuron's hidden group.
    """

    size: int = eqx.field(static=True)
    tau_syn: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(self, size: int, *, tau_syn: float = 5.0, dt: float = 1.0, dtype=None):
        r"""**Arguments:**

        - `size`: number of synapses (usually the number of post-synaptic neurons).
        - `tau_syn`: synaptic time constant $\tau_{\mathrm{syn}} > 0$.
        - `dt`: time step $\Delta t > 0$.
        - `dtype`: floating dtype of the state; JAX's default if `None`.
        """
        check_positive_int(size, "size", "ExpSynapse")
        self.size = size
        self.tau_syn = check_positive_float(tau_syn, "tau_syn", "ExpSynapse")
        self.dt = check_positive_float(dt, "dt", "ExpSynapse")
        self.dtype = canonical_dtype(dtype, "ExpSynapse")

    def __call__(self, x: Float[Array, " size"], state: ExpSynapseState) -> ExpSynapseState:
        """**Arguments:**

        - `x`: the drive at this step (e.g. weighted pre-synaptic spikes), shape `(size,)`.
        - `state`: previous [`eqtrace.nn.ExpSynapseState`][].

        **Returns:**

        The new [`eqtrace.nn.ExpSynapseState`][].
        """
        check_input("ExpSynapse", x, self.size, self.dtype)
        return ExpSynapseState(g=math.exp(-self.dt / self.tau_syn) * state.g + x)

    def current(self, state: ExpSynapseState) -> Float[Array, " size"]:
        """**Returns:**

        The output current $g$.
        """
        return state.g

    def init_state(self) -> ExpSynapseState:
        """**Returns:**

        `ExpSynapseState(g=zeros(size))`.
        """
        return ExpSynapseState(g=jnp.zeros((self.size,), self.dtype))
