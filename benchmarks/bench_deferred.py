"""ES-D-RTRL with its weight gradients dense at every step, next to the same gradients deferred as
factors and contracted in chunks of steps: time and XLA temp memory, in one process.

Usage:

    PYTHONPATH=. python benchmarks/bench_deferred.py                     # n=64,256, B=1,32, windows 0,1
    PYTHONPATH=. python benchmarks/bench_deferred.py --rows 0,64,256,1024  # tune the contraction length

Model: `bench_d_rtrl.Net` (GRU + Linear readout), input 32, output 10, MSE on every step, T = 100.
Each function is `eqtrace.batch_grad(eqtrace.online_grad, ..., algorithm=eqtrace.ESDRTRL(window=w))`
under `jax.jit`, compiled once per value of `eqtrace._algorithms._drivers.CONTRACTION_ROWS` (`0`:
every weight gradient dense at every step). The variants are timed in turns (`--rounds`), each turn the
median of at least five calls after a warm-up; the time reported is the median over the turns.
"""

import argparse
import json
import statistics

from _timing import compile_timed, fmt_bytes, fmt_time, machine_meta, time_calls
from bench_d_rtrl import make_fns, make_problem

import eqtrace
from eqtrace._algorithms import _drivers


def compiled_variant(model, rule, rows, args):
    """The compiled gradient with `CONTRACTION_ROWS = rows` (a fresh function, traced anew)."""
    before = _drivers.CONTRACTION_ROWS
    _drivers.CONTRACTION_ROWS = rows
    try:
        params, fns = make_fns(model, online=(rule,))
        return compile_timed(fns[rule], (params, *args))
    finally:
        _drivers.CONTRACTION_ROWS = before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="64,256")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--windows", default="0,1")
    parser.add_argument("--rows", default="0,256", help="values of CONTRACTION_ROWS; 0 is dense")
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    reps = {"min_reps": 5, "max_reps": 7, "min_time": 0.5}
    results = []
    for n in map(int, args.n.split(",")):
        for batch in map(int, args.batch.split(",")):
            model, states, xs, targets = make_problem("gru", n, batch, args.T)
            for window in map(int, args.windows.split(",")):
                rule = eqtrace.ESDRTRL(window=window)
                variants = {r: compiled_variant(model, rule, r, (states, xs, targets)) for r in rows_list}
                params = make_fns(model, online=(rule,))[0]
                times: dict = {r: [] for r in rows_list}
                for _ in range(args.rounds):
                    for r, (compiled, _) in variants.items():
                        t, _ = time_calls(lambda: compiled(params, states, xs, targets), **reps)
                        times[r].append(t)
                row = {"n": n, "batch": batch, "window": window, "T": args.T}
                for r, (_, rec) in variants.items():
                    rec["time_s"] = statistics.median(times[r])
                    rec["round_times_s"] = times[r]
                    row[str(r)] = rec
                cells = [f"rows={r}: {fmt_time(row[str(r)]['time_s'])}, temp " for r in rows_list]
                cells = [c + fmt_bytes(row[str(r)]["temp_bytes"]) for c, r in zip(cells, rows_list)]
                print(f"n={n} B={batch} window={window}: " + " | ".join(cells), flush=True)
                results.append(row)
    print(table(results, rows_list))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": machine_meta(), "results": results}, f, indent=1)


def table(results, rows_list) -> str:
    head = " | ".join(f"rows={r} time | rows={r} temp" for r in rows_list)
    lines = [
        f"| n | B | window | {head} | speed-up (rows={rows_list[0]} / rows={rows_list[-1]}) |",
        "|---" * (4 + 2 * len(rows_list)) + "|",
    ]
    for row in results:
        cells = " | ".join(
            f"{fmt_time(row[str(r)]['time_s'])} | {fmt_bytes(row[str(r)]['temp_bytes'])}" for r in rows_list
        )
        first, last = row[str(rows_list[0])]["time_s"], row[str(rows_list[-1])]["time_s"]
        lines.append(f"| {row['n']} | {row['batch']} | {row['window']} | {cells} | {first / last:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
