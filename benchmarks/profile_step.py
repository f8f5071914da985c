"""Where an online step's time goes: per time step, the XLA operations the compiled scan body
launches, its FLOPs and bytes (XLA's cost analysis, which counts a loop body once, i.e. per step),
the median time per step, and a breakdown of the shared linearisation.

Usage:

    PYTHONPATH=. python benchmarks/profile_step.py                      # gru n=64,256, B=32
    PYTHONPATH=. python benchmarks/profile_step.py --cells gru,lif --n 256 --batch 1,32
    PYTHONPATH=. /tmp/bt-venv/bin/python benchmarks/profile_step.py --cells gru  # + braintrace

Rows: `forward` (scan of model + loss), `bptt` (gradient of the batch-mean loss), `linearise`
(every step's forward, its one-step VJP and the learning signal, nothing else), `linearise+jac`
(plus the Jacobian blocks `D` and `D_f`), then each rule through `eqtrace.batch_grad`; with
braintrace importable, its `pp_prop` in both modes (`single-step` is eqtrace's `window=0`,
`multi-step` its `window=1`). The model is that of `bench_es_d_rtrl.py` (cell + Linear readout, or
recurrent LIF → Linear), input 32, output 10, T = 100.
"""

import argparse
import collections
import json
import os
import re

import equinox as eqx
import jax
import jax.numpy as jnp
from _timing import time_calls
from bench_d_rtrl import make_problem, mse, N_IN, N_OUT
from bench_es_d_rtrl import build

import eqtrace
from eqtrace._algorithms._one_step import linearise_step


T = 100
RULES = {
    "ESDRTRL(window=0)": eqtrace.ESDRTRL(window=0),
    "ESDRTRL(window=1)": eqtrace.ESDRTRL(window=1),
    "DRTRL(window=0)": eqtrace.DRTRL(window=0),
    "DRTRL(window=1)": eqtrace.DRTRL(window=1),
}
_BOOKKEEPING = {"get-tuple-element", "parameter", "tuple", "constant", "bitcast"}


def body_ops(hlo_text: str) -> dict[str, int]:
    """The operations of every `while` body in optimised HLO (each runs once per step), by kind,
    bookkeeping left out."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.split("\n"):
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif current is not None and line.strip() not in ("", "}"):
            current.append(line)
    kinds: collections.Counter = collections.Counter()
    for body in re.findall(r"body=%?([\w.\-]+)", hlo_text):
        kinds.update(
            m.group(1)
            for line in comps.get(body, [])
            if (m := re.search(r"= \S+ ([a-z][\w\-]*)\(", line)) and m.group(1) not in _BOOKKEEPING
        )
    return dict(kinds)


def profile(fn, args, reps) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    seconds, _ = time_calls(lambda: jax.block_until_ready(compiled(*args)), **reps)
    ops = body_ops(compiled.as_text())
    return {
        "step_s": seconds / T,
        "ops": sum(ops.values()),
        "ops_by_kind": ops,
        "flops": cost.get("flops", 0.0),
        "bytes": cost.get("bytes accessed", 0.0),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
    }


def eqtrace_fns(model):
    params, static = eqx.partition(model, eqx.is_array)

    def forward(p, states, xs, targets):
        m = eqx.combine(p, static)

        def body(s, xt):
            y, s = jax.vmap(m)(xt[0], s)
            return s, jnp.mean(jax.vmap(mse)(y, xt[1]))

        return jax.lax.scan(body, states, (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1)))[1]

    def bptt(p, states, xs, targets):
        return eqtrace.batch_grad(eqtrace.bptt_grad, eqx.combine(p, static), states, xs, targets, mse)

    def linearise(jacobians):
        def fn(p, states, xs, targets):
            m = eqx.combine(p, static)
            g = eqtrace.compile_etrace_graph(m, xs[0, 0], jax.tree.map(lambda s: s[0], states))

            def body(carry, xt):
                s, acc = carry
                lin = linearise_step(g, m, xt[0], s, xt[1], mse, batched=True)
                acc = [a if d is None else a + d for a, d in zip(acc, lin.grads)]
                extra = (lin.d_total, lin.d_f) if jacobians else ()
                used = sum(jnp.sum(a) for a in jax.tree.leaves((lin.signal, extra)))
                return (lin.new_state, acc), (jnp.mean(lin.loss), used)

            acc = [jnp.zeros_like(w) for w in jax.tree.leaves(p)]
            return jax.lax.scan(body, (states, acc), (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1)))

        return fn

    def rule(algorithm):
        def fn(p, states, xs, targets):
            m = eqx.combine(p, static)
            return eqtrace.batch_grad(eqtrace.online_grad, m, states, xs, targets, mse, algorithm=algorithm)

        return fn

    fns = {"forward": forward, "bptt": bptt, "linearise": linearise(False), "linearise+jac": linearise(True)}
    return params, {**fns, **{name: rule(r) for name, r in RULES.items()}}


def braintrace_rows(cell, n, batch, xs, targets, reps) -> dict:
    """braintrace's `pp_prop` in both modes, where braintrace is installed."""
    try:
        from _braintrace import time_braintrace
    except ImportError:
        return {}
    if cell not in ("gru", "rnn"):
        return {}
    rows = {}
    for mode in ("single-step", "multi-step"):
        compiled: list = []
        seconds, _, _ = time_braintrace(
            cell,
            N_IN,
            n,
            N_OUT,
            xs,
            targets,
            "pp_prop",
            reps,
            compiled=compiled,
            decay_or_rank=0.9,
            vjp_method=mode,
        )
        ops = body_ops(compiled[0].as_text())
        cost = compiled[0].cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        rows[f"braintrace pp_prop {mode}"] = {
            "step_s": seconds / T,
            "ops": sum(ops.values()),
            "ops_by_kind": ops,
            "flops": cost.get("flops", 0.0),
        }
    return rows


def table(results) -> str:
    lines = [
        "| cell | n | B | step | µs / step | XLA ops / step | dots | copies | MFLOP / step | temp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, m in r["rows"].items():
            kinds = m.get("ops_by_kind", {})
            flops = f"{m['flops'] / 1e6:.1f}" if "flops" in m else "–"
            temp = f"{m['temp_bytes'] / 2**20:.1f} MiB" if "temp_bytes" in m else "–"
            lines.append(
                f"| {r['cell']} | {r['n']} | {r['batch']} | {name} | {m['step_s'] * 1e6:.0f} | "
                f"{m.get('ops', '–')} | {kinds.get('dot', 0) + kinds.get('custom-call', 0)} | "
                f"{kinds.get('copy', 0)} | {flops} | {temp} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="gru")
    parser.add_argument("--n", default="64,256")
    parser.add_argument("--batch", default="32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    reps = {"min_reps": 5, "max_reps": 9, "min_time": 1.0}
    results = []
    for cell in args.cells.split(","):
        for n in map(int, args.n.split(",")):
            for batch in map(int, args.batch.split(",")):
                model, states, xs, targets = make_problem(cell, n, batch, T, build=build)
                params, fns = eqtrace_fns(model)
                rows = {}
                for name, fn in fns.items():
                    rows[name] = profile(fn, (params, states, xs, targets), reps)
                    print(
                        f"{cell} n={n} B={batch} {name}: {rows[name]['step_s'] * 1e6:.0f} µs/step, "
                        f"{rows[name]['ops']} ops",
                        flush=True,
                    )
                rows.update(braintrace_rows(cell, n, batch, xs, targets, reps))
                results.append({"cell": cell, "n": n, "batch": batch, "T": T, "rows": rows})
    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "loadavg_end": os.getloadavg()}
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
