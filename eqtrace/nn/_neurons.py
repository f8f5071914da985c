import abc
import math
from typing import Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._ops import element_wise
from ._misc import canonical_dtype, check_float, check_input, check_positive_float, check_positive_int
from ._surrogates import AbstractSurrogate, SigmoidSurrogate


_State = TypeVar("_State", bound=eqx.Module)


# ---------------------------------------------------------------------------------------------------
# States


class LIFState(eqx.Module):
    """State of a [`eqtrace.nn.LIF`][] neuron population: the membrane potential `V`."""

    V: Float[Array, "*batch size"]


class ALIFState(eqx.Module):
    """State of an [`eqtrace.nn.ALIF`][] population: the membrane potential `V` and the threshold
    adaptation `a`."""

    V: Float[Array, "*batch size"]
    a: Float[Array, "*batch size"]


# ---------------------------------------------------------------------------------------------------
# Neurons


class AbstractNeuron(eqx.Module, Generic[_State]):
    """A stateless population of spiking neurons: `neuron(I, state) -> new_state`, and
    `neuron.spike(state)` for the spikes that a state emits.

    The spikes of step $t$ are `neuron.spike(new_state)`, a function of the new state only. The reset
    that they cause is applied at the start of step $t + 1$, inside `neuron(I, new_state)`, so that
    the state holds no separate spike variable.

    A population has a `size` and a floating `dtype`, those of its inputs and of its state.
    """

    size: eqx.AbstractVar[int]
    dtype: eqx.AbstractVar[jnp.dtype]

    @abc.abstractmethod
    def __call__(self, I: Float[Array, " size"], state: _State) -> _State:  # noqa: E741
        """**Arguments:**

        - `I`: input current at this step, shape `(size,)`, of the neuron's dtype.
        - `state`: the state after the previous step.

        **Returns:**

        The state after this step.
        """

    @abc.abstractmethod
    def spike(self, state: _State) -> Float[Array, " size"]:
        """**Arguments:**

        - `state`: a state of this population.

        **Returns:**

        Its spikes, `0.0` or `1.0` forward, with a surrogate derivative backward.
        """

    @abc.abstractmethod
    def init_state(self) -> _State:
        """**Returns:**

        The resting state: zeros of shape `(size,)` in the neuron's dtype.
        """


class _AbstractLIF(AbstractNeuron[_State]):
    """The leak, reset and integration that `LIF` and `ALIF` share."""

    tau: eqx.AbstractVar[Float[Array, " size"] | None]
    tau_value: eqx.AbstractVar[float]
    v_th: eqx.AbstractVar[float]
    v_reset: eqx.AbstractVar[float]
    reset: eqx.AbstractVar[str]
    detach_reset: eqx.AbstractVar[bool]
    dt: eqx.AbstractVar[float]
    surrogate: eqx.AbstractVar[AbstractSurrogate]

    def _decay(self) -> Float[Array, " size"] | float:
        if self.tau is None:
            return math.exp(-self.dt / self.tau_value)
        dt = self.dt
        return element_wise(self.tau, lambda t: jnp.exp(-dt / t))

    def _integrate(self, I: Array, V: Array, threshold: Array | float) -> tuple[Array, Array]:  # noqa: E741
        """The new potential from the previous `V` and its `threshold` (leak, then the reset by the
        spikes of `V`, then the input `I`, checked here), and those spikes."""
        check_input(type(self).__name__, I, self.size, self.dtype, "I", "neuron")
        s = self.surrogate(V - threshold)
        V = self._decay() * V
        r = jax.lax.stop_gradient(s) if self.detach_reset else s
        V = V - threshold * r if self.reset == "soft" else V * (1 - r) + self.v_reset * r
        return V + I, s


def _init_common(self, size, tau, v_th, v_reset, reset, learn_tau, detach_reset, dt, surrogate, dtype):
    """Check and set the fields that `LIF` and `ALIF` share."""
    where = type(self).__name__
    surrogate = SigmoidSurrogate() if surrogate is None else surrogate
    check_positive_int(size, "size", where)
    self.tau_value = check_positive_float(tau, "tau", where)
    self.dt = check_positive_float(dt, "dt", where)
    self.v_th = check_float(v_th, "v_th", where)
    self.v_reset = check_float(v_reset, "v_reset", where)
    if reset not in ("soft", "hard"):
        raise ValueError(f"`{where}`: `reset` must be 'soft' or 'hard', got {reset!r}.")
    if not isinstance(surrogate, AbstractSurrogate):
        raise TypeError(
            f"`{where}`: `surrogate` must be an `eqtrace.nn.AbstractSurrogate` (e.g. "
            f"`eqtrace.nn.SigmoidSurrogate()`), got {type(surrogate).__name__}."
        )
    dtype = canonical_dtype(dtype, where)
    self.size = size
    self.reset = reset
    self.detach_reset = bool(detach_reset)
    self.surrogate = surrogate
    self.dtype = dtype
    self.tau = jnp.full((size,), self.tau_value, dtype) if learn_tau else None


class LIF(_AbstractLIF[LIFState]):
    r"""Leaky integrate-and-fire neurons, discretised with step $\Delta t$:

    $$V_t = \alpha V_{t-1} + I_t - v_{\mathrm{th}}\, s_{t-1} \quad\text{(soft reset)},$$
    $$V_t = \alpha V_{t-1} (1 - s_{t-1}) + v_{\mathrm{reset}}\, s_{t-1} + I_t \quad\text{(hard reset)},$$

    with $\alpha = e^{-\Delta t / \tau}$ and spikes $s_t = H(V_t - v_{\mathrm{th}})$, $H$ the Heaviside
    step with a surrogate derivative. The spikes of a state are `neuron.spike(state)`; the reset by
    the spikes of step $t-1$ happens inside step $t$. The state is a [`eqtrace.nn.LIFState`][].

    With `learn_tau=True`, field `tau` is a per-neuron array and $\alpha$ is computed through
    [`eqtrace.element_wise`][], so that $\tau$ is trained online; otherwise `tau` is `None` and
    $\alpha$ a constant.
    """

    size: int = eqx.field(static=True)
    tau: Float[Array, " size"] | None
    tau_value: float = eqx.field(static=True)
    v_th: float = eqx.field(static=True)
    v_reset: float = eqx.field(static=True)
    reset: str = eqx.field(static=True)
    detach_reset: bool = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    surrogate: AbstractSurrogate
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        size: int,
        *,
        tau: float = 20.0,
        v_th: float = 1.0,
        v_reset: float = 0.0,
        reset: str = "soft",
        learn_tau: bool = False,
        detach_reset: bool = False,
        dt: float = 1.0,
        surrogate: AbstractSurrogate | None = None,
        dtype=None,
    ):
        r"""**Arguments:**

        - `size`: number of neurons.
        - `tau`: membrane time constant $\tau$ (the initial value if learnt).
        - `v_th`: firing threshold $v_{\mathrm{th}}$.
        - `v_reset`: reset potential of the hard reset.
        - `reset`: `'soft'` (subtract the threshold) or `'hard'` (set to `v_reset`).
        - `learn_tau`: whether $\tau$ is a trainable per-neuron array.
        - `detach_reset`: whether the reset is held fixed under differentiation.
        - `dt`: time step $\Delta t$.
        - `surrogate`: the spike function; `SigmoidSurrogate()` by default.
        - `dtype`: floating dtype of `tau` and of the state; JAX's default if `None`.
        """
        _init_common(self, size, tau, v_th, v_reset, reset, learn_tau, detach_reset, dt, surrogate, dtype)

    def __call__(self, I: Float[Array, " size"], state: LIFState) -> LIFState:  # noqa: E741
        V, _ = self._integrate(I, state.V, self.v_th)
        return LIFState(V=V)

    def spike(self, state: LIFState) -> Float[Array, " size"]:
        return self.surrogate(state.V - self.v_th)

    def init_state(self) -> LIFState:
        return LIFState(V=jnp.zeros((self.size,), self.dtype))


class ALIF(_AbstractLIF[ALIFState]):
    r"""Adaptive leaky integrate-and-fire neurons (Bellec et al., 2018), with an adaptive threshold
    $A_t = v_{\mathrm{th}} + \beta a_t$:

    $$V_t = \alpha V_{t-1} + I_t - A_{t-1}\, s_{t-1} \quad\text{(soft reset)},$$
    $$V_t = \alpha V_{t-1} (1 - s_{t-1}) + v_{\mathrm{reset}}\, s_{t-1} + I_t \quad\text{(hard reset)},$$
    $$a_t = \rho\, a_{t-1} + s_{t-1},$$

    with $\alpha = e^{-\Delta t / \tau}$, $\rho = e^{-\Delta t / \tau_a}$ and spikes
    $s_t = H(V_t - A_t)$. The state is an [`eqtrace.nn.ALIFState`][]: `V` and `a` interact within one
    step, so they form one hidden group.
    """

    size: int = eqx.field(static=True)
    tau: Float[Array, " size"] | None
    tau_value: float = eqx.field(static=True)
    tau_a: float = eqx.field(static=True)
    beta: float = eqx.field(static=True)
    v_th: float = eqx.field(static=True)
    v_reset: float = eqx.field(static=True)
    reset: str = eqx.field(static=True)
    detach_reset: bool = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    surrogate: AbstractSurrogate
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        size: int,
        *,
        tau: float = 20.0,
        tau_a: float = 200.0,
        beta: float = 1.6,
        v_th: float = 1.0,
        v_reset: float = 0.0,
        reset: str = "soft",
        learn_tau: bool = False,
        detach_reset: bool = False,
        dt: float = 1.0,
        surrogate: AbstractSurrogate | None = None,
        dtype=None,
    ):
        r"""**Arguments:**

        - `size`: number of neurons.
        - `tau`: membrane time constant $\tau$ (the initial value if learnt).
        - `tau_a`: adaptation time constant $\tau_a$.
        - `beta`: adaptation strength $\beta$.
        - `v_th`: baseline threshold $v_{\mathrm{th}}$.
        - `v_reset`, `reset`, `learn_tau`, `detach_reset`, `dt`, `surrogate`, `dtype`: as for
          [`eqtrace.nn.LIF`][].
        """
        _init_common(self, size, tau, v_th, v_reset, reset, learn_tau, detach_reset, dt, surrogate, dtype)
        self.tau_a = check_positive_float(tau_a, "tau_a", "ALIF")
        self.beta = check_float(beta, "beta", "ALIF")

    def threshold(self, state: ALIFState) -> Float[Array, " size"]:
        r"""**Returns:**

        The adaptive threshold $A = v_{\mathrm{th}} + \beta a$.
        """
        return self.v_th + self.beta * state.a

    def __call__(self, I: Float[Array, " size"], state: ALIFState) -> ALIFState:  # noqa: E741
        V, s = self._integrate(I, state.V, self.threshold(state))
        return ALIFState(V=V, a=math.exp(-self.dt / self.tau_a) * state.a + s)

    def spike(self, state: ALIFState) -> Float[Array, " size"]:
        return self.surrogate(state.V - self.threshold(state))

    def init_state(self) -> ALIFState:
        z = jnp.zeros((self.size,), self.dtype)
        return ALIFState(V=z, a=z)
