"""Per-step cost of learning from a stream with `eqtrace.Stream`, against the model's own step.

Usage:

    python benchmarks/streaming.py                                   # hidden 8, 64, 256; ~1 min
    python benchmarks/streaming.py --out benchmarks/results-streaming-2cpu.json

Model: a GRU cell (input 32, hidden n) and a Linear readout (10), MSE on every step, one stream
(no batch), D-RTRL, Adam. Each variant runs `--steps` steps in a Python loop, its outputs fed back
as the next call's inputs, and the per-step time is the loop's wall time over `--steps` (the
fastest and the median of `--repeats` loops, the variants taking turns, after a warm-up loop;
`block_until_ready` on the last outputs only, so JAX's asynchronous dispatch overlaps the calls as
it would on a live stream):

- `model`:              `eqx.filter_jit` of `model(x, state)`: the forward step alone, no learning,
- `model_jax`:          the same under `jax.jit` of the model's array leaves,
- `rule_step`:          `eqx.filter_jit(eqtrace.d_rtrl_step)`: the rule's step, gradient not applied,
- `stream`:             `eqx.filter_jit(stream.step)`, Adam on every step,
- `stream_donate`:      the same with `donate="all-except-first"`,
- `stream_jax`:         `jax.jit` of `stream.step` over the weights' array leaves (partitioned once,
                        outside the loop), weights and carry donated,
- `stream_jax_every10`: the same with Adam every 10 steps,
- `es_stream_jax`, `es_stream_jax_every10`: the same two with ES-D-RTRL (decay 0.9),
- `stream_chunk10`:     10 steps per call, `jax.lax.scan`-ed inside one jitted function,
- `model_scan`, `stream_scan`: the forward step and the stream's step under one `jax.lax.scan` of
  all `--steps` steps: the compute alone, without dispatch.
"""

import argparse
import json
import os
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import machine_meta

import eqtrace
import eqtrace.nn as enn


N_IN, N_OUT = 32, 10


class Net(eqx.Module):
    rnn: enn.GRUCell
    out: enn.Linear

    def __init__(self, n, *, key):
        k1, k2 = jax.random.split(key)
        self.rnn = enn.GRUCell(N_IN, n, key=k1)
        self.out = enn.Linear(n, N_OUT, key=k2)

    def __call__(self, x, state):
        state = self.rnn(x, state)
        return self.out(state.h), state

    def init_state(self):
        return self.rnn.init_state()


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def per_step(loops, steps, repeats):
    """Wall time per step of each `loops[name]()` (which runs `steps` steps and returns its last
    outputs): the fastest and the median of `repeats` timed loops after a warm-up loop. The
    variants take turns, so that a change in the machine's load hits them alike; on a shared
    machine other processes only ever add time, so the fastest loop is the better estimate."""
    for loop in loops.values():
        jax.block_until_ready(loop())  # warm-up: compiles
    times = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            jax.block_until_ready(loop())
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: {"min_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}


def run(n, steps, repeats):
    model = Net(n, key=jax.random.key(0))
    state = model.init_state()
    kx, kt = jax.random.split(jax.random.key(1))
    xs, targets = jax.random.normal(kx, (steps, N_IN)), jax.random.normal(kt, (steps, N_OUT))
    # One NumPy array per step, as a live source hands them over (slicing `xs[t]` in the loop would
    # add a dispatch of its own to every step, and donated device arrays could not be fed twice).
    x_list, t_list = list(np.asarray(xs)), list(np.asarray(targets))
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    arrays, static = eqx.partition(model, eqx.is_array)

    def fresh(tree):  # new buffers: donation deletes those passed in (a carry holds `state` itself)
        return jax.tree.map(lambda a: jnp.copy(a) if eqx.is_array(a) else a, tree)

    # The forward step alone.
    fwd = eqx.filter_jit(lambda m, x, s: m(x, s))
    fwd_jax = jax.jit(lambda w, x, s: eqx.combine(w, static)(x, s))

    def loop_model():
        s = state
        for x in x_list:
            y, s = fwd(model, x, s)
        return y, s

    def loop_model_jax():
        s = state
        for x in x_list:
            y, s = fwd_jax(arrays, x, s)
        return y, s

    # D-RTRL's pure step, gradient not applied.
    rule_step = eqx.filter_jit(eqtrace.d_rtrl_step)

    def loop_rule():
        traces = eqtrace.d_rtrl_init(graph, model, state)
        for x, t in zip(x_list, t_list):
            traces, y, loss, grads = rule_step(graph, model, traces, x, t, mse)
        return traces, grads

    def filter_jit_loop(every, **jit_options):
        stream = eqtrace.Stream(graph, mse, optax.adam(1e-3), every=every)
        step = eqx.filter_jit(stream.step, **jit_options)

        def loop():
            params, carry = fresh((model, stream.init(model, state)))
            for x, t in zip(x_list, t_list):
                params, carry, y, loss = step(params, carry, x, t)
            return params, carry

        return loop

    def jax_jit_loop(every, algorithm="d_rtrl"):
        """The weights partitioned once and carried as arrays; `jax.jit` flattens the arguments in
        C++, where `eqx.filter_jit` partitions them in Python on every call."""
        stream = eqtrace.Stream(graph, mse, optax.adam(1e-3), algorithm, every=every)

        def step(arrays, carry, x, t):
            params, carry, y, loss = stream.step(eqx.combine(arrays, static), carry, x, t)
            return eqx.filter(params, eqx.is_array), carry, y, loss

        step = jax.jit(step, donate_argnums=(0, 1))

        def loop():
            a, carry = fresh((arrays, stream.init(model, state)))
            for x, t in zip(x_list, t_list):
                a, carry, y, loss = step(a, carry, x, t)
            return a, carry

        return loop

    def chunk_loop(chunk, every):
        """`chunk` steps per call, scanned inside one jitted function (for a source that delivers
        its samples in blocks)."""
        stream = eqtrace.Stream(graph, mse, optax.adam(1e-3), every=every)

        def steps_of(arrays, carry, xs, ts):
            def body(c, xt):
                a, carry = c
                params, carry, y, loss = stream.step(eqx.combine(a, static), carry, *xt)
                return (eqx.filter(params, eqx.is_array), carry), loss

            return jax.lax.scan(body, (arrays, carry), (xs, ts))

        steps_of = jax.jit(steps_of, donate_argnums=(0, 1))
        blocks = [
            (np.asarray(xs[i : i + chunk]), np.asarray(targets[i : i + chunk]))
            for i in range(0, steps, chunk)
        ]

        def loop():
            c = fresh((arrays, stream.init(model, state)))
            for bx, bt in blocks:
                c, losses = steps_of(*c, bx, bt)
            return c

        return loop

    @jax.jit
    def model_scan(w, xs):
        def body(s, x):
            y, s = eqx.combine(w, static)(x, s)
            return s, y

        return jax.lax.scan(body, state, xs)

    variants = {
        "model": loop_model,
        "model_jax": loop_model_jax,
        "rule_step": loop_rule,
        "stream": filter_jit_loop(1),
        "stream_donate": filter_jit_loop(1, donate="all-except-first"),
        "stream_jax": jax_jit_loop(1),
        "stream_jax_every10": jax_jit_loop(10),
        "es_stream_jax": jax_jit_loop(1, eqtrace.ESDRTRL()),
        "es_stream_jax_every10": jax_jit_loop(10, eqtrace.ESDRTRL()),
        "stream_chunk10": chunk_loop(10, 1),
        "model_scan": lambda: model_scan(arrays, xs),
        "stream_scan": chunk_loop(steps, 1),
    }
    return {"n": n, "steps": steps, **per_step(variants, steps, repeats)}


def table(rows):
    names = [
        "model",
        "model_jax",
        "rule_step",
        "stream",
        "stream_donate",
        "stream_jax",
        "stream_jax_every10",
        "es_stream_jax",
        "es_stream_jax_every10",
        "stream_chunk10",
        "model_scan",
        "stream_scan",
    ]
    lines = [
        "| n | " + " | ".join(names) + " | stream / model | stream_jax / model_jax |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for r in rows:
        us = lambda k: f"{r[k]['min_s'] * 1e6:.0f} µs"  # noqa: E731
        lines.append(
            f"| {r['n']} | "
            + " | ".join(us(k) for k in names)
            + f" | {r['stream']['min_s'] / r['model']['min_s']:.2f} | "
            f"{r['stream_jax']['min_s'] / r['model_jax']['min_s']:.2f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", default="8,64,256", help="comma-separated hidden sizes")
    p.add_argument("--steps", type=int, default=200, help="steps per timed loop")
    p.add_argument("--repeats", type=int, default=7, help="timed loops per variant (fastest, median)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    meta = machine_meta(load_average=os.getloadavg())
    print(json.dumps(meta), flush=True)
    rows = []
    for n in (int(s) for s in args.hidden.split(",")):
        rows.append(run(n, args.steps, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
