import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._linear import Linear
from ._misc import canonical_dtype, check_input, check_positive_int
from ._neurons import AbstractNeuron, ALIF, LIF


def _make_neuron(neuron, hidden_size: int, dtype, where: str) -> AbstractNeuron:
    if isinstance(neuron, str):
        if neuron == "lif":
            return LIF(hidden_size, dtype=dtype)
        if neuron == "alif":
            return ALIF(hidden_size, dtype=dtype)
        raise ValueError(f"`{where}`: `neuron` must be 'lif', 'alif' or a neuron instance, got {neuron!r}.")
    if not isinstance(neuron, AbstractNeuron):
        raise TypeError(
            f"`{where}`: `neuron` must be 'lif', 'alif' or an `eqtrace.nn.AbstractNeuron`, got "
            f"{type(neuron).__name__}."
        )
    if neuron.size != hidden_size:
        raise ValueError(
            f"`{where}`: the neuron has size {neuron.size} but `hidden_size` is {hidden_size}; build it "
            f"with size {hidden_size}."
        )
    if neuron.dtype != dtype:
        raise TypeError(f"`{where}`: the neuron has dtype {neuron.dtype} but the layer's dtype is {dtype}.")
    return neuron


class AbstractSpikingLayer(eqx.Module):
    """Spiking neurons driven by a [`eqtrace.nn.Linear`][] map `W`: `layer(x, state) -> new_state`,
    the state being the neuron's; `layer.spike(state)` gives the spikes."""

    W: Linear
    neuron: AbstractNeuron
    in_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    recurrent: eqx.AbstractClassVar[bool]

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        *,
        neuron: str | AbstractNeuron = "lif",
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_size`: size of the input vector.
        - `hidden_size`: number of neurons.
        - `neuron`: `'lif'`, `'alif'` (with default parameters) or a neuron instance of size
          `hidden_size`, e.g. `eqtrace.nn.LIF(hidden_size, reset="hard")`.
        - `use_bias`: whether `W` has a bias.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for `W`.
        """
        where = type(self).__name__
        check_positive_int(in_size, "in_size", where)
        check_positive_int(hidden_size, "hidden_size", where)
        dtype = canonical_dtype(dtype, where)
        self.neuron = _make_neuron(neuron, hidden_size, dtype, where)
        n_w = in_size + hidden_size if self.recurrent else in_size
        self.W = Linear(n_w, hidden_size, use_bias, dtype=dtype, key=key)
        self.in_size = in_size
        self.hidden_size = hidden_size

    def __call__(self, x: Float[Array, " in_size"], state: eqx.Module) -> eqx.Module:
        """**Arguments:**

        - `x`: input, shape `(in_size,)`.
        - `state`: the neuron's previous state.

        **Returns:**

        The neuron's new state.
        """
        check_input(type(self).__name__, x, self.in_size, self.W.weight.dtype)
        if self.recurrent:
            x = jnp.concatenate([x, self.neuron.spike(state)], axis=-1)
        return self.neuron(self.W(x), state)

    def spike(self, state: eqx.Module) -> Float[Array, " hidden_size"]:
        """**Returns:**

        The spikes of `state`.
        """
        return self.neuron.spike(state)

    def init_state(self) -> eqx.Module:
        """**Returns:**

        The neuron's resting state.
        """
        return self.neuron.init_state()


class FeedForwardSpikingLayer(AbstractSpikingLayer):
    r"""Spiking neurons driven by a dense map of the input: $V_t = f(V_{t-1}, x_t W + b)$.

    Fields `W` (a [`eqtrace.nn.Linear`][] from `in_size` to `hidden_size`) and `neuron`.
    """

    recurrent = False
    __init__ = AbstractSpikingLayer.__init__  # inherited anyway (Equinox); named for type checkers


class RecurrentSpikingLayer(AbstractSpikingLayer):
    r"""Recurrently connected spiking neurons:

    $$V_t = f\bigl(V_{t-1},\, [x_t;\, s_{t-1}]\, W + b\bigr), \qquad s_{t-1} = \mathrm{spike}(V_{t-1}),$$

    with `W` a [`eqtrace.nn.Linear`][] from `in_size + hidden_size` to `hidden_size` and $f$ the
    neuron's update. The state is the neuron's; the previous spikes are recomputed from it.
    """

    recurrent = True
    __init__ = AbstractSpikingLayer.__init__
