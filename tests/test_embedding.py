"""`eqtrace.embedding` and `eqtrace.nn.Embedding`: a table look-up whose table D-RTRL traces exactly
per position over the vocabulary (against BPTT, per step), and the brute-force references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose
from .op_checks import check_brute_force, check_d_rtrl_equals_bptt, check_transparent, mse


@pytest.mark.parametrize("ids", [jnp.array(3), jnp.array([0, 4, 4, 1])], ids=["one", "several"])
def test_equals_indexing(ids):
    table = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64)
    check_transparent(
        eqtrace.embedding, lambda i, t: t[i], [ids, table], eqtrace.etp_embedding_p, diff_argnums=(1,)
    )


class TokenRNN(eqx.Module):
    embed: enn.Embedding
    readout: enn.Linear

    def __call__(self, token, h):
        h = jnp.tanh(0.7 * h + self.embed(token))
        return self.readout(h), h


class SlotRNN(eqx.Module):
    """Two tokens per step, one state row each: the table is shared across the two rows."""

    embed: enn.Embedding
    readout: enn.Linear

    def __call__(self, tokens, h):
        h = jnp.tanh(0.7 * h + self.embed(tokens))
        return self.readout(h.reshape(-1)), h


def _parts(n_tokens=()):
    k = jax.random.split(jax.random.key(1), 4)
    embed = enn.Embedding(5, 4, dtype=jnp.float64, key=k[0])
    readout = enn.Linear(4 * (n_tokens[0] if n_tokens else 1), 2, dtype=jnp.float64, key=k[1])
    tokens = jax.random.randint(k[2], (5, *n_tokens), 0, 5)
    targets = jax.random.normal(k[3], (5, 2), jnp.float64)
    return embed, readout, jnp.zeros(4, jnp.float64), tokens, targets


def test_table_is_traced_over_the_vocabulary():
    embed, readout, h0, tokens, _ = _parts()
    model = TokenRNN(embed, readout)
    graph = eqtrace.compile_etrace_graph(model, tokens[0], h0)
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("embed", "weight")]
    assert rel.position_diagonal and rel.input_axes == (0,)
    traces = eqtrace.d_rtrl_init(graph, model, h0)
    assert [e.shape for e in traces.eps] == [(5, 4, 1)]


def test_d_rtrl_equals_bptt_per_step():
    embed, readout, h0, tokens, targets = _parts()
    # Some token is read twice and some never: both kinds of rows are checked.
    assert len(set(tokens.tolist())) < len(tokens)
    check_d_rtrl_equals_bptt(TokenRNN(embed, readout), h0, tokens, targets)


def test_brute_force_references():
    embed, readout, h0, tokens, targets = _parts()
    check_brute_force(TokenRNN(embed, readout), h0, tokens[:3], targets[:3])


def test_several_tokens_share_the_table_and_match_the_references():
    embed, readout, h0, tokens, targets = _parts((2,))
    h0 = jnp.zeros((2, 4), jnp.float64)
    graph = check_brute_force(SlotRNN(embed, readout), h0, tokens[:3], targets[:3])
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("embed", "weight")]
    assert not rel.position_diagonal


def test_batched_es_d_rtrl_equals_the_mean_of_per_example_gradients():
    """Batched, the ids are per-example operands of the look-up (no input trace)."""
    embed, readout, h0, tokens, targets = _parts()
    model = TokenRNN(embed, readout)
    batch = jnp.stack([tokens, tokens[::-1]]), jnp.stack([targets, -targets])
    grads, _ = eqtrace.batch_grad(
        eqtrace.online_grad, model, jnp.zeros((2, 4), jnp.float64), *batch, mse, algorithm="es_d_rtrl"
    )
    singles = [
        eqtrace.online_grad(model, h0, batch[0][b], batch[1][b], mse, "es_d_rtrl")[0] for b in range(2)
    ]
    assert_tree_allclose(grads, jax.tree.map(lambda a, b: (a + b) / 2, *singles))


def test_bad_ids():
    with pytest.raises(TypeError, match="ids"):
        eqtrace.embedding(jnp.ones(2), jnp.ones((5, 3)))
