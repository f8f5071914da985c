"""Loss curves of `examples/adding_problem.py` trained with D-RTRL, ES-D-RTRL and BPTT.

Usage:

    python benchmarks/adding_curves.py --out benchmarks/results-adding-2cpu.json
    python benchmarks/plot.py    # draws docs/images/adding-problem-loss.png from that JSON

Reuses the example's model, data, loss and training step (`make_step`, whose non-BPTT branch takes
any online algorithm name), with the example's defaults (T=50, hidden 64, batch 64, Adam 3e-3) but
2000 steps, and records the loss of every step (the example itself prints only windowed means).
"""

import argparse
import json
import pathlib
import sys
import time

import equinox as eqx
import jax
import optax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import adding_problem as ap  # noqa: E402


def train(algorithm, steps, seq_len, hidden, batch, lr, seed):
    mkey, dkey = jax.random.split(jax.random.key(seed))
    model = ap.GRURegressor(2, hidden, 1, key=mkey)
    optim = optax.adam(lr)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    step = ap.make_step(optim, algorithm)
    losses = []
    tic = time.perf_counter()
    for key in jax.random.split(dkey, steps):
        xs, targets = ap.adding_batch(key, batch, seq_len)
        model, opt_state, loss = step(model, opt_state, xs, targets)
        losses.append(loss)
    losses = [float(x) for x in jax.device_get(losses)]
    return losses, time.perf_counter() - tic


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", default="d_rtrl,es_d_rtrl,bptt")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results-adding-2cpu.json")
    args = p.parse_args()
    cfg = {k: getattr(args, k) for k in ("steps", "seq_len", "hidden", "batch", "lr", "seed")}
    out = {"config": {**cfg, "baseline": ap.BASELINE, "jax": jax.__version__}, "losses": {}, "wall_s": {}}
    for algo in args.algorithms.split(","):
        losses, wall = train(algo, **cfg)
        tail = losses[-250:]
        print(
            f"{algo}: {wall:.0f}s, mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}",
            flush=True,
        )
        out["losses"][algo], out["wall_s"][algo] = losses, wall
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
