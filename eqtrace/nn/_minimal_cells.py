"""The minimal gated cells of Feng et al. (2024), "Were RNNs all we needed?": gates read the input
only, so each unit's recurrence is its own (diagonal) and D-RTRL is exact."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._linear import Linear
from ._rnn_cells import _check_args, _gates, AbstractRNNCell, VanillaRNNState


def _identity(x):
    return x


class MiniGRUCell(AbstractRNNCell[VanillaRNNState]):
    r"""minGRU (Feng et al., 2024): a GRU whose gate and candidate read the input only,

    $z = \mathrm{sigmoid}(W_z x + b_z)$, $\tilde h = \sigma(W_h x + b_h)$,
    $h' = (1 - z) \odot h + z \odot \tilde h$, with $\sigma$ the identity by default.

    Each unit's recurrence is its own, a diagonal one, so D-RTRL's traces are exact (equal to BPTT)
    for a network of one such layer. Fields `Wz`, `Wh` (each a [`eqtrace.nn.Linear`][] from
    `input_size` to `hidden_size`).
    """

    Wz: Linear
    Wh: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = _identity,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of the candidate $\tilde h$ (the identity by default, as in the paper's sequential form)."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        self.Wz, self.Wh = _gates(2, input_size, hidden_size, use_bias, dtype, key)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        self._check_input(x, self.Wz.weight.dtype)
        z = jax.nn.sigmoid(self.Wz(x))
        return VanillaRNNState(h=(1 - z) * state.h + z * self.activation(self.Wh(x)))

    def init_state(self) -> VanillaRNNState:
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.Wz.weight.dtype))


class MiniLSTMCell(AbstractRNNCell[VanillaRNNState]):
    r"""minLSTM (Feng et al., 2024): an LSTM whose gates read the input only, normalised so that the
    forget and input gates sum to one, and without a separate cell state:

    $f = \mathrm{sigmoid}(W_f x + b_f)$, $i = \mathrm{sigmoid}(W_i x + b_i)$,
    $\tilde h = \sigma(W_h x + b_h)$, $h' = \frac{f}{f + i} \odot h + \frac{i}{f + i} \odot \tilde h$,
    with $\sigma$ the identity by default.

    A diagonal recurrence, so D-RTRL is exact for one such layer. Fields `Wf`, `Wi`, `Wh`.
    """

    Wf: Linear
    Wi: Linear
    Wh: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = _identity,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of the candidate $\tilde h$ (the identity by default)."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        self.Wf, self.Wi, self.Wh = _gates(3, input_size, hidden_size, use_bias, dtype, key)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        self._check_input(x, self.Wf.weight.dtype)
        f = jax.nn.sigmoid(self.Wf(x))
        i = jax.nn.sigmoid(self.Wi(x))
        return VanillaRNNState(h=(f * state.h + i * self.activation(self.Wh(x))) / (f + i))

    def init_state(self) -> VanillaRNNState:
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.Wf.weight.dtype))
