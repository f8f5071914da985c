"""Layers with a diagonal recurrence, on which D-RTRL is exact: the linear recurrent unit
(`eqtrace.nn.LRU`), `MiniGRUCell` and `MiniLSTMCell`, against BPTT per step and the brute-force
references, and against their equations written out."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose
from .op_checks import check_brute_force, check_d_rtrl_equals_bptt


class LRUModel(eqx.Module):
    lru: enn.LRU

    def __call__(self, x, state):
        state = self.lru(x, state)
        return self.lru.output(x, state), state


class CellModel(eqx.Module):
    cell: enn.AbstractRNNCell
    readout: enn.Linear

    def __call__(self, x, state):
        state = self.cell(x, state)
        return self.readout(state.h), state


def _models():
    k = jax.random.split(jax.random.key(0), 5)
    f64 = jnp.float64
    return {
        "lru": LRUModel(enn.LRU(3, 4, 2, r_min=0.5, r_max=0.95, dtype=f64, key=k[0])),
        "mini_gru": CellModel(
            enn.MiniGRUCell(3, 4, dtype=f64, key=k[1]), enn.Linear(4, 2, dtype=f64, key=k[2])
        ),
        "mini_lstm": CellModel(
            enn.MiniLSTMCell(3, 4, activation=jnp.tanh, dtype=f64, key=k[3]),
            enn.Linear(4, 2, dtype=f64, key=k[4]),
        ),
    }


def _sequence(n):
    k1, k2 = jax.random.split(jax.random.key(1))
    return jax.random.normal(k1, (n, 3), jnp.float64), jax.random.normal(k2, (n, 2), jnp.float64)


def _state(model):
    return model.lru.init_state() if isinstance(model, LRUModel) else model.cell.init_state()


@pytest.mark.parametrize("name", ["lru", "mini_gru", "mini_lstm"])
def test_d_rtrl_equals_bptt_per_step(name):
    model = _models()[name]
    graph = check_d_rtrl_equals_bptt(model, _state(model), *_sequence(5))
    assert len(graph.hidden_groups) == 1 and graph.hidden_groups[0].position_wise
    assert all(r.position_diagonal for r in graph.hidden_param_op_relations)


@pytest.mark.parametrize("name", ["lru", "mini_lstm"])
def test_brute_force_references(name):
    model = _models()[name]
    xs, targets = _sequence(2)
    check_brute_force(model, _state(model), xs, targets)


def test_lru_equations_in_complex_numbers():
    lru = _models()["lru"].lru
    x = _sequence(1)[0][0]
    state = enn.LRUState(re=jnp.linspace(-1.0, 1.0, 4), im=jnp.linspace(0.5, -0.5, 4))
    with jax.numpy_dtype_promotion("standard"):
        lam = jnp.exp(-jnp.exp(lru.nu_log) + 1j * jnp.exp(lru.theta_log))
        h = state.re + 1j * state.im
        b, c = lru.B_re + 1j * lru.B_im, lru.C_re + 1j * lru.C_im
        want = lam * h + jnp.sqrt(1 - jnp.abs(lam) ** 2) * (x @ b)
        new = lru(x, state)
        assert_tree_allclose((new.re, new.im), (want.real, want.imag))
        assert_tree_allclose(lru.output(x, new), jnp.real(want @ c) + x @ lru.D)
    assert bool(jnp.all((jnp.abs(lam) >= 0.5) & (jnp.abs(lam) <= 0.95)))
    # Two states per unit, coupled by the rotation: one group of two states over 4 positions.
    graph = eqtrace.compile_etrace_graph(_models()["lru"], x, lru.init_state())
    assert graph.hidden_groups[0].num_state == 2 and graph.hidden_groups[0].varshape == (4,)


def test_minimal_cells_equations():
    models = _models()
    x, h = _sequence(1)[0][0], jnp.linspace(-1.0, 1.0, 4)
    gru, lstm = models["mini_gru"].cell, models["mini_lstm"].cell
    z = jax.nn.sigmoid(x @ gru.Wz.weight + gru.Wz.bias)
    want = (1 - z) * h + z * (x @ gru.Wh.weight + gru.Wh.bias)
    assert_tree_allclose(gru(x, enn.VanillaRNNState(h=h)).h, want)
    f = jax.nn.sigmoid(x @ lstm.Wf.weight + lstm.Wf.bias)
    i = jax.nn.sigmoid(x @ lstm.Wi.weight + lstm.Wi.bias)
    want = f / (f + i) * h + i / (f + i) * jnp.tanh(x @ lstm.Wh.weight + lstm.Wh.bias)
    assert_tree_allclose(lstm(x, enn.VanillaRNNState(h=h)).h, want)


def test_lru_bad_ring():
    with pytest.raises(ValueError, match="r_min"):
        enn.LRU(3, 4, r_min=0.9, r_max=0.5, key=jax.random.key(0))
