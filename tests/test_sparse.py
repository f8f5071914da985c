"""`eqtrace.sparse_matmul` and `eqtrace.nn.SparseLinear`: a fixed connectivity whose values D-RTRL
traces on the connections only, exactly per position (against BPTT, per step), and the brute-force
references."""

import equinox as eqx
import jax
import jax.experimental.sparse as jsparse
import jax.numpy as jnp
import numpy as np
import pytest

import eqtrace
import eqtrace.nn as enn

from .op_checks import check_brute_force, check_d_rtrl_equals_bptt, check_transparent


# Five inputs to four outputs; output 2 has no connection, output 0 three (fan-in 3, padded).
PRE = np.array([0, 4, 1, 2, 3, 0, 2])
POST = np.array([0, 0, 1, 3, 1, 3, 0])
PATTERN = eqtrace.SparsePattern.from_connections(PRE, POST, 5, 4)


def _values(seed=0):
    v = jax.random.normal(jax.random.key(seed), PATTERN.indices.shape, jnp.float64)
    return jnp.where(PATTERN.mask, v, 0)


def test_pattern_and_dense_equivalent():
    assert PATTERN.shape == (5, 4) and PATTERN.nnz == 7 and PATTERN.indices.shape == (4, 3)
    dense = PATTERN.to_dense(_values())
    assert set(zip(*np.nonzero(np.asarray(dense)))) == set(zip(PRE.tolist(), POST.tolist()))
    bcoo = jsparse.BCOO.fromdense(dense)
    assert eqtrace.SparsePattern.from_bcoo(bcoo) == eqtrace.SparsePattern.from_connections(
        np.asarray(bcoo.indices[:, 0]), np.asarray(bcoo.indices[:, 1]), 5, 4
    )
    assert hash(PATTERN) == hash(eqtrace.SparsePattern.from_connections(PRE, POST, 5, 4))


@pytest.mark.parametrize("x_shape", [(5,), (2, 5)])
def test_equals_the_dense_product(x_shape):
    x = jax.random.normal(jax.random.key(1), x_shape, jnp.float64)
    check_transparent(
        lambda x, v: eqtrace.sparse_matmul(x, v, PATTERN),
        lambda x, v: x @ PATTERN.to_dense(v),
        [x, _values()],
        eqtrace.etp_sparse_matmul_p,
        untagged=lambda x, v: jnp.einsum(
            "...ok,ok->...o", jnp.take(x, PATTERN.indices, axis=-1), jnp.where(PATTERN.mask, v, 0)
        ),
    )


class Connectome(eqx.Module):
    syn: enn.SparseLinear
    readout: enn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(0.8 * h + self.syn(x))
        return self.readout(h), h


def _model():
    k = jax.random.split(jax.random.key(2), 4)
    model = Connectome(
        enn.SparseLinear(PATTERN, dtype=jnp.float64, key=k[0]), enn.Linear(4, 2, dtype=jnp.float64, key=k[1])
    )
    xs = jax.random.normal(k[2], (5, 5), jnp.float64)
    return model, jnp.zeros(4, jnp.float64), xs, jax.random.normal(k[3], (5, 2), jnp.float64)


def test_trace_is_kept_on_the_connections():
    model, h0, xs, targets = _model()
    graph = eqtrace.compile_etrace_graph(model, xs[0], h0)
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("syn", "values")]
    assert rel.position_diagonal and rel.input_axes == (1,)
    traces = eqtrace.d_rtrl_init(graph, model, h0)
    for t in range(3):
        traces, _, _, _ = eqx.filter_jit(eqtrace.d_rtrl_step)(
            graph, model, traces, xs[t], targets[t], lambda y, t: jnp.sum((y - t) ** 2)
        )
    (eps,) = [e for e in traces.eps if e.shape == PATTERN.indices.shape + (1,)]
    assert bool(jnp.all(eps[~PATTERN.mask] == 0)) and bool(jnp.all(eps[PATTERN.mask] != 0))


def test_d_rtrl_equals_bptt_per_step():
    check_d_rtrl_equals_bptt(*_model())


def test_brute_force_references():
    model, h0, xs, targets = _model()
    check_brute_force(model, h0, xs[:3], targets[:3])


def test_bad_input():
    with pytest.raises(ValueError, match="twice"):
        eqtrace.SparsePattern.from_connections([0, 0], [1, 1], 2, 2)
    with pytest.raises(ValueError, match="pattern maps 5 inputs"):
        eqtrace.sparse_matmul(jnp.ones(4), _values(), PATTERN)
