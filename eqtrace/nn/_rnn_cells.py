import abc
from collections.abc import Callable
from typing import Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import element_wise
from ._linear import Linear
from ._misc import canonical_dtype, check_input, check_positive_int


def _concat(*arrays: Float[Array, " _"]) -> Float[Array, " _"]:
    return jnp.concatenate(arrays, axis=-1)


def _check_args(cell: "AbstractRNNCell", input_size: int, hidden_size: int, dtype) -> jnp.dtype:
    """Check the arguments that every cell's constructor takes; return the cell's dtype."""
    where = type(cell).__name__
    check_positive_int(input_size, "input_size", where)
    check_positive_int(hidden_size, "hidden_size", where)
    return canonical_dtype(dtype, where)


def _gates(
    n: int, in_features: int, hidden_size: int, use_bias: bool, dtype, key: PRNGKeyArray
) -> list[Linear]:
    """`n` gates, each a `Linear` from its own part of `jax.random.split(key, n)`."""
    return [Linear(in_features, hidden_size, use_bias, dtype=dtype, key=k) for k in jax.random.split(key, n)]


# ---------------------------------------------------------------------------------------------------
# States


class VanillaRNNState(eqx.Module):
    """State of the cells whose state is one hidden vector `h`: [`eqtrace.nn.VanillaRNNCell`][],
    [`eqtrace.nn.GRUCell`][], [`eqtrace.nn.MGUCell`][], [`eqtrace.nn.MinimalRNNCell`][] and
    [`eqtrace.nn.IndRNNCell`][].

    `GRUState`, `MGUState`, `MinimalRNNState` and `IndRNNState` are other names of this class, so
    that the states of these cells share one pytree structure.
    """

    h: Float[Array, "*batch hidden_size"]


GRUState = VanillaRNNState
MGUState = VanillaRNNState
MinimalRNNState = VanillaRNNState
IndRNNState = VanillaRNNState


class LSTMState(eqx.Module):
    """State of a [`eqtrace.nn.LSTMCell`][]: the hidden vector `h` and the cell vector `c`."""

    h: Float[Array, "*batch hidden_size"]
    c: Float[Array, "*batch hidden_size"]


# ---------------------------------------------------------------------------------------------------
# Cells


_State = TypeVar("_State", bound=eqx.Module)


class AbstractRNNCell(eqx.Module, Generic[_State]):
    r"""A stateless recurrent cell: `cell(x, state) -> new_state`, with `cell.init_state()` at zero.

    Cells are unbatched (`x` of shape `(input_size,)`); batch with `jax.vmap` and run over time with
    `jax.lax.scan`. Their trainable weights go through ETP operations, so that
    [`eqtrace.compile_etrace_graph`][] finds them. The state is an [`eqtrace.nn.LSTMState`][] `(h, c)`
    for the LSTM and a [`eqtrace.nn.VanillaRNNState`][] `(h)` for every other cell.

    Every cell is built as `Cell(input_size, hidden_size, *, activation, use_bias=True, dtype=None,
    key)`:

    - `input_size`: size of the input vector.
    - `hidden_size`: size of the hidden vector (and of the LSTM's cell vector).
    - `activation`: the cell's element-wise nonlinearity $\sigma$ (each cell says where it acts).
    - `use_bias`: whether the cell's [`eqtrace.nn.Linear`][] layers have biases.
    - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
    - `key`: a `jax.random` key for the initialisation.
    """

    input_size: eqx.AbstractVar[int]
    hidden_size: eqx.AbstractVar[int]

    @abc.abstractmethod
    def __call__(self, x: Float[Array, " input_size"], state: _State) -> _State:
        """**Arguments:**

        - `x`: input at this step, shape `(input_size,)`, of the cell's dtype.
        - `state`: the state after the previous step.

        **Returns:**

        The state after this step, of the same structure, shapes and dtypes.
        """

    @abc.abstractmethod
    def init_state(self) -> _State:
        """**Returns:**

        The initial state: zeros of shape `(hidden_size,)` in the cell's dtype.
        """

    def _check_input(self, x: Array, dtype) -> None:
        """Host-side check of the input's shape and dtype: the cell computes in its own dtype."""
        check_input(type(self).__name__, x, self.input_size, dtype, owner="cell")


class VanillaRNNCell(AbstractRNNCell[VanillaRNNState]):
    r"""Elman recurrent cell: $h' = \sigma(W [x; h] + b)$, with $\sigma = \tanh$ by default.

    Field `W` is a [`eqtrace.nn.Linear`][] from `input_size + hidden_size` to `hidden_size`.
    """

    W: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = jnp.tanh,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of $h'$."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        self.W = Linear(input_size + hidden_size, hidden_size, use_bias, dtype=dtype, key=key)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        self._check_input(x, self.W.weight.dtype)
        return VanillaRNNState(h=self.activation(self.W(_concat(x, state.h))))

    def init_state(self) -> VanillaRNNState:
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.W.weight.dtype))


ValinaRNNCell = VanillaRNNCell  # braintrace's spelling


class GRUCell(AbstractRNNCell[VanillaRNNState]):
    r"""Gated recurrent unit, each gate its own [`eqtrace.nn.Linear`][] on $[x; h]$:

    $z = \mathrm{sigmoid}(W_z [x; h] + b_z)$, $r = \mathrm{sigmoid}(W_r [x; h] + b_r)$,
    $\tilde h = \sigma(W_h [x; r \odot h] + b_h)$, $h' = (1 - z) \odot h + z \odot \tilde h$.

    Fields `Wz`, `Wr`, `Wh`. The gates are separate matmuls (not one matmul split afterwards), so that
    each weight reaches `h` through element-wise operations only.
    """

    Wz: Linear
    Wr: Linear
    Wh: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = jnp.tanh,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of the candidate $\tilde h$."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        self.Wz, self.Wr, self.Wh = _gates(3, input_size + hidden_size, hidden_size, use_bias, dtype, key)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        self._check_input(x, self.Wz.weight.dtype)
        h = state.h
        xh = _concat(x, h)
        z = jax.nn.sigmoid(self.Wz(xh))
        r = jax.nn.sigmoid(self.Wr(xh))
        cand = self.activation(self.Wh(_concat(x, r * h)))
        return VanillaRNNState(h=(1 - z) * h + z * cand)

    def init_state(self) -> VanillaRNNState:
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.Wz.weight.dtype))


class LSTMCell(AbstractRNNCell[LSTMState]):
    r"""Long short-term memory cell, each gate its own [`eqtrace.nn.Linear`][] on $[x; h]$:

    $i, f, o = \mathrm{sigmoid}(W_{i,f,o} [x; h] + b_{i,f,o})$, $g = \sigma(W_g [x; h] + b_g)$,
    $c' = f \odot c + i \odot g$, $h' = o \odot \sigma(c')$, with $\sigma = \tanh$ by default.

    Fields `Wi`, `Wf`, `Wo`, `Wg`. The forget-gate bias starts at $1$.
    """

    Wi: Linear
    Wf: Linear
    Wo: Linear
    Wg: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = jnp.tanh,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of $g$ and of the output."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        self.Wi, Wf, self.Wo, self.Wg = _gates(4, input_size + hidden_size, hidden_size, use_bias, dtype, key)
        if use_bias:
            Wf = eqx.tree_at(lambda lin: lin.bias, Wf, jnp.ones((hidden_size,), dtype))
        self.Wf = Wf
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: LSTMState) -> LSTMState:
        self._check_input(x, self.Wi.weight.dtype)
        xh = _concat(x, state.h)
        i = jax.nn.sigmoid(self.Wi(xh))
        f = jax.nn.sigmoid(self.Wf(xh))
        o = jax.nn.sigmoid(self.Wo(xh))
        g = self.activation(self.Wg(xh))
        c = f * state.c + i * g
        return LSTMState(h=o * self.activation(c), c=c)

    def init_state(self) -> LSTMState:
        zeros = jnp.zeros((self.hidden_size,), self.Wi.weight.dtype)
        return LSTMState(h=zeros, c=zeros)


class MGUCell(AbstractRNNCell[VanillaRNNState]):
    r"""Minimal gated unit (Zhou et al. 2016), a GRU with one gate:

    $f = \mathrm{sigmoid}(W_f [x; h] + b_f)$, $\tilde h = \sigma(W_h [x; f \odot h] + b_h)$,
    $h' = (1 - f) \odot h + f \odot \tilde h$, with $\sigma = \tanh$ by default.

    Fields `Wf`, `Wh`.
    """

    Wf: Linear
    Wh: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = jnp.tanh,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of the candidate $\tilde h$."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        self.Wf, self.Wh = _gates(2, input_size + hidden_size, hidden_size, use_bias, dtype, key)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        self._check_input(x, self.Wf.weight.dtype)
        h = state.h
        f = jax.nn.sigmoid(self.Wf(_concat(x, h)))
        cand = self.activation(self.Wh(_concat(x, f * h)))
        return VanillaRNNState(h=(1 - f) * h + f * cand)

    def init_state(self) -> VanillaRNNState:
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.Wf.weight.dtype))


class MinimalRNNCell(AbstractRNNCell[VanillaRNNState]):
    r"""Minimal RNN (Chen 2017): the input is encoded, then mixed into $h$ by one gate:

    $z = \sigma(\phi\, x + b_\phi)$, $u = \mathrm{sigmoid}(W_u [x; h] + b_u)$,
    $h' = u \odot h + (1 - u) \odot z$, with $\sigma = \tanh$ by default.

    Fields `phi` (a [`eqtrace.nn.Linear`][] from `input_size` to `hidden_size`) and `Wu`.
    """

    phi: Linear
    Wu: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = jnp.tanh,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of the encoding $z$."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        pkey, ukey = jax.random.split(key)
        self.phi = Linear(input_size, hidden_size, use_bias, dtype=dtype, key=pkey)
        self.Wu = Linear(input_size + hidden_size, hidden_size, use_bias, dtype=dtype, key=ukey)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        self._check_input(x, self.Wu.weight.dtype)
        h = state.h
        z = self.activation(self.phi(x))
        u = jax.nn.sigmoid(self.Wu(_concat(x, h)))
        return VanillaRNNState(h=u * h + (1 - u) * z)

    def init_state(self) -> VanillaRNNState:
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.Wu.weight.dtype))


class IndRNNCell(AbstractRNNCell[VanillaRNNState]):
    r"""Independently recurrent cell (Li et al. 2018): each neuron feeds back only to itself,

    $h' = \sigma(W x + b + u \odot h)$, with $\sigma = \mathrm{relu}$ by default.

    Fields `W` (a [`eqtrace.nn.Linear`][] from `input_size` to `hidden_size`) and `u`, the learnable
    recurrent weights of shape `(hidden_size,)`, tagged by [`eqtrace.element_wise`][] and initialised
    uniformly in $(0, 1)$.
    """

    W: Linear
    u: Float[Array, " hidden_size"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: Callable = jax.nn.relu,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:** as for every [`eqtrace.nn.AbstractRNNCell`][]; `activation` is the $\sigma$
        of $h'$, `jax.nn.relu` by default."""
        dtype = _check_args(self, input_size, hidden_size, dtype)
        wkey, ukey = jax.random.split(key)
        self.W = Linear(input_size, hidden_size, use_bias, dtype=dtype, key=wkey)
        self.u = jax.random.uniform(ukey, (hidden_size,), dtype=dtype, minval=0.0, maxval=1.0)
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        self._check_input(x, self.u.dtype)
        return VanillaRNNState(h=self.activation(self.W(x) + element_wise(self.u) * state.h))

    def init_state(self) -> VanillaRNNState:
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.u.dtype))
