"""Benchmark ES-D-RTRL (pp_prop) next to D-RTRL, BPTT and a forward-only scan: time, compile
time and XLA memory, for GRU / vanilla RNN cells and a recurrent LIF spiking network.

Usage:

    python benchmarks/bench_es_d_rtrl.py --quick               # n=64 only
    python benchmarks/bench_es_d_rtrl.py --out results.json    # the full grid
    PYTHONPATH=. /tmp/bt-venv/bin/python benchmarks/bench_es_d_rtrl.py --braintrace-only

Models (input 32, output 10, MSE on every step): `gru` / `rnn` are `bench_d_rtrl.Net`
(cell + Linear readout); `lif` is `RecurrentSpikingLayer(32, n, neuron="lif")` → spikes →
`Linear(n, 10)`. Grid: n ∈ {64, 256}, B ∈ {1, 32}, T ∈ {100, 1000}. Per configuration, each under
`jax.jit`: `es_d_rtrl`, `es_pp` (`ESDRTRL(window=0, exact_step=False)`) and `d_rtrl`
(`eqtrace.batch_grad(eqtrace.online_grad, ..., algorithm=...)`, decay 0.9), `bptt`
(`batch_grad(bptt_grad, ...)`) and `forward` (vmapped `lax.scan` of model + loss). Timing /
memory as in `bench_d_rtrl.py` (shared helpers in `_timing.py`).

With braintrace importable (see README), a second section times braintrace 0.2.6's
`pp_prop` (= `ES_D_RTRL`, decay 0.9) on the GRU/RNN sizes at T=100, in both of its modes, each next
to the eqtrace rules of the same kind (`single-step`: `exact_step=False`, the same estimate, and
`window=0`; `multi-step`: `window=1`).
"""

import time

import equinox as eqx
import jax
from _timing import benchmark_main, compile_s, fmt_bytes, fmt_time, measure, ratio
from bench_d_rtrl import make_fns, make_problem, N_IN, N_OUT, Net

import eqtrace
import eqtrace.nn as enn


ALGOS = ("es_d_rtrl", "d_rtrl", "bptt", "forward")  # shared with `memory_sweep.py` and `scale.py`
# ES-D-RTRL with the step's own term estimated from its traces, as pp_prop's single-step mode does.
PP = eqtrace.ESDRTRL(window=0, exact_step=False)
GRID = ("es_d_rtrl", "es_pp", "d_rtrl", "bptt", "forward")


class LIFNet(eqx.Module):
    """Recurrent LIF layer → spikes → Linear readout."""

    layer: enn.RecurrentSpikingLayer
    out: enn.Linear

    def __init__(self, n_in, n, n_out, *, key):
        k1, k2 = jax.random.split(key)
        self.layer = enn.RecurrentSpikingLayer(n_in, n, neuron="lif", key=k1)
        self.out = enn.Linear(n, n_out, key=k2)

    def __call__(self, x, state):
        s = self.layer(x, state["layer"])
        return self.out(self.layer.spike(s)), {"layer": s}

    def init_state(self):
        return {"layer": self.layer.init_state()}


def build(cell, n, key):
    if cell == "lif":
        return LIFNet(N_IN, n, N_OUT, key=key)
    return Net(cell, N_IN, n, N_OUT, key=key)


def grid(args):
    cells = args.cells.split(",")
    ns = (64,) if args.quick else (64, 256)
    return [(c, n, b, T) for c in cells for n in ns for b in (1, 32) for T in (100, 1000)]


def run_eqtrace(args):
    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time": args.min_time}
    results = []
    for cell, n, batch, T in grid(args):
        model, states, xs, targets = make_problem(cell, n, batch, T, build=build)
        params, fns = make_fns(model, online=("es_d_rtrl", PP, "d_rtrl"))
        fns["es_pp"] = fns[PP]
        row = {"cell": cell, "n": n, "batch": batch, "T": T}
        t0 = time.perf_counter()
        for name in GRID:
            row[name] = measure(fns[name], (params, states, xs, targets), run=True, reps=reps)
        print(
            f"[{time.perf_counter() - t0:6.1f}s] {cell} n={n} B={batch} T={T}: time "
            + " ".join(f"{a} {fmt_time(row[a]['time_s'])}" for a in GRID)
            + " | temp "
            + " ".join(f"{a} {fmt_bytes(row[a]['temp_bytes'])}" for a in GRID),
            flush=True,
        )
        results.append(row)
    return results


def table(results):
    lines = [
        "| cell | n | B | T | ES time | ES pp time | D-RTRL time | BPTT time | fwd time | ES/BPTT "
        "| ES pp/BPTT | ES/fwd | ES pp/fwd | D-RTRL/BPTT | ES temp | D-RTRL temp | BPTT temp | fwd temp "
        "| compile ES / ES pp / D / BPTT / fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e, p, d, b, f = (r[a] for a in GRID)
        c = " / ".join(f"{compile_s(m):.1f}s" for m in (e, p, d, b, f))
        lines.append(
            f"| {r['cell']} | {r['n']} | {r['batch']} | {r['T']} | "
            + " | ".join(fmt_time(m["time_s"]) for m in (e, p, d, b, f))
            + f" | {ratio(e['time_s'], b['time_s'])} | {ratio(p['time_s'], b['time_s'])} | "
            f"{ratio(e['time_s'], f['time_s'])} | {ratio(p['time_s'], f['time_s'])} | "
            f"{ratio(d['time_s'], b['time_s'])} | "
            + " | ".join(fmt_bytes(m["temp_bytes"]) for m in (e, d, b, f))
            + f" | {c} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Optional: braintrace's pp_prop (ES_D_RTRL) on the same GRU/RNN sizes.


def run_braintrace(args, eq_results):
    """braintrace 0.2.6's `pp_prop` in both of its modes, each next to the eqtrace window of the
    same kind (the learning signal through the per-position diagonal, `single-step` and
    `window=0`, or back-propagated exactly through one step, `multi-step` and `window=1`, eqtrace's
    default), all timed in one process."""
    try:
        from _braintrace import time_braintrace
    except ImportError:
        print("braintrace not importable: skipping the braintrace comparison.", flush=True)
        return None

    import eqtrace

    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time": args.min_time}
    T = 100
    ns = (64,) if args.quick else (64, 256)
    out = []
    for cell in [c for c in args.cells.split(",") if c in ("gru", "rnn")]:
        for n in ns:
            for batch in (1, 32):
                model, states, xs, targets = make_problem(cell, n, batch, T, build=build)
                rules = {"pp": PP, "w0": eqtrace.ESDRTRL(window=0), "w1": eqtrace.ESDRTRL(window=1)}
                params, fns = make_fns(model, online=tuple(rules.values()))
                rec = {"cell": cell, "n": n, "batch": batch, "T": T}
                problem = (params, states, xs, targets)
                for key, fn in [*((k, fns[r]) for k, r in rules.items()), ("bptt", fns["bptt"])]:
                    rec[f"eqtrace_{key}_s"] = measure(fn, problem, run=True, reps=reps)["time_s"]
                for key, mode in (("single", "single-step"), ("multi", "multi-step")):
                    bt, first, nrep = time_braintrace(
                        cell, N_IN, n, N_OUT, xs, targets, "pp_prop", reps, decay_or_rank=0.9, vjp_method=mode
                    )
                    rec[f"braintrace_{key}_s"], rec[f"braintrace_{key}_first_call_s"] = bt, first
                print(
                    f"{cell} n={n} B={batch}: exact_step=False {fmt_time(rec['eqtrace_pp_s'])}, "
                    f"window=0 {fmt_time(rec['eqtrace_w0_s'])} vs single-step "
                    f"{fmt_time(rec['braintrace_single_s'])}; window=1 {fmt_time(rec['eqtrace_w1_s'])} vs "
                    f"multi-step {fmt_time(rec['braintrace_multi_s'])}",
                    flush=True,
                )
                out.append(rec)
    return out


def bt_table(rows):
    lines = [
        "| cell | n | B | T | braintrace single-step | eqtrace `exact_step=False` | ratio "
        "| eqtrace `window=0` | ratio | braintrace multi-step | eqtrace `window=1` | ratio | eqtrace BPTT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        single, multi = r["braintrace_single_s"], r["braintrace_multi_s"]
        lines.append(
            f"| {r['cell']} | {r['n']} | {r['batch']} | {r['T']} | {fmt_time(single)} | "
            f"{fmt_time(r['eqtrace_pp_s'])} | {ratio(r['eqtrace_pp_s'], single)} | "
            f"{fmt_time(r['eqtrace_w0_s'])} | {ratio(r['eqtrace_w0_s'], single)} | {fmt_time(multi)} | "
            f"{fmt_time(r['eqtrace_w1_s'])} | {ratio(r['eqtrace_w1_s'], multi)} | "
            f"{fmt_time(r['eqtrace_bptt_s'])} |"
        )
    return "\n".join(lines)


def main():
    benchmark_main(
        __doc__.splitlines()[0],
        cells="gru,rnn,lif",
        quick_help="n=64 only",
        reps=(3, 7, 1.5),
        run_eqtrace=run_eqtrace,
        table=table,
        run_braintrace=run_braintrace,
        bt_table=bt_table,
    )


if __name__ == "__main__":
    main()
