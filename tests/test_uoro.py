"""UORO against its oracles: its mean over many keys against RTRL's exact gradient (statistically),
the first step against BPTT, and one step against the update written with full Jacobians."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import pytest

import eqtrace

from .helpers import assert_tree_allclose
from .test_d_rtrl import _random_steps, MODELS, mse
from .test_rtrl import ALL


def _flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def _with_key(traces, key):
    return eqx.tree_at(lambda t: t.key, traces, key)


# Relative error |mean_K - RTRL| / |RTRL| of UORO's gradient averaged over K keys (T = 5, float64),
# and the variance of one estimate, tr(Σ) / |RTRL|², as measured:
#   VanillaRNNCell: 0.049 at K = 100, 0.0094 at K = 2000 (ratio 5.3); tr(Σ) / |g|² = 0.33.
#   IndRNNCell:     0.020 at K = 100, 0.0055 at K = 2000 (ratio 3.6); tr(Σ) / |g|² = 0.060.
# For an unbiased estimate, E|mean_K - g|² = tr(Σ) / K: the error shrinks like 1/sqrt(K)
# (sqrt(20) ≈ 4.5 from 100 to 2000 keys); a bias would stop it at the bias.
@pytest.mark.parametrize("name", ["VanillaRNNCell", "IndRNNCell"])
def test_uoro_mean_over_keys_is_rtrl(name):
    model = MODELS[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 5)
    rtrl = _flat(eqtrace.online_grad(model, state, xs, targets, mse, eqtrace.RTRL())[0])
    rule = eqtrace.UORO()
    base = rule.init(eqtrace.compile_etrace_graph(model, xs[0], state), model, state)

    @eqx.filter_jit
    def estimates(keys):
        def one(key):
            traces = _with_key(base, key)
            return _flat(eqtrace.online_grad(model, None, xs, targets, mse, rule, traces=traces)[0])

        return jax.vmap(one)(keys)

    g = estimates(jax.random.split(jax.random.key(1), 2000))
    scale = jnp.linalg.norm(rtrl)
    variance = float(jnp.sum(jnp.var(g, axis=0)) / scale**2)  # tr(Σ) / |g|² of one estimate
    errors = {k: float(jnp.linalg.norm(jnp.mean(g[:k], axis=0) - rtrl) / scale) for k in (100, 2000)}
    assert variance > 1e-3, "one estimate is (nearly) exact: the signs do not enter"
    assert errors[2000] < 0.02, errors
    assert errors[2000] < 2.5 * (variance / 2000) ** 0.5, (errors, variance)
    assert errors[100] / errors[2000] > 2.5, errors


@pytest.mark.parametrize("name", ["VanillaRNNCell", "IndRNNCell", "recurrent_alif"])
def test_uoro_first_step_is_exact(name):
    """At T = 1 the history term is zero: UORO's gradient is BPTT's, whatever the key."""
    model = ALL[name]
    state = model.init_state()
    xs, targets = _random_steps(model, 1)
    ref, ref_losses = eqtrace.bptt_grad(model, state, xs, targets, mse)
    grads, losses = eqtrace.online_grad(model, state, xs, targets, mse, eqtrace.UORO(seed=3))
    assert_tree_allclose(grads, ref)
    assert_tree_allclose(losses, ref_losses)


def test_uoro_step_is_the_update_with_full_jacobians():
    """Two steps against the update written with `jax.jacfwd` Jacobians of the flattened step and
    the same signs."""
    model = MODELS["VanillaRNNCell"]
    state = model.init_state()
    xs, targets = _random_steps(model, 2)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    w0, unravel_w = jax.flatten_util.ravel_pytree(params)
    h0, unravel_h = jax.flatten_util.ravel_pytree(state)

    def step(w, h, x):
        y, new = eqx.combine(unravel_w(w), static)(x, unravel_h(h))
        return _flat(new), y

    rule = eqtrace.UORO(seed=7, eps=1e-7)
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    traces = rule.init(graph, model, state)
    h_tilde, theta_tilde, key, h = jnp.zeros_like(h0), jnp.zeros_like(w0), jax.random.key(7), h0
    for t in range(2):
        traces, _, _, grads = eqx.filter_jit(rule.step)(graph, model, traces, xs[t], targets[t], mse)
        key, sub = jax.random.split(key)
        nu = jax.random.rademacher(sub, h.shape, h.dtype)
        j_theta, j_h = jax.jacfwd(lambda w, h: step(w, h, xs[t])[0], argnums=(0, 1))(w0, h)
        d_w, d_h = jax.grad(lambda w, h: mse(step(w, h, xs[t])[1], targets[t]), argnums=(0, 1))(w0, h)
        grad = d_w + jnp.dot(d_h, h_tilde) * theta_tilde
        rho0 = jnp.sqrt(jnp.linalg.norm(theta_tilde) / (jnp.linalg.norm(j_h @ h_tilde) + 1e-7)) + 1e-7
        rho1 = jnp.sqrt(jnp.linalg.norm(nu @ j_theta) / (jnp.linalg.norm(nu) + 1e-7)) + 1e-7
        h_tilde, theta_tilde = rho0 * j_h @ h_tilde + rho1 * nu, theta_tilde / rho0 + nu @ j_theta / rho1
        h = step(w0, h, xs[t])[0]
        assert_tree_allclose(_flat(grads), grad)
        assert_tree_allclose((traces.h_tilde, traces.theta_tilde), (h_tilde, theta_tilde))
        assert_tree_allclose(_flat(traces.state), h)


def test_uoro_through_the_drivers():
    model = ALL["reads_previous"]  # an integer step counter in the state, carried untraced
    state = model.init_state()
    xs, targets = _random_steps(model, 4, seed=5)
    rule = eqtrace.UORO()
    online_grad = eqx.filter_jit(eqtrace.online_grad)
    grads, losses = online_grad(model, state, xs, targets, mse, rule)
    ref, ref_losses = eqtrace.bptt_grad(model, state, xs, targets, mse)
    assert_tree_allclose(losses, ref_losses)
    assert jax.tree.structure(grads) == jax.tree.structure(ref)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # A sequence continued from returned traces continues their signs: it is one sequence.
    g1, _, traces = online_grad(model, state, xs[:2], targets[:2], mse, rule, return_traces=True)
    g2, _ = online_grad(model, None, xs[2:], targets[2:], mse, rule, traces=traces)
    assert_tree_allclose(jax.tree.map(jnp.add, g1, g2), grads)
    # `batch_grad` vmaps the rule: every example starts from the seed's key.
    xs_b, targets_b = jnp.stack([xs, -xs, 0.5 * xs]), jnp.stack([targets, targets, -targets])
    states = jax.tree.map(lambda a: jnp.stack([a, a, a]), state)
    batch, batch_losses = eqx.filter_jit(eqtrace.batch_grad)(
        eqtrace.online_grad, model, states, xs_b, targets_b, mse, algorithm=rule
    )
    singles = [online_grad(model, state, xs_b[b], targets_b[b], mse, rule) for b in range(3)]
    assert_tree_allclose(batch, jax.tree.map(lambda *g: sum(g) / 3, *[g for g, _ in singles]))
    assert_tree_allclose(batch_losses, sum(l for _, l in singles) / 3)


def test_uoro_options_and_traces():
    assert not eqtrace.UORO.batch_native and not eqtrace.UORO.exact
    with pytest.raises(ValueError, match="`seed` must be an integer"):
        eqtrace.UORO(seed=True)
    for eps in (0.0, -1e-3):
        with pytest.raises(ValueError, match="`eps` must be a number > 0"):
            eqtrace.UORO(eps=eps)
    model, other = ALL["single_layer_rnn"], ALL["MGUCell"]
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    traces = eqtrace.UORO().init(graph, model, model.init_state())
    assert traces.h_tilde.shape == (5,) and traces.theta_tilde.shape == (57,)
    assert eqtrace.UORO().traces_relation(graph.hidden_param_op_relations[0])
    other_graph = eqtrace.compile_etrace_graph(other, jnp.zeros(3), other.init_state())
    wrong = eqtrace.UORO().init(other_graph, other, other.init_state())
    with pytest.raises((TypeError, ValueError), match="`traces`"):
        eqtrace.UORO().step(graph, model, wrong, jnp.zeros(3), jnp.zeros(2), mse)
