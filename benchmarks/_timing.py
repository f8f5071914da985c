"""Shared helpers for the benchmarks: timing, compile time, XLA memory, and formatting."""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax


def time_calls(call, *, min_reps, max_reps, min_time):
    """Median wall time of `call()` after two warm-up calls: at least `min_reps` calls, more
    (up to `max_reps`) while the total is under `min_time` seconds. A call slower than
    `min_time` (the second warm-up call, already compiled) is timed once: that call is the result.
    (A process's first calls of a new executable can take up to twice as long: its buffers are
    first touched then.)"""
    jax.block_until_ready(call())  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    if first > min_time:
        return first, 1
    times = []
    while len(times) < min_reps or (len(times) < max_reps and sum(times) < min_time):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def machine_meta(**extra) -> dict:
    """What a result file records of the software and the machine, with `extra`."""
    import equinox as eqx

    return {
        "jax": jax.__version__,
        "eqx": eqx.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **extra,
    }


def compile_timed(fn, args):
    """Lower + compile `jax.jit(fn)` on `args`: the compiled function, and a record of the lowering
    and compile times and XLA's memory analysis (`time_s` still `None`)."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    rec = {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "argument_bytes": int(mem.argument_size_in_bytes) if mem is not None else None,
        "output_bytes": int(mem.output_size_in_bytes) if mem is not None else None,
        "time_s": None,
        "reps": 0,
    }
    return compiled, rec


def measure(fn, args, *, run, reps):
    """`compile_timed`, then, if `run`, the compiled function timed with `time_calls(**reps)`."""
    compiled, rec = compile_timed(fn, args)
    if run:
        rec["time_s"], rec["reps"] = time_calls(lambda: compiled(*args), **reps)
    return rec


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def fmt_time(t):
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def compile_s(rec):
    return rec["lower_s"] + rec["compile_s"]


def benchmark_main(description, *, cells, quick_help, reps, run_eqtrace, table, run_braintrace, bt_table):
    """The command line shared by the benchmark scripts: parse the options, print the machine, run
    eqtrace's grid and (unless told not to) braintrace's, print both tables, write `--out`."""

    min_reps, max_reps, min_time = reps
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--cells", default=cells, help=f"comma-separated subset of {cells}")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--min-reps", type=int, default=min_reps, help="timed calls at least (after one warm-up)")
    p.add_argument("--max-reps", type=int, default=max_reps, help="timed calls at most")
    p.add_argument(
        "--min-time", type=float, default=min_time, help="keep timing (up to --max-reps) for this many s"
    )
    p.add_argument("--no-braintrace", action="store_true", help="skip the braintrace comparison")
    p.add_argument("--braintrace-only", action="store_true", help="only the braintrace comparison")
    args = p.parse_args()

    meta = machine_meta(quick=args.quick)
    print(json.dumps(meta), flush=True)
    t0 = time.perf_counter()
    results = [] if args.braintrace_only else run_eqtrace(args)
    meta["eqtrace_grid_s"] = time.perf_counter() - t0
    if results:
        print(f"\neqtrace grid took {meta['eqtrace_grid_s']:.0f}s\n")
        print(table(results))
    bt = None
    if not args.no_braintrace:
        bt = run_braintrace(args, results)
        if bt:
            print()
            print(bt_table(bt))
    meta["total_s"] = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "eqtrace": results, "braintrace": bt}, f, indent=1)
