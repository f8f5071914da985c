"""Benchmark D-RTRL against BPTT and a forward-only scan: time, compile time and XLA memory.

Usage:

    python benchmarks/bench_d_rtrl.py --quick               # < 2 min on a 2-core CPU
    python benchmarks/bench_d_rtrl.py --out results.json    # the full grid
    python benchmarks/bench_d_rtrl.py --braintrace-only     # only the braintrace comparison

For every (cell, hidden n, batch B, length T) it builds `model = cell + Linear readout` and
measures, each under `jax.jit`:

- `d_rtrl`:  `eqtrace.batch_grad(eqtrace.online_grad, ...)` (algorithm="d_rtrl"),
- `bptt`:    `eqtrace.batch_grad(eqtrace.bptt_grad, ...)`,
- `forward`: a vmapped `jax.lax.scan` of the model and the loss, no gradient.

Compile time is `jax.jit(f).lower(...)` (tracing; for D-RTRL it includes compiling the eqtrace
graph) plus `.compile()`; run time is the median wall time of several calls after one warm-up
call (`block_until_ready`); memory is `compiled.memory_analysis()` (temp, argument, output bytes).

If `braintrace` is importable (install it into a *separate* environment: `pip install
braintrace==0.2.6`, then run this script there with eqtrace on `PYTHONPATH`), a second section
times braintrace's `D_RTRL` (`braintrace.compile(...).etrace_grad`) on the same sizes.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
from _timing import benchmark_main, fmt_bytes, fmt_time, measure, ratio

import eqtrace
import eqtrace.nn as enn


N_IN, N_OUT = 32, 10


class Net(eqx.Module):
    """One recurrent cell and a Linear readout."""

    rnn: eqx.Module
    out: enn.Linear

    def __init__(self, cell: str, n_in: int, n: int, n_out: int, *, key):
        k1, k2 = jax.random.split(key)
        cls = {"gru": enn.GRUCell, "rnn": enn.VanillaRNNCell}[cell]
        self.rnn = cls(n_in, n, key=k1)
        self.out = enn.Linear(n, n_out, key=k2)

    def __call__(self, x, state):
        s = self.rnn(x, state["rnn"])
        return self.out(s.h), {"rnn": s}

    def init_state(self):
        return {"rnn": self.rnn.init_state()}


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def make_problem(cell, n, batch, T, seed=0, build=None):
    """`(model, states, xs, targets)`; `build(cell, n, key)` makes the model (default: `Net`)."""
    kx, ky, km = jax.random.split(jax.random.key(seed), 3)
    model = (build or (lambda c, n, key: Net(c, N_IN, n, N_OUT, key=key)))(cell, n, km)
    state = model.init_state()
    states = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), state)
    xs = jax.random.normal(kx, (batch, T, N_IN))
    targets = jax.random.normal(ky, (batch, T, N_OUT))
    return model, states, xs, targets


def make_fns(model, online=("d_rtrl",)):
    """The jitted-to-be functions of `(params, states, xs, targets)`: one per online algorithm in
    `online`, then `bptt` and `forward`."""
    params, static = eqx.partition(model, eqx.is_array)

    def online_fn(algorithm):
        def fn(params, states, xs, targets):
            m = eqx.combine(params, static)
            return eqtrace.batch_grad(eqtrace.online_grad, m, states, xs, targets, mse, algorithm=algorithm)

        return fn

    def bptt(params, states, xs, targets):
        m = eqx.combine(params, static)
        return eqtrace.batch_grad(eqtrace.bptt_grad, m, states, xs, targets, mse)

    def forward(params, states, xs, targets):
        m = eqx.combine(params, static)

        def one(state, xs, targets):
            def body(s, xt):
                y, s = m(xt[0], s)
                return s, mse(y, xt[1])

            return jax.lax.scan(body, state, (xs, targets))[1]

        return jnp.mean(jax.vmap(one)(states, xs, targets), axis=0)

    return params, {**{a: online_fn(a) for a in online}, "bptt": bptt, "forward": forward}


def grid(quick, cells=("gru", "rnn")):
    """(cell, n, batch, T, run): `run=False` means memory/compile only."""
    out = []
    for cell in cells:
        if quick:
            for batch in (1, 32):
                out.append((cell, 64, batch, 100, True))
                out.append((cell, 64, batch, 1000, False))
        else:
            for n in (64, 256):
                for batch in (1, 32):
                    for T in (100, 1000):
                        out.append((cell, n, batch, T, True))
    return out


def run_eqtrace(args):
    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time": args.min_time}
    results = []
    for cell, n, batch, T, run in grid(args.quick, args.cells.split(",")):
        model, states, xs, targets = make_problem(cell, n, batch, T)
        params, fns = make_fns(model)
        row = {"cell": cell, "n": n, "batch": batch, "T": T}
        t0 = time.perf_counter()
        for name, fn in fns.items():
            row[name] = measure(fn, (params, states, xs, targets), run=run, reps=reps)
        d, b, f = row["d_rtrl"], row["bptt"], row["forward"]
        print(
            f"[{time.perf_counter() - t0:6.1f}s] {cell} n={n} B={batch} T={T}: "
            f"time d_rtrl {fmt_time(d['time_s'])} bptt {fmt_time(b['time_s'])} fwd {fmt_time(f['time_s'])} | "
            f"temp d_rtrl {fmt_bytes(d['temp_bytes'])} bptt {fmt_bytes(b['temp_bytes'])} "
            f"fwd {fmt_bytes(f['temp_bytes'])} | compile d_rtrl {d['lower_s'] + d['compile_s']:.1f}s "
            f"bptt {b['lower_s'] + b['compile_s']:.1f}s",
            flush=True,
        )
        results.append(row)
    return results


def table(results):
    lines = [
        "| cell | n | B | T | D-RTRL time | BPTT time | fwd time | D-RTRL/BPTT | D-RTRL/fwd "
        "| D-RTRL temp | BPTT temp | fwd temp | compile D-RTRL / BPTT / fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, b, f = r["d_rtrl"], r["bptt"], r["forward"]
        c = " / ".join(f"{m['lower_s'] + m['compile_s']:.1f}s" for m in (d, b, f))
        lines.append(
            f"| {r['cell']} | {r['n']} | {r['batch']} | {r['T']} | {fmt_time(d['time_s'])} | "
            f"{fmt_time(b['time_s'])} | {fmt_time(f['time_s'])} | {ratio(d['time_s'], b['time_s'])} | "
            f"{ratio(d['time_s'], f['time_s'])} | {fmt_bytes(d['temp_bytes'])} | "
            f"{fmt_bytes(b['temp_bytes'])} | {fmt_bytes(f['temp_bytes'])} | {c} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Optional: braintrace's D_RTRL on the same sizes.


def run_braintrace(args, eq_results):
    """braintrace 0.2.6's `D_RTRL` in both of its modes, each next to the eqtrace window of the same
    kind (`single-step` and `window=0`; `multi-step` and `window=1`, eqtrace's default), all timed
    in one process."""
    try:
        from _braintrace import time_braintrace
    except ImportError:
        print("braintrace not importable: skipping the braintrace comparison.", flush=True)
        return None

    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time": args.min_time}
    T = 100
    cells = args.cells.split(",")
    sizes = [(c, n, b) for c in cells for n in ((64,) if args.quick else (64, 256)) for b in (1, 32)]
    out = []
    for cell, n, batch in sizes:
        model, states, xs, targets = make_problem(cell, n, batch, T)
        rules = {"w0": eqtrace.DRTRL(window=0), "w1": eqtrace.DRTRL(window=1)}
        params, fns = make_fns(model, online=tuple(rules.values()))
        rec = {"cell": cell, "n": n, "batch": batch, "T": T}
        for key, rule in rules.items():
            rec[f"eqtrace_{key}_s"] = measure(fns[rule], (params, states, xs, targets), run=True, reps=reps)[
                "time_s"
            ]
        for key, mode in (("single", "single-step"), ("multi", "multi-step")):
            bt, first, _ = time_braintrace(cell, N_IN, n, N_OUT, xs, targets, "D_RTRL", reps, vjp_method=mode)
            rec[f"braintrace_{key}_s"], rec[f"braintrace_{key}_first_call_s"] = bt, first
        print(
            f"{cell} n={n} B={batch}: window=0 {fmt_time(rec['eqtrace_w0_s'])} vs single-step "
            f"{fmt_time(rec['braintrace_single_s'])}; window=1 {fmt_time(rec['eqtrace_w1_s'])} vs multi-step "
            f"{fmt_time(rec['braintrace_multi_s'])}",
            flush=True,
        )
        out.append(rec)
    return out


def bt_table(rows):
    lines = [
        "| cell | n | B | T | eqtrace `window=0` | braintrace single-step | ratio | eqtrace `window=1` "
        "| braintrace multi-step | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['n']} | {r['batch']} | {r['T']} | {fmt_time(r['eqtrace_w0_s'])} | "
            f"{fmt_time(r['braintrace_single_s'])} | {ratio(r['eqtrace_w0_s'], r['braintrace_single_s'])} | "
            f"{fmt_time(r['eqtrace_w1_s'])} | {fmt_time(r['braintrace_multi_s'])} | "
            f"{ratio(r['eqtrace_w1_s'], r['braintrace_multi_s'])} |"
        )
    return "\n".join(lines)


def main():
    benchmark_main(
        __doc__.splitlines()[0],
        cells="gru,rnn",
        quick_help="n=64, B in {1,32}; T=100 timed, T=1000 memory only",
        reps=(5, 10, 2.0),
        run_eqtrace=run_eqtrace,
        table=table,
        run_braintrace=run_braintrace,
        bt_table=bt_table,
    )


if __name__ == "__main__":
    main()
