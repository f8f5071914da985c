"""Gradient fidelity: how close D-RTRL and ES-D-RTRL come to BPTT, per model.

For each model and algorithm: the cosine similarity between the online gradient and BPTT's over a
batch of random sequences (all leaves flattened together), and the relative error
`|g - g_bptt| / |g_bptt|`. Float64, so the numbers measure the approximation, not round-off.

Run: `python benchmarks/fidelity.py [--seq-len 50] [--batch 16]`.
"""

import argparse

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp

import eqtrace
import eqtrace.nn as enn


jax.config.update("jax_enable_x64", True)


class Stack(eqx.Module):
    cells: tuple
    out: enn.Linear

    def __call__(self, x, state):
        new = []
        for cell, s in zip(self.cells, state):
            s = cell(x, s)
            x = s.h if hasattr(s, "h") else cell.spike(s)
            new.append(s)
        return self.out(x), tuple(new)

    def init_state(self):
        return tuple(c.init_state() for c in self.cells)


def models(n_in: int, n: int, key):
    ks = jax.random.split(key, 8)
    out = lambda k: enn.Linear(n, 1, dtype=jnp.float64, key=k)  # noqa: E731
    made = {
        "IndRNN (element-wise recurrence)": Stack(
            (enn.IndRNNCell(n_in, n, activation=jnp.tanh, dtype=jnp.float64, key=ks[0]),), out(ks[1])
        ),
        "vanilla RNN": Stack((enn.VanillaRNNCell(n_in, n, dtype=jnp.float64, key=ks[2]),), out(ks[3])),
        "GRU": Stack((enn.GRUCell(n_in, n, dtype=jnp.float64, key=ks[4]),), out(ks[5])),
        "LSTM": Stack((enn.LSTMCell(n_in, n, dtype=jnp.float64, key=ks[6]),), out(ks[7])),
    }
    return made


def flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args(argv)
    n_in = 4
    kx, kt, km = jax.random.split(jax.random.key(0), 3)
    xs = jax.random.normal(kx, (args.batch, args.seq_len, n_in))
    ts = jax.random.normal(kt, (args.batch, args.seq_len, 1))
    loss = lambda y, t: jnp.sum((y - t) ** 2)  # noqa: E731
    algorithms = [("D-RTRL", {"algorithm": "d_rtrl"})] + [
        (f"ES-D-RTRL α={a}", {"algorithm": "es_d_rtrl", "decay": a}) for a in (0.0, 0.5, 0.9)
    ]
    print(f"| model | {' | '.join(name for name, _ in algorithms)} |")
    print("|---|" + "---|" * len(algorithms))
    for name, model in models(n_in, args.hidden, km).items():
        states = jax.vmap(lambda _: model.init_state())(jnp.arange(args.batch))
        g_ref = flat(eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, ts, loss)[0])
        cells = []
        for _, kw in algorithms:
            g = flat(eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, ts, loss, **kw)[0])
            cos = float(g @ g_ref / (jnp.linalg.norm(g) * jnp.linalg.norm(g_ref)))
            rel = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
            cells.append(f"{cos:.3f} / {rel:.2f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
