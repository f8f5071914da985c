"""The adding problem, learnt online with D-RTRL (or with BPTT, for comparison).

Each sequence has `T` steps of two input channels: a value drawn from U(0, 1), and a marker that is
1 at exactly two steps and 0 elsewhere. At the last step the network must output the sum of the two
marked values. Only the last step carries a loss: the target at each step is `(value, mask)`, with
the mask 1 at the last step only, and `loss_fn(y, t) = t[1] * (y[0] - t[0]) ** 2`.

Predicting the mean sum (1.0) gives the trivial baseline: the variance of a sum of two independent
U(0, 1) values, 1/6 ≈ 0.167. A network that remembers the marked values goes well below it.

Run it with `python examples/adding_problem.py` (`--algorithm bptt` to train with BPTT instead);
`main(["--steps", "20", ...])` returns the final loss (for tests); `--curve FILE` also writes the
training curve as JSON. The first progress line's time per step includes the one-off JIT compilation.
"""

import argparse
import json
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqtrace
import eqtrace.nn as enn


BASELINE = 1.0 / 6.0  # Var[u1 + u2] for u1, u2 ~ U(0, 1): the loss of always predicting 1.0.


class GRURegressor(eqx.Module):
    rnn: enn.GRUCell
    out: enn.Linear

    def __init__(self, n_in, n_rec, n_out, *, key):
        k1, k2 = jax.random.split(key)
        self.rnn = enn.GRUCell(n_in, n_rec, key=k1)
        self.out = enn.Linear(n_rec, n_out, key=k2)

    def __call__(self, x, state):
        rnn = self.rnn(x, state["rnn"])
        return self.out(rnn.h), {"rnn": rnn}

    def init_state(self):
        return {"rnn": self.rnn.init_state()}


def adding_batch(key, batch, seq_len):
    """`xs` `(batch, T, 2)` = (value, marker); `targets` `(batch, T, 2)` = (sum, mask)."""
    vkey, mkey = jax.random.split(key)
    values = jax.random.uniform(vkey, (batch, seq_len))
    # Two distinct marked steps per sequence: the first two of a random permutation of 0..T-2
    # (the last step is left unmarked so that a marked value is never read at the answer step).
    perms = jax.vmap(lambda k: jax.random.permutation(k, seq_len - 1))(jax.random.split(mkey, batch))
    markers = jnp.zeros((batch, seq_len)).at[jnp.arange(batch)[:, None], perms[:, :2]].set(1.0)
    xs = jnp.stack([values, markers], axis=-1)
    total = jnp.sum(values * markers, axis=1)
    mask = jnp.zeros((batch, seq_len)).at[:, -1].set(1.0)
    targets = jnp.stack([jnp.broadcast_to(total[:, None], (batch, seq_len)), mask], axis=-1)
    return xs, targets


def loss_fn(y, target):
    value, mask = target[0], target[1]
    return mask * (y[0] - value) ** 2


def make_step(optim, algorithm):
    if algorithm == "bptt":
        grad_fn, kwargs = eqtrace.bptt_grad, {}
    else:
        grad_fn, kwargs = eqtrace.online_grad, {"algorithm": algorithm}

    @eqx.filter_jit
    def step(model, opt_state, xs, targets):
        batch = xs.shape[0]
        states = jax.vmap(lambda _: model.init_state())(jnp.arange(batch))
        grads, losses = eqtrace.batch_grad(grad_fn, model, states, xs, targets, loss_fn, **kwargs)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, jnp.sum(losses)  # only the last step has a loss

    return step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--algorithm", choices=["d_rtrl", "bptt"], default="d_rtrl")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--print-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curve", default=None, help="write the training curve to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    """Train and return the final loss (mean over the last `--print-every` steps)."""
    args = parse_args(argv)
    mkey, dkey = jax.random.split(jax.random.key(args.seed))
    model = GRURegressor(2, args.hidden, 1, key=mkey)
    optim = optax.adam(args.lr)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(optim, args.algorithm)

    print(
        f"adding problem: T={args.seq_len}, hidden={args.hidden}, batch={args.batch}, "
        f"algorithm={args.algorithm}, baseline loss {BASELINE:.3f}"
    )
    window = []
    curve = {"step": [], "loss": []}  # means over each `--print-every` block
    tic = time.perf_counter()
    for i, key in enumerate(jax.random.split(dkey, args.steps), start=1):
        xs, targets = adding_batch(key, args.batch, args.seq_len)
        model, opt_state, loss = step(model, opt_state, xs, targets)
        window.append(loss)
        if i % args.print_every == 0 or i == args.steps:
            mean = float(jnp.mean(jnp.stack(window)))
            toc = time.perf_counter()
            curve["step"].append(i)
            curve["loss"].append(mean)
            print(
                f"step {i:5d}  loss {mean:.4f}  (baseline {BASELINE:.3f})  "
                f"{1e3 * (toc - tic) / len(window):.1f} ms/step"
            )
            window, tic = [], toc
    if args.curve is not None:
        pathlib.Path(args.curve).write_text(json.dumps(dict(vars(args), **curve), indent=1))
    return mean


if __name__ == "__main__":
    main()
