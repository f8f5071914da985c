"""Shared helpers for the benchmarks: timing, compile time, XLA memory, and formatting."""

import statistics
import time

import jax


def time_calls(call, *, min_reps, max_reps, min_time):
    """Median wall time of `call()` after one warm-up call: at least `min_reps` calls, more
    (up to `max_reps`) while the total is under `min_time` seconds. A call slower than
    `min_time` (the warm-up call, already compiled) is timed once: the warm-up is the result."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())  # warm-up
    first = time.perf_counter() - t0
    if first > min_time:
        return first, 1
    times = []
    while len(times) < min_reps or (len(times) < max_reps and sum(times) < min_time):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def measure(fn, args, *, run, reps):
    """Lower + compile `jax.jit(fn)` on `args` (timed separately), read its memory analysis and,
    if `run`, time the compiled function with `time_calls(**reps)`."""
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
