"""Multi-device runs on two host CPU devices, in a subprocess of their own (the device count is
fixed when JAX starts): data parallelism over the batch axis, and traces sharded along the hidden
axis with their weights, each against the same computation on one device."""

import os
import pathlib
import subprocess
import sys
import textwrap


ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import re

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import eqtrace
    from tests.models import SingleLayerRNN

    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 2, jax.devices()


    def mse(y, t):
        return jnp.mean((y - t) ** 2)


    def put(tree, sharding):
        return jax.tree.map(lambda a: jax.device_put(a, sharding) if eqx.is_array(a) else a, tree)


    def max_diff(a, b):
        return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


    model = SingleLayerRNN(3, 8, 2, dtype=jnp.float64, key=jax.random.key(0))
    B, T = 4, 6
    kx, kt = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(kx, (B, T, 3), jnp.float64)
    targets = jax.random.normal(kt, (B, T, 2), jnp.float64)
    states = jax.vmap(lambda _: model.init_state())(jnp.arange(B))

    # Data parallelism: the batch axis split over the devices, the weights replicated.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    for grad_fn, kwargs in [
        (eqtrace.online_grad, {"algorithm": "d_rtrl"}),
        (eqtrace.online_grad, {"algorithm": eqtrace.ESDRTRL(decay=0.8)}),  # batch-native
    ]:
        fn = eqx.filter_jit(lambda m, s, x, t: eqtrace.batch_grad(grad_fn, m, s, x, t, mse, **kwargs))
        single = fn(model, states, xs, targets)
        assert all(len(a.devices()) == 1 for a in jax.tree.leaves(single))
        sharded = fn(put(model, replicated), put(states, data), put(xs, data), put(targets, data))
        diff = max_diff(sharded, single)
        assert diff < 1e-12, (grad_fn.__name__, kwargs, diff)
        for leaf in jax.tree.leaves(sharded):
            assert len(leaf.devices()) == 2 and leaf.sharding.is_fully_replicated, leaf.sharding
        print("data parallel", grad_fn.__name__, kwargs, "max diff", diff)

    # Model parallelism: the recurrent layer's weights split along the hidden axis; D-RTRL's traces
    # (weight-shaped) follow them, and only hidden-sized vectors cross devices.
    mesh = Mesh(np.array(jax.devices()), ("model",))
    hidden = lambda *spec: NamedSharding(mesh, P(*spec))
    split = eqx.tree_at(
        lambda m: (m.rnn.W.weight, m.rnn.W.bias, m.out.weight),
        model,
        (
            jax.device_put(model.rnn.W.weight, hidden(None, "model")),
            jax.device_put(model.rnn.W.bias, hidden("model")),
            jax.device_put(model.out.weight, hidden("model", None)),
        ),
    )
    state = model.init_state()
    graph = eqtrace.compile_etrace_graph(model, xs[0, 0], state)
    arrays, static = eqx.partition(model, eqx.is_array)
    run = jax.jit(
        lambda a, s, x, t: eqtrace.online_grad(
            eqx.combine(a, static), s, x, t, mse, graph=graph, return_traces=True
        )
    )
    single = run(arrays, state, xs[0], targets[0])
    split_arrays = eqx.filter(split, eqx.is_array)
    split_state = put(state, hidden("model"))
    compiled = run.lower(split_arrays, split_state, xs[0], targets[0]).compile()
    sharded = compiled(split_arrays, split_state, xs[0], targets[0])
    diff = max_diff(sharded, single)
    assert diff < 1e-12, diff
    grads, _, traces = sharded
    (eps_w, eps_b) = traces.eps
    assert eps_w.shape == (11, 8, 1) and eps_w.sharding.spec == P(None, "model"), eps_w.sharding
    assert eps_b.sharding.spec == P("model"), eps_b.sharding
    assert grads.rnn.W.weight.sharding.spec == P(None, "model"), grads.rnn.W.weight.sharding
    hlo = compiled.as_text()
    collectives = re.findall(
        r"= f64\\[([0-9,]*)\\][^ ]* (?:all-gather|all-reduce|all-to-all|collective-permute)\\(", hlo
    )
    assert collectives, "expected some communication between the two halves"
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in collectives]
    assert max(sizes) < eps_w.size // 2, sizes  # hidden-sized vectors, never a trace
    print("model parallel max diff", diff, "collective sizes", sizes)
    """
)


def test_two_devices_match_one():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("data parallel") == 2, result.stdout
    assert "model parallel" in result.stdout, result.stdout
