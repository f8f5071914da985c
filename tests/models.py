"""Models shared by the tests: the seed tutorial's three, and small ones with known structure."""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqtrace
import eqtrace.nn as enn


class SingleLayerRNN(eqx.Module):
    rnn: enn.VanillaRNNCell
    out: enn.Linear

    def __init__(self, n_in, n_rec, n_out, *, dtype=None, key):
        k1, k2 = jax.random.split(key)
        self.rnn = enn.ValinaRNNCell(n_in, n_rec, dtype=dtype, key=k1)
        self.out = enn.Linear(n_rec, n_out, dtype=dtype, key=k2)

    def __call__(self, x, state):
        state = {"rnn": self.rnn(x, state["rnn"])}
        return self.out(state["rnn"].h), state

    def init_state(self):
        return {"rnn": self.rnn.init_state()}


class TwoLayerGRU(eqx.Module):
    rnn1: enn.GRUCell
    rnn2: enn.GRUCell
    out: enn.Linear

    def __init__(self, n_in, n_rec, n_out, *, dtype=None, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.rnn1 = enn.GRUCell(n_in, n_rec, dtype=dtype, key=k1)
        self.rnn2 = enn.GRUCell(n_rec, n_rec, dtype=dtype, key=k2)
        self.out = enn.Linear(n_rec, n_out, dtype=dtype, key=k3)

    def __call__(self, x, state):
        s1 = self.rnn1(x, state["rnn1"])
        s2 = self.rnn2(s1.h, state["rnn2"])
        return self.out(s2.h), {"rnn1": s1, "rnn2": s2}

    def init_state(self):
        return {"rnn1": self.rnn1.init_state(), "rnn2": self.rnn2.init_state()}


class ConvRNN(eqx.Module):
    conv: enn.Conv2d
    rnn: enn.VanillaRNNCell
    out: enn.Linear

    def __init__(self, *, channels=8, size=28, n_rec=64, dtype=None, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = enn.Conv2d(1, channels, kernel_size=3, padding="SAME", dtype=dtype, key=k1)
        self.rnn = enn.ValinaRNNCell(channels * size * size, n_rec, dtype=dtype, key=k2)
        self.out = enn.Linear(n_rec, 10, dtype=dtype, key=k3)

    def __call__(self, x, state):
        features = self.conv(x).reshape(-1)
        state = {"rnn": self.rnn(features, state["rnn"])}
        return self.out(state["rnn"].h), state

    def init_state(self):
        return {"rnn": self.rnn.init_state()}


class StackedCells(eqx.Module):
    """Any cells of `eqtrace.nn` stacked, with a Linear readout."""

    cells: tuple
    out: enn.Linear

    def __call__(self, x, state):
        new = []
        for cell, s in zip(self.cells, state):
            s = cell(x, s)
            x = s.h
            new.append(s)
        return self.out(x), tuple(new)

    def init_state(self):
        return tuple(c.init_state() for c in self.cells)


@jax.custom_jvp
def spike(v):
    return (v > 0).astype(v.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    return spike(v), dv / (1 + jnp.abs(v)) ** 2


class AdaptiveNeurons(eqx.Module):
    """A two-state (V, a) neuron group fed by a tagged matmul, with a learnable decay, a spike
    through `custom_jvp`, and an independent leaky trace `z` of the same shape (its own group)."""

    w: jax.Array
    tau: jax.Array
    w_out: jax.Array

    def __call__(self, x, state):
        v, a, z = state
        decay = eqtrace.element_wise(self.tau, lambda t: jnp.exp(-1.0 / t))
        i = eqtrace.matmul(x, self.w)
        v = decay * v + i - 0.5 * a
        s = spike(v - 1.0 - a)
        a = 0.9 * a + s
        z = 0.8 * z + i
        return eqtrace.matmul(jax.jit(jnp.tanh)(v), self.w_out), (v, a, z)

    def init_state(self):
        n = self.w.shape[1]
        return (jnp.zeros(n, self.w.dtype),) * 3
