"""How BPTT, D-RTRL and ES-D-RTRL scale with hidden size n, batch B and sequence length T, and what
they cost on a paper-sized spiking network.

Usage:

    PYTHONPATH=. python benchmarks/scale.py                 # ~10 min on a 2-core CPU
    PYTHONPATH=. python benchmarks/scale.py --parts sweep   # rerun one part, keep the others
    PYTHONPATH=. python benchmarks/scale.py --quick --out /tmp/scale.json   # tiny sizes, seconds
    python benchmarks/scale.py --report     # tables, and docs/images/scale-*.png (matplotlib)

Four parts, each written to `--out` as soon as a row is done, so that the JSON is whole at every
moment (`--parts` reruns some and keeps the others):

- `memory`: XLA memory (`compiled.memory_analysis()`: temp, argument, output bytes) of one jitted
  gradient call, compile only, over the full grid n ∈ {64, 256, 1024, 2048} × B ∈ {1, 32, 256} ×
  T ∈ {100, 1000, 10000} (the GRU + Linear readout of `bench_d_rtrl.py`; the arguments are
  `jax.ShapeDtypeStruct`s, nothing is allocated or run).
- `sweep`: wall time around the base point n = 256, B = 32, T = 1000, one axis at a time. A call is
  run only if its predicted wall time is under `--max-run-s` (20 s) and its XLA memory under
  `--max-run-bytes`. The prediction scales the last timed point of the axis by n² · B · T, or
  where there is none, one call on a twentieth of the sequence. Along n and B a call predicted too
  long is timed on a shorter sequence (`timed_T`; time per step hardly depends on T, the T axis
  shows it); along T it is "not timed".
- `paper`: three `RecurrentSpikingLayer`s of 512 LIF neurons stacked, a Linear readout of the last
  layer's spikes, B = 128: memory at T = 1000 (compile only), time per step at T = 20, and the size
  of D-RTRL's traces (analytic, checked against `jax.eval_shape` of the traces the rule returns).
- `oom`: the paper network's memory at growing T, compile only, up to the first T where BPTT's XLA
  memory exceeds this machine's RAM; the online rules at the same T.

Rules (names as in the other benchmarks): `es_d_rtrl`, `d_rtrl` (`eqtrace.batch_grad(
eqtrace.online_grad, ..., algorithm=...)`), `bptt` (`batch_grad(bptt_grad, ...)`, the gradient of
the batch-mean loss) and `forward` (a vmapped `lax.scan` of model + loss, no gradient). Time is the
median after one warm-up call (`_timing.time_calls`), compile time is recorded separately, and
every row records `os.getloadavg()`: the machine may be shared, and a loaded machine runs slower.
"""

import argparse
import json
import os
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from _timing import compile_timed, fmt_bytes, fmt_time, machine_meta, measure, ratio, time_calls
from bench_d_rtrl import make_fns, make_problem, mse, N_IN, N_OUT
from bench_es_d_rtrl import ALGOS, build

import eqtrace
import eqtrace.nn as enn


HERE = pathlib.Path(__file__).resolve().parent
AXES = ("n", "batch", "T")
PARTS = ("memory", "sweep", "paper", "oom")
FULL = {
    "n": (64, 256, 1024, 2048),
    "batch": (1, 32, 256),
    "T": (100, 1000, 10000),
    "base": {"n": 256, "batch": 32, "T": 1000},
    "paper": {"layers": 3, "n": 512, "batch": 128, "T": 1000, "time_T": 20},
    "oom_Ts": (1000, 2000, 4000, 6000, 8000),
}
QUICK = {
    "n": (16,),
    "batch": (4,),
    # Both at least ES-D-RTRL's chunk of deferred weight gradients (32 steps at B = 4), which its
    # memory holds whatever the sequence's length beyond it.
    "T": (64, 640),
    "base": {"n": 16, "batch": 4, "T": 20},
    "paper": {"layers": 3, "n": 16, "batch": 4, "T": 20, "time_T": 20},
    "oom_Ts": (20,),
}


# ---------------------------------------------------------------------------------------------
# The paper-sized network.


class StackedLIF(eqx.Module):
    """Recurrent LIF layers stacked, each fed the previous layer's spikes; a Linear readout of the
    last layer's spikes."""

    layers: tuple[enn.RecurrentSpikingLayer, ...]
    out: enn.Linear

    def __init__(self, n_in, n, n_out, layers, *, key):
        keys = jax.random.split(key, layers + 1)
        sizes = (n_in,) + (n,) * (layers - 1)
        self.layers = tuple(enn.RecurrentSpikingLayer(i, n, neuron="lif", key=k) for i, k in zip(sizes, keys))
        self.out = enn.Linear(n, n_out, key=keys[-1])

    def __call__(self, x, state):
        new = []
        for layer, s in zip(self.layers, state["layers"]):
            s = layer(x, s)
            x = layer.spike(s)
            new.append(s)
        return self.out(x), {"layers": tuple(new)}

    def init_state(self):
        return {"layers": tuple(layer.init_state() for layer in self.layers)}


def d_rtrl_trace_bytes(n_in, n, layers, batch, itemsize=4):
    """Bytes of D-RTRL's traces of `StackedLIF` for `batch` examples, analytically: per layer and
    example, its weight `(I + n) × n` and bias `n`, times one state (`V`) per LIF neuron."""
    inputs = (n_in,) + (n,) * (layers - 1)
    return batch * itemsize * sum((i + n) * n + n for i in inputs)


def eval_shape_trace_bytes(model, states, xs, targets):
    """The size of D-RTRL's eligibility traces (`eps`, without the hidden state) after a call, from
    `jax.eval_shape` (nothing is run)."""
    params, static = eqx.partition(model, eqx.is_array)

    def fn(params, states, xs, targets):
        m = eqx.combine(params, static)
        return eqtrace.batch_grad(
            eqtrace.online_grad, m, states, xs, targets, mse, algorithm="d_rtrl", return_traces=True
        )[2]

    traces = jax.eval_shape(fn, params, states, xs, targets)
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(traces.eps))


def problem_shapes(model, batch, T):
    """`(states, xs, targets)` as `jax.ShapeDtypeStruct`s: enough to lower and compile."""
    states = jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch,) + a.shape, a.dtype), model.init_state())
    dtype = jnp.result_type(float)  # as `make_problem`'s data
    return (
        states,
        jax.ShapeDtypeStruct((batch, T, N_IN), dtype),
        jax.ShapeDtypeStruct((batch, T, N_OUT), dtype),
    )


def paper_model(cfg, seed=0):
    return StackedLIF(N_IN, cfg["n"], N_OUT, cfg["layers"], key=jax.random.key(seed))


# ---------------------------------------------------------------------------------------------
# Measuring.


def memory_only(fns, params, shapes):
    return {a: measure(fns[a], (params, *shapes), run=False, reps=None) for a in ALGOS}


def row_head(**kw):
    return {**kw, "loadavg": list(os.getloadavg())}


def predicted_s(ref, point):
    """Wall time of a call at `point`, from the timed call `ref`: cost ∝ n² · B · T."""
    if ref is None:
        return None
    return (
        ref["time_s"]
        * (point["n"] / ref["n"]) ** 2
        * (point["batch"] / ref["batch"])
        * (point["T"] / ref["T"])
    )


def timed(fn, args, *, predicted, reps, max_run_s, max_run_bytes):
    """`_timing.measure`, compiling once, with a run only when the call is predicted to be
    affordable in time (`predicted` seconds; `None`: from one call on a twentieth of the sequence)
    and XLA memory; else the reason is in `not_timed`."""
    compiled, rec = compile_timed(fn, args)
    rec.update(predicted_s=predicted, not_timed=None)
    need = rec["temp_bytes"] + rec["argument_bytes"] + rec["output_bytes"]
    T = args[2].shape[1]
    if predicted is None and T > 20 and need <= max_run_bytes:
        # Nothing to predict from: one call on a short prefix of the sequences.
        short = max(10, T // 20)
        params, states, xs, targets = args
        probe = jax.jit(fn).lower(params, states, xs[:, :short], targets[:, :short]).compile()
        t0 = time.perf_counter()
        jax.block_until_ready(probe(params, states, xs[:, :short], targets[:, :short]))
        predicted = rec["predicted_s"] = (time.perf_counter() - t0) * T / short
    if predicted is not None and predicted > max_run_s:
        rec["not_timed"] = f"predicted {predicted:.0f} s > {max_run_s:g} s"
    elif need > max_run_bytes:
        rec["not_timed"] = f"memory {fmt_bytes(need)} > {fmt_bytes(max_run_bytes)}"
    else:
        rec["time_s"], rec["reps"] = time_calls(lambda: compiled(*args), **reps)
    rec["timed_T"] = T
    rec["time_per_step_s"] = None if rec["time_s"] is None else rec["time_s"] / rec["timed_T"]
    return rec


def sweep(cfg, args, save, out):
    """Time (and memory) at the base point, then along each axis with the others at the base."""
    base = cfg["base"]
    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time": args.min_time}
    limits = {"reps": reps, "max_run_s": args.max_run_s, "max_run_bytes": args.max_run_bytes}

    def point_row(axis, point, refs):
        model, states, xs, targets = make_problem("gru", point["n"], point["batch"], point["T"], build=build)
        params, fns = make_fns(model, online=("es_d_rtrl", "d_rtrl"))
        row = row_head(axis=axis, cell="gru", **point)
        t0 = time.perf_counter()
        for a in ALGOS:
            pred = predicted_s(refs.get(a), point)
            row[a] = timed(fns[a], (params, states, xs, targets), predicted=pred, **limits)
            pred = row[a]["predicted_s"]
            if axis != "T" and row[a]["time_s"] is None and pred is not None and pred > args.max_run_s:
                # Too long at this T: time per step on a shorter sequence (aiming at half the
                # budget); memory stays that of the full T.
                short = max(10, int(point["T"] * args.max_run_s / (2 * pred)))
                rec = timed(
                    fns[a],
                    (params, states, xs[:, :short], targets[:, :short]),
                    predicted=pred * short / point["T"],
                    **limits,
                )
                if rec["time_s"] is not None:
                    row[a].update({k: rec[k] for k in ("time_s", "reps", "time_per_step_s", "timed_T")})
                    row[a]["not_timed"] = None
        out["sweep"].append(row)
        save()
        print(
            f"[{time.perf_counter() - t0:6.1f}s] sweep {axis}: n={point['n']} B={point['batch']} "
            f"T={point['T']}: per step "
            + " ".join(f"{a} {fmt_step(row[a])}" for a in ALGOS)
            + " | temp "
            + " ".join(f"{a} {fmt_bytes(row[a]['temp_bytes'])}" for a in ALGOS),
            flush=True,
        )
        return {
            a: {**point, "T": row[a]["timed_T"], "time_s": row[a]["time_s"]}
            for a in ALGOS
            if row[a]["time_s"] is not None
        }

    base_refs = point_row("base", base, {})
    for axis in AXES:
        # Below the base, predict from the base; above it, from the last timed point going up.
        up = dict(base_refs)
        for v in sorted(cfg[axis]):
            if v == base[axis]:
                continue
            refs = point_row(axis, {**base, axis: v}, base_refs if v < base[axis] else up)
            if v > base[axis]:
                up.update(refs)


def memory_grid(cfg, save, out):
    """Compile only, over the full grid; a point the sweep compiled already is copied from it."""
    mem_keys = ("lower_s", "compile_s", "temp_bytes", "argument_bytes", "output_bytes")
    done = {(r["n"], r["batch"], r["T"]): r for r in out["sweep"]}
    for n in cfg["n"]:
        model = build("gru", n, jax.random.key(0))
        params, fns = make_fns(model, online=("es_d_rtrl", "d_rtrl"))
        for batch in cfg["batch"]:
            for T in cfg["T"]:
                t0 = time.perf_counter()
                row = row_head(cell="gru", n=n, batch=batch, T=T)
                if (n, batch, T) in done:
                    row.update({a: {k: done[n, batch, T][a][k] for k in mem_keys} for a in ALGOS})
                else:
                    row.update(memory_only(fns, params, problem_shapes(model, batch, T)))
                out["memory"].append(row)
                save()
                print(
                    f"[{time.perf_counter() - t0:5.1f}s] memory n={n} B={batch} T={T}: temp "
                    + " ".join(f"{a} {fmt_bytes(row[a]['temp_bytes'])}" for a in ALGOS),
                    flush=True,
                )


def paper(cfg, args, save, out):
    """The paper-sized network: memory at `T` (compile only), time per step at `time_T`."""
    pc = cfg["paper"]
    model = paper_model(pc)
    params, fns = make_fns(model, online=("es_d_rtrl", "d_rtrl"))
    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time": args.min_time}
    limits = {"reps": reps, "max_run_s": args.max_run_s, "max_run_bytes": args.max_run_bytes}
    Tt = pc["time_T"]
    _, states, xs, targets = make_problem("lif", pc["n"], pc["batch"], Tt, build=lambda c, n, key: model)
    rec = out["paper"] = {
        "config": {**pc, "n_in": N_IN, "n_out": N_OUT, "neuron": "lif"},
        "trace_bytes": d_rtrl_trace_bytes(N_IN, pc["n"], pc["layers"], pc["batch"]),
        "trace_bytes_eval_shape": eval_shape_trace_bytes(model, states, xs, targets),
        "time": row_head(T=Tt),
    }
    for a in ALGOS:
        rec["time"][a] = timed(fns[a], (params, states, xs, targets), predicted=None, **limits)
        save()
    print(f"paper time per step (T={Tt}): " + " ".join(f"{a} {fmt_step(rec['time'][a])}" for a in ALGOS))
    if pc["T"] == Tt:  # the timed calls have the memory already
        rec["memory"] = {**rec["time"]}
    else:
        rec["memory"] = row_head(
            T=pc["T"], **memory_only(fns, params, problem_shapes(model, pc["batch"], pc["T"]))
        )
    rec["d_rtrl_temp_over_traces"] = rec["memory"]["d_rtrl"]["temp_bytes"] / rec["trace_bytes"]
    save()
    print(
        f"paper T={pc['T']}: D-RTRL traces {fmt_bytes(rec['trace_bytes'])} "
        f"(eval_shape {fmt_bytes(rec['trace_bytes_eval_shape'])}); temp "
        + " ".join(f"{a} {fmt_bytes(rec['memory'][a]['temp_bytes'])}" for a in ALGOS),
        flush=True,
    )


def oom(cfg, save, out):
    """The paper network's memory at growing T, compile only, until BPTT's needs exceed the RAM."""
    pc = cfg["paper"]
    model = paper_model(pc)
    params, fns = make_fns(model, online=("es_d_rtrl", "d_rtrl"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rec = out["oom"] = {
        "ram_bytes": ram,
        "batch": pc["batch"],
        "rows": [],
        "bptt_over_ram_T": None,
        "bptt_over_ram_T_interpolated": None,
    }
    for T in cfg["oom_Ts"]:
        if out["paper"] is not None and T == out["paper"]["memory"]["T"]:
            row = out["paper"]["memory"]
        else:
            row = row_head(T=T, **memory_only(fns, params, problem_shapes(model, pc["batch"], T)))
        rec["rows"].append(row)
        need = {a: sum(row[a][k] for k in ("temp_bytes", "argument_bytes", "output_bytes")) for a in ALGOS}
        print(f"oom T={T}: temp+args+out " + " ".join(f"{a} {fmt_bytes(need[a])}" for a in ALGOS), flush=True)
        if need["bptt"] > ram:
            # BPTT's memory is linear in T: where it crosses the RAM, between the last two rows.
            rec["bptt_over_ram_T"] = T
            if len(rec["rows"]) > 1:
                prev = rec["rows"][-2]
                n0 = sum(prev["bptt"][k] for k in ("temp_bytes", "argument_bytes", "output_bytes"))
                rec["bptt_over_ram_T_interpolated"] = prev["T"] + (ram - n0) * (T - prev["T"]) / (
                    need["bptt"] - n0
                )
        save()
        if need["bptt"] > ram:
            break


def fmt_ratio(x):
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def fmt_step(rec, T=None):
    """Time per step; with the point's `T`, says where it was timed on a shorter sequence."""
    if rec["time_per_step_s"] is None:
        return "not timed"
    t = rec["time_per_step_s"]
    text = f"{t * 1e6:.0f} µs" if t < 1e-3 else fmt_time(t)
    return text if T is None or rec["timed_T"] == T else f"{text} (T={rec['timed_T']})"


# ---------------------------------------------------------------------------------------------
# Tables (Markdown, as in benchmarks/README.md).

LABELS = {"es_d_rtrl": "ES-D-RTRL", "d_rtrl": "D-RTRL", "bptt": "BPTT", "forward": "fwd"}


def tables(data):
    lines = [
        "| n | B | T | "
        + " | ".join(f"{LABELS[a]} / step" for a in ALGOS)
        + " | ES / BPTT | D-RTRL / BPTT | "
        + " | ".join(f"{LABELS[a]} temp" for a in ALGOS)
        + " | load |",
        "|" + "---|" * (3 + 2 * len(ALGOS) + 3),
    ]
    for r in sorted(data["sweep"], key=lambda r: (r["n"], r["batch"], r["T"])):
        ts = [r[a]["time_per_step_s"] for a in ALGOS]
        lines.append(
            f"| {r['n']} | {r['batch']} | {r['T']} | "
            + " | ".join(fmt_step(r[a], r["T"]) for a in ALGOS)
            + f" | {ratio(ts[0], ts[2])} | {ratio(ts[1], ts[2])} | "
            + " | ".join(fmt_bytes(r[a]["temp_bytes"]) for a in ALGOS)
            + f" | {r['loadavg'][0]:.1f} |"
        )
    lines += [
        "",
        "| n | B | T | " + " | ".join(f"{LABELS[a]} temp" for a in ALGOS) + " | BPTT / ES |",
        "|" + "---|" * (4 + len(ALGOS)),
    ]
    for r in data["memory"]:
        lines.append(
            f"| {r['n']} | {r['batch']} | {r['T']} | "
            + " | ".join(fmt_bytes(r[a]["temp_bytes"]) for a in ALGOS)
            + f" | {fmt_ratio(r['bptt']['temp_bytes'] / r['es_d_rtrl']['temp_bytes'])} |"
        )
    pp = data.get("paper")
    if pp:
        c, m, t = pp["config"], pp["memory"], pp["time"]
        lines += [
            "",
            f"{c['layers']} recurrent LIF layers of {c['n']}, B = {c['batch']}; memory at T = {c['T']}, "
            f"time per step at T = {t['T']}; D-RTRL's traces {fmt_bytes(pp['trace_bytes'])}, "
            f"its temp / traces {pp['d_rtrl_temp_over_traces']:.2f}",
            "",
            "| | temp | argument | output | BPTT temp / temp | time / step | compile |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in ALGOS:
            saving = fmt_ratio(m["bptt"]["temp_bytes"] / m[a]["temp_bytes"])
            lines.append(
                f"| {LABELS[a]} | {fmt_bytes(m[a]['temp_bytes'])} | {fmt_bytes(m[a]['argument_bytes'])} | "
                f"{fmt_bytes(m[a]['output_bytes'])} | {saving} | "
                f"{fmt_step(t[a])} | {m[a]['lower_s'] + m[a]['compile_s']:.1f} s |"
            )
    oo = data.get("oom")
    if oo:
        cross = oo["bptt_over_ram_T_interpolated"]
        lines += [
            "",
            f"RAM {fmt_bytes(oo['ram_bytes'])}; BPTT's XLA memory (temp + argument + output) exceeds it at "
            f"T = {oo['bptt_over_ram_T']} (linear between the last two rows: T ≈ "
            f"{'-' if cross is None else f'{cross:.0f}'})",
            "",
            "| T | " + " | ".join(f"{LABELS[a]} temp" for a in ALGOS) + " | BPTT temp + arg + out |",
            "|" + "---|" * (2 + len(ALGOS)),
        ]
        for r in oo["rows"]:
            total = sum(r["bptt"][k] for k in ("temp_bytes", "argument_bytes", "output_bytes"))
            lines.append(
                f"| {r['T']} | "
                + " | ".join(fmt_bytes(r[a]["temp_bytes"]) for a in ALGOS)
                + f" | {fmt_bytes(total)} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures.


def _style_axis(ax, axis: str, base: dict) -> None:
    """Log axes, the swept axis's label, and the other axes' base values as the title."""
    fixed = ", ".join(f"{'B' if k == 'batch' else k}={base[k]}" for k in AXES if k != axis)
    xlabel = {"n": "hidden n", "batch": "batch B", "T": "sequence length T"}[axis]
    ax.set(xscale="log", yscale="log", xlabel=xlabel, title=f"GRU, {fixed}")
    ax.grid(True, which="major", alpha=0.3)


def plot(data, out_dir):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot import METHODS

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = data["base"]

    # Memory: vs T, n, B at the base point (compile only, the full grid) + the paper network vs T.
    mem = data["memory"] or data["sweep"]  # the sweep's rows have the memory too
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, axis in zip(axes, AXES):
        rows = sorted(
            (r for r in mem if all(r[k] == base[k] for k in AXES if k != axis)), key=lambda r: r[axis]
        )
        for key, (label, colour, marker) in METHODS.items():
            ax.plot(
                [r[axis] for r in rows],
                [r[key]["temp_bytes"] / 2**20 for r in rows],
                marker=marker,
                color=colour,
                label=label,
            )
        _style_axis(ax, axis, base)
    axes[0].set_ylabel("XLA temp memory (MiB)")
    axes[0].legend()
    oo = data.get("oom")
    ax = axes[3]
    if oo and oo["rows"]:
        pc = data["paper"]["config"]
        for key, (label, colour, marker) in METHODS.items():
            ax.plot(
                [r["T"] for r in oo["rows"]],
                [r[key]["temp_bytes"] / 2**30 for r in oo["rows"]],
                marker=marker,
                color=colour,
                label=label,
            )
        ax.axhline(oo["ram_bytes"] / 2**30, color="black", ls=":", lw=1)
        ax.text(oo["rows"][0]["T"], oo["ram_bytes"] / 2**30 * 1.15, "RAM of this machine", fontsize=8)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length T",
            ylabel="XLA temp memory (GiB)",
            title=f"{pc['layers']}×{pc['n']} recurrent LIF, B={pc['batch']}",
        )
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([r["T"] for r in oo["rows"]], [str(r["T"]) for r in oo["rows"]])
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle("Memory of one jitted gradient call (XLA memory analysis, compile only)")
    fig.tight_layout()
    fig.savefig(out_dir / "scale-memory.png", dpi=110)
    plt.close(fig)

    # Time per step vs n, B, T along the sweep.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, axis in zip(axes, AXES):
        rows = sorted(
            (r for r in data["sweep"] if all(r[k] == base[k] for k in AXES if k != axis)),
            key=lambda r: r[axis],
        )
        for key, (label, colour, marker) in METHODS.items():
            timed_rows = [r for r in rows if r[key]["time_per_step_s"]]
            xs = [r[axis] for r in timed_rows]
            ax.plot(
                xs,
                [r[key]["time_per_step_s"] * 1e3 for r in timed_rows],
                marker=marker,
                color=colour,
                label=label,
            )
            short = [r for r in timed_rows if r[key]["timed_T"] < r["T"]]
            ax.plot(  # hollow: timed on a shorter sequence than the point's T
                [r[axis] for r in short],
                [r[key]["time_per_step_s"] * 1e3 for r in short],
                marker=marker,
                color=colour,
                mfc="white",
                ls="none",
            )
        _style_axis(ax, axis, base)
    axes[0].set_ylabel("wall time per step (ms)")
    axes[0].legend()
    fig.suptitle(
        "Wall time per step (shared 2-core CPU, median after compilation; hollow: timed on a shorter T)"
    )
    fig.tight_layout()
    fig.savefig(out_dir / "scale-time.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a check that the script runs")
    p.add_argument("--out", default=str(HERE / "results-scale-2cpu.json"))
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated subset; the others are kept from --out"
    )
    p.add_argument("--max-run-s", type=float, default=20.0, help="time a call only if predicted under this")
    p.add_argument(
        "--max-run-bytes", type=float, default=6 * 2**30, help="run a call only if XLA memory is under"
    )
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=7)
    p.add_argument("--min-time", type=float, default=1.5)
    p.add_argument(
        "--report", action="store_true", help="only print the tables and draw the figures from --out"
    )
    p.add_argument("--images", default=str(HERE.parent / "docs" / "images"))
    args = p.parse_args()
    if args.report:
        data = json.loads(pathlib.Path(args.out).read_text())
        print(tables(data))
        plot(data, args.images)
        return
    cfg = QUICK if args.quick else FULL
    out = {
        "meta": machine_meta(quick=args.quick, max_run_s=args.max_run_s),
        "base": cfg["base"],
        "memory": [],
        "sweep": [],
        "paper": None,
        "oom": None,
    }
    parts = args.parts.split(",")
    if set(parts) != set(PARTS) and pathlib.Path(args.out).exists():
        # A partial rerun keeps the other parts of the existing results.
        old = json.loads(pathlib.Path(args.out).read_text())
        out.update({k: old[k] for k in PARTS if k not in parts})
    t_start = time.perf_counter()

    def save():
        out["meta"]["elapsed_s"] = time.perf_counter() - t_start
        tmp = pathlib.Path(args.out + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.out)

    print(json.dumps(out["meta"]), flush=True)
    if "sweep" in parts:
        sweep(cfg, args, save, out)
    if "paper" in parts:
        paper(cfg, args, save, out)
    if "oom" in parts:
        oom(cfg, save, out)
    if "memory" in parts:
        memory_grid(cfg, save, out)
    save()
    print(tables(out))
    print(f"took {out['meta']['elapsed_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
