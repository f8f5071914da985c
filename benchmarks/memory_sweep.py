"""XLA temp memory vs sequence length T (compile only, nothing is run).

Usage:

    PYTHONPATH=. python benchmarks/memory_sweep.py --out benchmarks/results-memory-2cpu.json

For each model family in `--cells` at hidden `--n` and batch `--batch`, lowers and compiles
ES-D-RTRL, D-RTRL, BPTT and the forward scan (the functions of `bench_es_d_rtrl.py`) for each T in
`--Ts`, and records `compiled.memory_analysis()` temp bytes. `plot.py` draws it.
"""

import argparse
import json

import jax
from _timing import fmt_bytes, measure
from bench_d_rtrl import make_fns, make_problem
from bench_es_d_rtrl import ALGOS, build


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="gru,lif")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--Ts", default="10,30,100,300,1000,3000")
    p.add_argument("--out", default="benchmarks/results-memory-2cpu.json")
    args = p.parse_args()
    rows = []
    for cell in args.cells.split(","):
        for T in (int(t) for t in args.Ts.split(",")):
            model, states, xs, targets = make_problem(cell, args.n, args.batch, T, build=build)
            params, fns = make_fns(model, online=("es_d_rtrl", "d_rtrl"))
            row = {"cell": cell, "n": args.n, "batch": args.batch, "T": T}
            for a in ALGOS:
                row[a] = measure(fns[a], (params, states, xs, targets), run=False, reps=None)
            print(
                f"{cell} T={T}: " + " ".join(f"{a} {fmt_bytes(row[a]['temp_bytes'])}" for a in ALGOS),
                flush=True,
            )
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump(
            {"meta": {"jax": jax.__version__, "backend": jax.default_backend()}, "rows": rows}, f, indent=1
        )


if __name__ == "__main__":
    main()
