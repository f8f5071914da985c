import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._ops import element_wise
from ._misc import canonical_dtype, check_positive_int
from ._surrogates import AbstractSurrogate, SigmoidSurrogate


def _check_positive(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{where}`: `{name}` must be a positive float, got {value!r}.")
    return float(value)


def _check_float(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{where}`: `{name}` must be a float, got {value!r}.")
    return float(value)


def check_current(where: str, x: Array, size: int, dtype, name: str = "x") -> None:
    """Host-side check of an input current's shape and dtype."""
    if x.shape != (size,):
        raise ValueError(
            f"`{where}`: `{name}` must have shape ({size},), got {tuple(x.shape)}; batch with `jax.vmap`."
        )
    if x.dtype != dtype:
        raise TypeError(
            f"`{where}`: `{name}` must have dtype {dtype}, got {x.dtype}; cast it with "
            f"`{name}.astype({dtype})` or build the layer with `dtype={x.dtype}`."
        )


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


class AbstractNeuron(eqx.Module):
    """A stateless population of spiking neurons: `neuron(I, state) -> new_state`, and
    `neuron.spike(state)` for the spikes that a state emits.

    The spikes of step $t$ are `neuron.spike(new_state)`, a function of the new state only. The reset
    that they cause is applied at the start of step $t + 1$, inside `neuron(I, new_state)`, so that
    the state holds no separate spike variable.
    """

    size: eqx.AbstractVar[int]

    @abc.abstractmethod
    def __call__(self, I: Float[Array, " size"], state: eqx.Module) -> eqx.Module:  # noqa: E741
        """**Arguments:**

        - `I`: input current at this step, shape `(size,)`, of the neuron's dtype.
        - `state`: the state after the previous step.

        **Returns:**

        The state after this step.
        """

    @abc.abstractmethod
    def spike(self, state: eqx.Module) -> Float[Array, " size"]:
        """**Arguments:**

        - `state`: a state of this population.

        **Returns:**

        Its spikes, `0.0` or `1.0` forward, with a surrogate derivative backward.
        """

    @abc.abstractmethod
    def init_state(self) -> eqx.Module:
        """**Returns:**

        The resting state: zeros of shape `(size,)` in the neuron's dtype.
        """


def _reset(V, s, v_th, v_reset: float, reset: str, detach_reset: bool):
    """Apply the reset of the previous step's spikes `s` to the leaked potential `V`."""
    if detach_reset:
        s = jax.lax.stop_gradient(s)
    if reset == "soft":
        return V - v_th * s
    return V * (1 - s) + v_reset * s


class _LIFBase(AbstractNeuron):
    size: eqx.AbstractVar[int]
    tau: eqx.AbstractVar[Float[Array, " size"] | None]
    tau_value: eqx.AbstractVar[float]
    dt: eqx.AbstractVar[float]

    def _decay(self) -> Float[Array, " size"] | float:
        if self.tau is None:
            return math.exp(-self.dt / self.tau_value)
        dt = self.dt
        return element_wise(self.tau, lambda t: jnp.exp(-dt / t))


def _init_common(self, where, size, tau, v_th, v_reset, reset, learn_tau, detach_reset, dt, surrogate, dtype):
    check_positive_int(size, "size", where)
    self.tau_value = _check_positive(tau, "tau", where)
    self.dt = _check_positive(dt, "dt", where)
    self.v_th = _check_float(v_th, "v_th", where)
    self.v_reset = _check_float(v_reset, "v_reset", where)
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


class LIF(_LIFBase):
    r"""Leaky integrate-and-fire neurons, discretised with step $\Delta t$:

    $$V_t = \alpha V_{t-1} + I_t - v_{\mathrm{th}}\, s_{t-1} \quad\text{(soft reset)},$$
    $$V_t = \alpha V_{t-1} (1 - s_{t-1}) + v_{\mathrm{reset}}\, s_{t-1} + I_t \quad\text{(hard reset)},$$

    with $\alpha = e^{-\Delta t / \tau}$ and spikes $s_t = H(V_t - v_{\mathrm{th}})$, $H$ the Heaviside
    step with a surrogate derivative. The spikes of a state are `neuron.spike(state)`; the reset by
    the spikes of step $t-1$ happens inside step $t$.

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
        surrogate = SigmoidSurrogate() if surrogate is None else surrogate
        _init_common(
            self, "LIF", size, tau, v_th, v_reset, reset, learn_tau, detach_reset, dt, surrogate, dtype
        )

    def __call__(self, I: Float[Array, " size"], state: LIFState) -> LIFState:  # noqa: E741
        """**Arguments:**

        - `I`: input current, shape `(size,)`.
        - `state`: previous [`eqtrace.nn.LIFState`][].

        **Returns:**

        The new [`eqtrace.nn.LIFState`][].
        """
        check_current("LIF", I, self.size, self.dtype, "I")
        s = self.spike(state)
        V = _reset(self._decay() * state.V, s, self.v_th, self.v_reset, self.reset, self.detach_reset)
        return LIFState(V=V + I)

    def spike(self, state: LIFState) -> Float[Array, " size"]:
        r"""**Returns:**

        $s = H(V - v_{\mathrm{th}})$ with the surrogate derivative.
        """
        return self.surrogate(state.V - self.v_th)

    def init_state(self) -> LIFState:
        """**Returns:**

        `LIFState(V=zeros(size))`.
        """
        return LIFState(V=jnp.zeros((self.size,), self.dtype))


class ALIF(_LIFBase):
    r"""Adaptive leaky integrate-and-fire neurons (Bellec et al., 2018), with an adaptive threshold
    $A_t = v_{\mathrm{th}} + \beta a_t$:

    $$V_t = \alpha V_{t-1} + I_t - A_{t-1}\, s_{t-1} \quad\text{(soft reset)},$$
    $$V_t = \alpha V_{t-1} (1 - s_{t-1}) + v_{\mathrm{reset}}\, s_{t-1} + I_t \quad\text{(hard reset)},$$
    $$a_t = \rho\, a_{t-1} + s_{t-1},$$

    with $\alpha = e^{-\Delta t / \tau}$, $\rho = e^{-\Delta t / \tau_a}$ and spikes
    $s_t = H(V_t - A_t)$. `V` and `a` interact within one step, so they form one hidden group.
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
        surrogate = SigmoidSurrogate() if surrogate is None else surrogate
        _init_common(
            self, "ALIF", size, tau, v_th, v_reset, reset, learn_tau, detach_reset, dt, surrogate, dtype
        )
        self.tau_a = _check_positive(tau_a, "tau_a", "ALIF")
        self.beta = _check_float(beta, "beta", "ALIF")

    def threshold(self, state: ALIFState) -> Float[Array, " size"]:
        r"""**Returns:**

        The adaptive threshold $A = v_{\mathrm{th}} + \beta a$.
        """
        return self.v_th + self.beta * state.a

    def __call__(self, I: Float[Array, " size"], state: ALIFState) -> ALIFState:  # noqa: E741
        """**Arguments:**

        - `I`: input current, shape `(size,)`.
        - `state`: previous [`eqtrace.nn.ALIFState`][].

        **Returns:**

        The new [`eqtrace.nn.ALIFState`][].
        """
        check_current("ALIF", I, self.size, self.dtype, "I")
        s = self.spike(state)
        V = _reset(
            self._decay() * state.V, s, self.threshold(state), self.v_reset, self.reset, self.detach_reset
        )
        a = math.exp(-self.dt / self.tau_a) * state.a + s
        return ALIFState(V=V + I, a=a)

    def spike(self, state: ALIFState) -> Float[Array, " size"]:
        r"""**Returns:**

        $s = H(V - v_{\mathrm{th}} - \beta a)$ with the surrogate derivative.
        """
        return self.surrogate(state.V - self.threshold(state))

    def init_state(self) -> ALIFState:
        """**Returns:**

        `ALIFState(V=zeros(size), a=zeros(size))`.
        """
        z = jnp.zeros((self.size,), self.dtype)
        return ALIFState(V=z, a=z)
