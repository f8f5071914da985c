import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._ops import element_wise
from ._linear import Linear
from ._misc import canonical_dtype, check_positive_int


def _concat(*arrays: Float[Array, " _"]) -> Float[Array, " _"]:
    return jnp.concatenate(arrays, axis=-1)


def _check_input(cell: "AbstractRNNCell", x: Array, dtype) -> None:
    """Host-side check of the input's shape and dtype: the cell computes in its own dtype."""
    where = type(cell).__name__
    if x.shape != (cell.input_size,):
        raise ValueError(
            f"`{where}`: `x` must have shape ({cell.input_size},), got {tuple(x.shape)}; "
            "batch with `jax.vmap`."
        )
    if x.dtype != dtype:
        raise TypeError(
            f"`{where}`: `x` must have the cell's dtype {dtype}, got {x.dtype}; cast it with "
            f"`x.astype({dtype})` or build the cell with `dtype={x.dtype}`."
        )


def _check_sizes(where: str, input_size: int, hidden_size: int) -> None:
    check_positive_int(input_size, "input_size", where)
    check_positive_int(hidden_size, "hidden_size", where)


# ---------------------------------------------------------------------------------------------------
# States


class VanillaRNNState(eqx.Module):
    """State of a [`eqtrace.nn.VanillaRNNCell`][]: the hidden vector `h`."""

    h: Float[Array, "*batch hidden_size"]


class GRUState(eqx.Module):
    """State of a [`eqtrace.nn.GRUCell`][]: the hidden vector `h`."""

    h: Float[Array, "*batch hidden_size"]


class LSTMState(eqx.Module):
    """State of a [`eqtrace.nn.LSTMCell`][]: the hidden vector `h` and the cell vector `c`."""

    h: Float[Array, "*batch hidden_size"]
    c: Float[Array, "*batch hidden_size"]


class MGUState(eqx.Module):
    """State of a [`eqtrace.nn.MGUCell`][]: the hidden vector `h`."""

    h: Float[Array, "*batch hidden_size"]


class MinimalRNNState(eqx.Module):
    """State of a [`eqtrace.nn.MinimalRNNCell`][]: the hidden vector `h`."""

    h: Float[Array, "*batch hidden_size"]


class IndRNNState(eqx.Module):
    """State of a [`eqtrace.nn.IndRNNCell`][]: the hidden vector `h`."""

    h: Float[Array, "*batch hidden_size"]


# ---------------------------------------------------------------------------------------------------
# Cells


class AbstractRNNCell(eqx.Module):
    """A stateless recurrent cell: `cell(x, state) -> new_state`, with `cell.init_state()` at zero.

    Cells are unbatched (`x` of shape `(input_size,)`); batch with `jax.vmap` and run over time with
    `jax.lax.scan`. Their trainable weights go through ETP operations, so that
    [`eqtrace.compile_etrace_graph`][] finds them.
    """

    input_size: eqx.AbstractVar[int]
    hidden_size: eqx.AbstractVar[int]

    @abc.abstractmethod
    def __call__(self, x: Float[Array, " input_size"], state: eqx.Module) -> eqx.Module:
        """**Arguments:**

        - `x`: input at this step, shape `(input_size,)`, of the cell's dtype.
        - `state`: the state after the previous step.

        **Returns:**

        The state after this step, of the same structure, shapes and dtypes.
        """

    @abc.abstractmethod
    def init_state(self) -> eqx.Module:
        """**Returns:**

        The initial state: zeros of shape `(hidden_size,)` in the cell's dtype.
        """


class VanillaRNNCell(AbstractRNNCell):
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
        r"""**Arguments:**

        - `input_size`: size of the input vector.
        - `hidden_size`: size of the hidden vector.
        - `activation`: element-wise nonlinearity $\sigma$; `jnp.tanh` by default.
        - `use_bias`: whether `W` has a bias.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for the initialisation.
        """
        _check_sizes("VanillaRNNCell", input_size, hidden_size)
        dtype = canonical_dtype(dtype, "VanillaRNNCell")
        self.W = Linear(input_size + hidden_size, hidden_size, use_bias, dtype=dtype, key=key)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.activation = activation

    def __call__(self, x: Float[Array, " input_size"], state: VanillaRNNState) -> VanillaRNNState:
        """**Arguments:**

        - `x`: input, shape `(input_size,)`.
        - `state`: previous [`eqtrace.nn.VanillaRNNState`][].

        **Returns:**

        The new [`eqtrace.nn.VanillaRNNState`][].
        """
        _check_input(self, x, self.W.weight.dtype)
        return VanillaRNNState(h=self.activation(self.W(_concat(x, state.h))))

    def init_state(self) -> VanillaRNNState:
        """**Returns:**

        `VanillaRNNState(h=zeros(hidden_size))` in the cell's dtype.
        """
        return VanillaRNNState(h=jnp.zeros((self.hidden_size,), self.W.weight.dtype))


ValinaRNNCell = VanillaRNNCell  # braintrace's spelling


class GRUCell(AbstractRNNCell):
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
        r"""**Arguments:**

        - `input_size`: size of the input vector.
        - `hidden_size`: size of the hidden vector.
        - `activation`: nonlinearity $\sigma$ of the candidate $\tilde h$; `jnp.tanh` by default.
        - `use_bias`: whether the gates have biases.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for the initialisation.
        """
        _check_sizes("GRUCell", input_size, hidden_size)
        dtype = canonical_dtype(dtype, "GRUCell")
        zkey, rkey, hkey = jax.random.split(key, 3)
        n = input_size + hidden_size
        self.Wz = Linear(n, hidden_size, use_bias, dtype=dtype, key=zkey)
        self.Wr = Linear(n, hidden_size, use_bias, dtype=dtype, key=rkey)
        self.Wh = Linear(n, hidden_size, use_bias, dtype=dtype, key=hkey)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.activation = activation

    def __call__(self, x: Float[Array, " input_size"], state: GRUState) -> GRUState:
        """**Arguments:**

        - `x`: input, shape `(input_size,)`.
        - `state`: previous [`eqtrace.nn.GRUState`][].

        **Returns:**

        The new [`eqtrace.nn.GRUState`][].
        """
        _check_input(self, x, self.Wz.weight.dtype)
        h = state.h
        xh = _concat(x, h)
        z = jax.nn.sigmoid(self.Wz(xh))
        r = jax.nn.sigmoid(self.Wr(xh))
        cand = self.activation(self.Wh(_concat(x, r * h)))
        return GRUState(h=(1 - z) * h + z * cand)

    def init_state(self) -> GRUState:
        """**Returns:**

        `GRUState(h=zeros(hidden_size))` in the cell's dtype.
        """
        return GRUState(h=jnp.zeros((self.hidden_size,), self.Wz.weight.dtype))


class LSTMCell(AbstractRNNCell):
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
        r"""**Arguments:**

        - `input_size`: size of the input vector.
        - `hidden_size`: size of the hidden and cell vectors.
        - `activation`: nonlinearity $\sigma$ of $g$ and of the output; `jnp.tanh` by default.
        - `use_bias`: whether the gates have biases (the forget gate's starts at $1$).
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for the initialisation.
        """
        _check_sizes("LSTMCell", input_size, hidden_size)
        dtype = canonical_dtype(dtype, "LSTMCell")
        ikey, fkey, okey, gkey = jax.random.split(key, 4)
        n = input_size + hidden_size
        self.Wi = Linear(n, hidden_size, use_bias, dtype=dtype, key=ikey)
        Wf = Linear(n, hidden_size, use_bias, dtype=dtype, key=fkey)
        if use_bias:
            Wf = eqx.tree_at(lambda lin: lin.bias, Wf, jnp.ones((hidden_size,), dtype))
        self.Wf = Wf
        self.Wo = Linear(n, hidden_size, use_bias, dtype=dtype, key=okey)
        self.Wg = Linear(n, hidden_size, use_bias, dtype=dtype, key=gkey)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.activation = activation

    def __call__(self, x: Float[Array, " input_size"], state: LSTMState) -> LSTMState:
        """**Arguments:**

        - `x`: input, shape `(input_size,)`.
        - `state`: previous [`eqtrace.nn.LSTMState`][].

        **Returns:**

        The new [`eqtrace.nn.LSTMState`][].
        """
        _check_input(self, x, self.Wi.weight.dtype)
        xh = _concat(x, state.h)
        i = jax.nn.sigmoid(self.Wi(xh))
        f = jax.nn.sigmoid(self.Wf(xh))
        o = jax.nn.sigmoid(self.Wo(xh))
        g = self.activation(self.Wg(xh))
        c = f * state.c + i * g
        return LSTMState(h=o * self.activation(c), c=c)

    def init_state(self) -> LSTMState:
        """**Returns:**

        `LSTMState(h=zeros(hidden_size), c=zeros(hidden_size))` in the cell's dtype.
        """
        zeros = jnp.zeros((self.hidden_size,), self.Wi.weight.dtype)
        return LSTMState(h=zeros, c=zeros)


class MGUCell(AbstractRNNCell):
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
        r"""**Arguments:**

        - `input_size`: size of the input vector.
        - `hidden_size`: size of the hidden vector.
        - `activation`: nonlinearity $\sigma$ of the candidate $\tilde h$; `jnp.tanh` by default.
        - `use_bias`: whether the gates have biases.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for the initialisation.
        """
        _check_sizes("MGUCell", input_size, hidden_size)
        dtype = canonical_dtype(dtype, "MGUCell")
        fkey, hkey = jax.random.split(key)
        n = input_size + hidden_size
        self.Wf = Linear(n, hidden_size, use_bias, dtype=dtype, key=fkey)
        self.Wh = Linear(n, hidden_size, use_bias, dtype=dtype, key=hkey)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.activation = activation

    def __call__(self, x: Float[Array, " input_size"], state: MGUState) -> MGUState:
        """**Arguments:**

        - `x`: input, shape `(input_size,)`.
        - `state`: previous [`eqtrace.nn.MGUState`][].

        **Returns:**

        The new [`eqtrace.nn.MGUState`][].
        """
        _check_input(self, x, self.Wf.weight.dtype)
        h = state.h
        f = jax.nn.sigmoid(self.Wf(_concat(x, h)))
        cand = self.activation(self.Wh(_concat(x, f * h)))
        return MGUState(h=(1 - f) * h + f * cand)

    def init_state(self) -> MGUState:
        """**Returns:**

        `MGUState(h=zeros(hidden_size))` in the cell's dtype.
        """
        return MGUState(h=jnp.zeros((self.hidden_size,), self.Wf.weight.dtype))


class MinimalRNNCell(AbstractRNNCell):
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
        r"""**Arguments:**

        - `input_size`: size of the input vector.
        - `hidden_size`: size of the hidden vector.
        - `activation`: nonlinearity $\sigma$ of the encoding $z$; `jnp.tanh` by default.
        - `use_bias`: whether `phi` and `Wu` have biases.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for the initialisation.
        """
        _check_sizes("MinimalRNNCell", input_size, hidden_size)
        dtype = canonical_dtype(dtype, "MinimalRNNCell")
        pkey, ukey = jax.random.split(key)
        self.phi = Linear(input_size, hidden_size, use_bias, dtype=dtype, key=pkey)
        self.Wu = Linear(input_size + hidden_size, hidden_size, use_bias, dtype=dtype, key=ukey)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.activation = activation

    def __call__(self, x: Float[Array, " input_size"], state: MinimalRNNState) -> MinimalRNNState:
        """**Arguments:**

        - `x`: input, shape `(input_size,)`.
        - `state`: previous [`eqtrace.nn.MinimalRNNState`][].

        **Returns:**

        The new [`eqtrace.nn.MinimalRNNState`][].
        """
        _check_input(self, x, self.Wu.weight.dtype)
        h = state.h
        z = self.activation(self.phi(x))
        u = jax.nn.sigmoid(self.Wu(_concat(x, h)))
        return MinimalRNNState(h=u * h + (1 - u) * z)

    def init_state(self) -> MinimalRNNState:
        """**Returns:**

        `MinimalRNNState(h=zeros(hidden_size))` in the cell's dtype.
        """
        return MinimalRNNState(h=jnp.zeros((self.hidden_size,), self.Wu.weight.dtype))


class IndRNNCell(AbstractRNNCell):
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
        r"""**Arguments:**

        - `input_size`: size of the input vector.
        - `hidden_size`: size of the hidden vector.
        - `activation`: element-wise nonlinearity $\sigma$; `jax.nn.relu` by default.
        - `use_bias`: whether `W` has a bias.
        - `dtype`: floating dtype of the parameters and state; JAX's default if `None`.
        - `key`: a `jax.random` key for the initialisation.
        """
        _check_sizes("IndRNNCell", input_size, hidden_size)
        dtype = canonical_dtype(dtype, "IndRNNCell")
        wkey, ukey = jax.random.split(key)
        self.W = Linear(input_size, hidden_size, use_bias, dtype=dtype, key=wkey)
        self.u = jax.random.uniform(ukey, (hidden_size,), dtype=dtype, minval=0.0, maxval=1.0)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.activation = activation

    def __call__(self, x: Float[Array, " input_size"], state: IndRNNState) -> IndRNNState:
        """**Arguments:**

        - `x`: input, shape `(input_size,)`.
        - `state`: previous [`eqtrace.nn.IndRNNState`][].

        **Returns:**

        The new [`eqtrace.nn.IndRNNState`][].
        """
        _check_input(self, x, self.u.dtype)
        return IndRNNState(h=self.activation(self.W(x) + element_wise(self.u) * state.h))

    def init_state(self) -> IndRNNState:
        """**Returns:**

        `IndRNNState(h=zeros(hidden_size))` in the cell's dtype.
        """
        return IndRNNState(h=jnp.zeros((self.hidden_size,), self.u.dtype))
