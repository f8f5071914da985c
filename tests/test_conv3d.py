"""`eqtrace.nn.Conv3d`: the 3-d case of the tagged convolution, against `lax.conv_general_dilated`
and, inside a recurrent model, against the brute-force references."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp

import eqtrace
import eqtrace.nn as enn

from .helpers import assert_tree_allclose
from .op_checks import check_brute_force


def test_values_and_gradient_equal_lax():
    conv = enn.Conv3d(
        2,
        3,
        kernel_size=(3, 2, 3),
        stride=(1, 2, 1),
        padding="VALID",
        dtype=jnp.float64,
        key=jax.random.key(0),
    )
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 5), jnp.float64)

    def ref(w, b):
        y = lax.conv_general_dilated(x[None], w, window_strides=(1, 2, 1), padding="VALID")[0]
        return y + b[:, None, None, None]

    assert conv.weight.shape == (3, 2, 3, 2, 3)
    assert_tree_allclose(conv(x), ref(conv.weight, conv.bias))
    loss = lambda f: lambda w, b: jnp.sum(jnp.sin(f(w, b)))  # noqa: E731
    tagged = lambda w, b: eqx.tree_at(lambda c: (c.weight, c.bias), conv, (w, b))(x)  # noqa: E731
    assert_tree_allclose(
        jax.grad(loss(tagged), argnums=(0, 1))(conv.weight, conv.bias),
        jax.grad(loss(ref), argnums=(0, 1))(conv.weight, conv.bias),
    )


class VolumeLeaky(eqx.Module):
    conv: enn.Conv3d
    readout: enn.Linear

    def __call__(self, x, v):
        v = 0.8 * v + self.conv(x)
        return self.readout(jnp.tanh(v).reshape(-1)), v


def test_recurrent_model_matches_the_brute_force_references():
    k = jax.random.split(jax.random.key(2), 4)
    model = VolumeLeaky(
        enn.Conv3d(1, 1, kernel_size=2, padding="SAME", dtype=jnp.float64, key=k[0]),
        enn.Linear(8, 2, dtype=jnp.float64, key=k[1]),
    )
    xs = jax.random.normal(k[2], (3, 1, 2, 2, 2), jnp.float64)
    targets = jax.random.normal(k[3], (3, 2), jnp.float64)
    graph = check_brute_force(model, jnp.zeros((1, 2, 2, 2), jnp.float64), xs, targets)
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("conv", "weight")]
    assert rel.primitive is eqtrace.etp_conv_p and not rel.position_diagonal
