"""`eqtrace.einsum`: the untagged `jnp.einsum`, and the weight layouts it declares, against BPTT (an
index shared by the input, a weight and the output) and the brute-force references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .op_checks import check_brute_force, check_d_rtrl_equals_bptt, check_transparent


def _normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


@pytest.mark.parametrize(
    "spec, shapes",
    [
        ("bi,bij->bj", [(2, 3), (2, 3, 4)]),
        ("i,ij->j", [(3,), (3, 4)]),
        ("bi,ij,j->bj", [(2, 3), (3, 4), (4,)]),
        ("i,jk->ijk", [(3,), (2, 4)]),
    ],
)
def test_equals_untagged_einsum(spec, shapes):
    args = [_normal(i, *s) for i, s in enumerate(shapes)]
    check_transparent(
        lambda *a: eqtrace.einsum(spec, *a), lambda *a: jnp.einsum(spec, *a), args, eqtrace.etp_einsum_p
    )


class SharedIndexRNN(eqx.Module):
    """`h[b] ← tanh(a[b] ⊙ h[b] + x[b] W[b])`: one input matrix and one learnable decay per
    population `b`, so the recurrence is position-wise over `(B, J)` and D-RTRL is exact."""

    w: jax.Array
    tau: jax.Array
    readout: enn.Linear

    def __call__(self, x, h):
        a = eqtrace.element_wise(self.tau, lambda t: jnp.exp(-1.0 / t))
        h = jnp.tanh(a * h + eqtrace.einsum("bi,bij->bj", x, self.w))
        return self.readout(h.reshape(-1)), h


def _shared_index_model():
    B, I, J = 2, 3, 4
    k = jax.random.split(jax.random.key(0), 2)
    model = SharedIndexRNN(
        jax.random.normal(k[0], (B, I, J), jnp.float64),
        jnp.linspace(1.5, 4.0, B * J, dtype=jnp.float64).reshape(B, J),
        enn.Linear(B * J, 2, dtype=jnp.float64, key=k[1]),
    )
    xs, targets = _normal(1, 5, B, I), _normal(2, 5, 2)
    return model, jnp.zeros((B, J), jnp.float64), xs, targets


def test_shared_index_is_position_diagonal_with_a_middle_input_axis():
    model, state, xs, _ = _shared_index_model()
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("w",)]
    assert rel.position_diagonal
    assert rel.input_axes == (1,)


def test_shared_index_d_rtrl_equals_bptt_per_step():
    model, state, xs, targets = _shared_index_model()
    check_d_rtrl_equals_bptt(model, state, xs, targets)


def test_shared_index_brute_force_references():
    model, state, xs, targets = _shared_index_model()
    check_brute_force(model, state, xs[:2], targets[:2])


class SharedMatrixRNN(eqx.Module):
    """`"bi,ij->bj"`: one matrix shared by every row `b`, hence shared across positions."""

    w: jax.Array
    u: jax.Array
    readout: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(0.6 * h + eqtrace.einsum("bi,ij,j->bj", x, self.w, self.u))
        return self.readout(h.reshape(-1)), h


def test_shared_matrix_is_not_position_diagonal_and_matches_the_references():
    k = jax.random.split(jax.random.key(3), 3)
    model = SharedMatrixRNN(
        jax.random.normal(k[0], (3, 4), jnp.float64),
        jax.random.normal(k[1], (4,), jnp.float64),
        enn.Linear(8, 2, dtype=jnp.float64, key=k[2]),
    )
    xs, targets = _normal(4, 3, 2, 3), _normal(5, 3, 2)
    graph = check_brute_force(model, jnp.zeros((2, 4), jnp.float64), xs, targets)
    diagonal = {r.weight_path: r.position_diagonal for r in graph.hidden_param_op_relations}
    assert diagonal == {("w",): False, ("u",): False}


@pytest.mark.parametrize(
    "spec, shapes, match",
    [
        ("bi,bij", [(2, 3), (2, 3, 4)], "explicitly"),
        ("...i,ij->...j", [(2, 3), (3, 4)], "letters only"),
        ("bi,bij->bk", [(2, 3), (2, 3, 4)], "output indices"),
        ("bi,bij->bj", [(2, 3), (2, 5, 4)], "index 'i' has size 3"),
        ("bi,bij->bj", [(2, 3), (3, 4)], "must have 3 dimension"),
        ("bi,ij,j->bj", [(2, 3), (3, 4)], "names 3 operand"),
    ],
)
def test_bad_input(spec, shapes, match):
    args = [jnp.ones(s) for s in shapes]
    with pytest.raises((ValueError, TypeError), match=match):
        eqtrace.einsum(spec, *args)


def test_no_weight():
    with pytest.raises(ValueError, match="at least one weight"):
        eqtrace.einsum("i->i", jnp.ones(3))
