"""Gradient fidelity of the online rules against BPTT, for eqtrace and braintrace on identical
weights and data, in one process.

Protocol: hidden size n = 64, batch B = 8, T = 100 steps, float32; 32 standard-normal input
channels (100 Poisson channels with p = 0.05 for the spiking model), 10 outputs, standard-normal
targets, loss $\\sum_t \\mathrm{MSE}_t$ averaged over the batch (each example's loss is the sum over
its steps of the mean squared error over the 10 outputs).

Models:

1. `indrnn`: one IndRNN layer (tanh) + Linear readout;
2. `rnn`: a vanilla (Elman) RNN layer (tanh) + Linear;
3. `gru2`: two GRU layers + Linear;
4. `lif`: a recurrent LIF layer fed by 100 Poisson channels, read by a leaky (rate) readout;
5. `indrnn3` (eqtrace only): three IndRNN layers + Linear.

The eqtrace models are built first (eqtrace's initialisation); braintrace's copies receive the same
weights (`_braintrace_fidelity.py`). Where the two libraries' equations differ, the eqtrace model
here follows braintrace's (see `BTLIF` and `LeakyReadout`). Before any online gradient is compared,
the script asserts that both libraries produce the same output sequence and the same BPTT gradient.

For every rule: the cosine similarity between its whole-model gradient (all leaves flattened
together) and BPTT's, the ratio of their norms $|g| / |g_\\mathrm{BPTT}|$, and the relative error
$|g - g_\\mathrm{BPTT}| / |g_\\mathrm{BPTT}|$, each against the BPTT gradient of its own library; and
the time per (jitted) gradient call after compilation, measured in this process round-robin over all
rules (`--rounds` rounds; in each, `_timing.time_calls` takes the median of `--reps` calls after a
warm-up call; a rule's time is the median over rounds), so that a change in the machine's load
reaches every rule alike.

Columns: braintrace `D_RTRL` and `pp_prop` (decay 0.9), each with `vjp_method='single-step'` (its
default) and `'multi-step'` (driven one step at a time); eqtrace `d_rtrl` and `es_d_rtrl` (decay 0.9,
`normalise=True`) with `window` = 0, 1, 2, 4, 8, and `es_d_rtrl` with `normalise=False` at windows 0
and 1. A second table leaves out the readout (`out`): a Linear readout's gradient is exact under
every rule except braintrace's single-step mode, which returns none for a weight that reaches no
hidden state, so the whole-model numbers dilute the differences between rules.

Runs with or without braintrace installed (without it, the braintrace columns are skipped):

    python benchmarks/fidelity.py --out benchmarks/results-fidelity-2cpu.json
    python benchmarks/fidelity.py --models indrnn,rnn --windows 0,1 --no-braintrace
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from _timing import fmt_time, time_calls

import eqtrace
import eqtrace.nn as enn


N, B, T, N_IN, N_IN_LIF, N_OUT, P_SPIKE = 64, 8, 100, 32, 100, 10, 0.05
DECAY = 0.9
MODELS = ("indrnn", "rnn", "gru2", "lif", "indrnn3")
BRAINTRACE_MODELS = ("indrnn", "rnn", "gru2", "lif")
# The same learning rule in both libraries: eqtrace's `window=0` carries the learning signal back
# through the per-position diagonal, as braintrace's single-step mode does; `window=1` back-propagates
# through one full step, as braintrace's multi-step mode does when driven one step at a time. They are
# compared on the leaves for which braintrace returns a gradient (its single-step mode returns none
# for weights outside every trace relation: a Linear readout, a GRU's reset gate).
SAME_RULE = (
    ("braintrace D_RTRL single-step", "eqtrace d_rtrl window=0"),
    ("braintrace D_RTRL multi-step", "eqtrace d_rtrl window=1"),
)


# ---------------------------------------------------------------------------------------------------
# eqtrace models


class Stack(eqx.Module):
    """Recurrent cells in sequence (each reads the previous one's `h`), then a Linear readout."""

    cells: tuple
    out: enn.Linear

    def __call__(self, x, state):
        new = []
        for cell, s in zip(self.cells, state):
            s = cell(x, s)
            x = s.h
            new.append(s)
        return self.out(x), tuple(new)

    def init_state(self):
        return tuple(c.init_state() for c in self.cells)


class BTLIF(enn.AbstractNeuron):
    r"""LIF neurons with braintrace's (brainpy.state's) equations, which differ from
    `eqtrace.nn.LIF`'s in where the soft reset sits: the reset is applied *before* the leak,

    $$V_t = \alpha\,(V_{t-1} - v_\mathrm{th}\, s_{t-1}) + I_t, \qquad s_t = H(V_t - v_\mathrm{th}),$$

    (`eqtrace.nn.LIF`: $V_t = \alpha V_{t-1} - v_\mathrm{th} s_{t-1} + I_t$), with the sigmoid surrogate
    of slope 4 on both sides (`braintools.surrogate.Sigmoid(4.0)`, `eqtrace.nn.SigmoidSurrogate(4.0)`).
    """

    size: int = eqx.field(static=True)
    tau: float = eqx.field(static=True)
    v_th: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)
    surrogate: enn.AbstractSurrogate

    def __init__(self, size, *, tau=20.0, v_th=1.0, dtype=jnp.float32):
        self.size = size
        self.tau = tau
        self.v_th = v_th
        self.dtype = dtype
        self.surrogate = enn.SigmoidSurrogate(4.0)

    def __call__(self, I, state):  # noqa: E741
        s = self.spike(state)
        return enn.LIFState(V=math.exp(-1.0 / self.tau) * (state.V - self.v_th * s) + I)

    def spike(self, state):
        return self.surrogate(state.V - self.v_th)

    def init_state(self):
        return enn.LIFState(V=jnp.zeros((self.size,), self.dtype))


class LeakyReadout(eqx.Module):
    r"""braintrace's `LeakyRateReadout`: $r_t = \kappa r_{t-1} + x_t W$, no bias and no $(1 - \kappa)$
    factor (`eqtrace.nn.LeakyRateReadout` has both), $\kappa = e^{-1/\tau}$."""

    W: enn.Linear
    tau: float = eqx.field(static=True)

    def __call__(self, x, state):
        return enn.LeakyRateReadoutState(r=math.exp(-1.0 / self.tau) * state.r + self.W(x))

    def init_state(self):
        return enn.LeakyRateReadoutState(r=jnp.zeros((self.W.out_features,), self.W.weight.dtype))


class LIFNet(eqx.Module):
    """Recurrent LIF layer (input `[x_t; s_{t-1}]`) → spikes `s_t` → leaky readout; output `r_t`."""

    layer: enn.RecurrentSpikingLayer
    out: LeakyReadout

    def __call__(self, x, state):
        v = self.layer(x, state[0])
        r = self.out(self.layer.spike(v), state[1])
        return r.r, (v, r)

    def init_state(self):
        return (self.layer.init_state(), self.out.init_state())


def build_model(name, key):
    """The eqtrace model `name`, float32, with eqtrace's initialisation (the LIF weights rescaled so
    that the layer fires at a moderate rate)."""
    f32 = jnp.float32
    ks = jax.random.split(key, 4)
    readout = enn.Linear(N, N_OUT, dtype=f32, key=ks[3])
    if name in ("indrnn", "indrnn3"):
        n_layers = 1 if name == "indrnn" else 3
        cells = tuple(
            enn.IndRNNCell(N_IN if i == 0 else N, N, activation=jnp.tanh, dtype=f32, key=ks[i])
            for i in range(n_layers)
        )
        return Stack(cells, readout)
    if name == "rnn":
        return Stack((enn.VanillaRNNCell(N_IN, N, dtype=f32, key=ks[0]),), readout)
    if name == "gru2":
        return Stack(
            (enn.GRUCell(N_IN, N, dtype=f32, key=ks[0]), enn.GRUCell(N, N, dtype=f32, key=ks[1])), readout
        )
    if name == "lif":
        layer = enn.RecurrentSpikingLayer(N_IN_LIF, N, neuron=BTLIF(N), dtype=f32, key=ks[0])
        # eqtrace's default ±1/sqrt(164) uniform weights barely move V towards the threshold with
        # ~5 active inputs per step: scale the input part by 6 and the recurrent part by 2.
        gain = jnp.concatenate([jnp.full((N_IN_LIF, 1), 6.0, f32), jnp.full((N, 1), 2.0, f32)])
        layer = eqx.tree_at(lambda m: m.W.weight, layer, layer.W.weight * gain)
        out = LeakyReadout(enn.Linear(N, N_OUT, use_bias=False, dtype=f32, key=ks[1]), tau=5.0)
        return LIFNet(layer, out)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def make_data(name, key):
    """`xs` `(B, T, in)`, `targets` `(B, T, 10)`, float32."""
    kx, kt = jax.random.split(key)
    if name == "lif":
        xs = jax.random.bernoulli(kx, P_SPIKE, (B, T, N_IN_LIF)).astype(jnp.float32)
    else:
        xs = jax.random.normal(kx, (B, T, N_IN), jnp.float32)
    return xs, jax.random.normal(kt, (B, T, N_OUT), jnp.float32)


def loss_fn(y, t):
    return jnp.mean((y - t) ** 2)


def batched_states(model):
    return jax.vmap(lambda _: model.init_state())(jnp.arange(B))


# ---------------------------------------------------------------------------------------------------
# eqtrace gradients


def forward(model, xs):
    """Output sequence `(T, B, out)` of `model` run over `xs` `(B, T, ...)`."""

    def body(s, x):
        y, s = jax.vmap(model)(x, s)
        return s, y

    return jax.lax.scan(body, batched_states(model), jnp.swapaxes(xs, 0, 1))[1]


def bptt(model, xs, targets):
    """Reference: `eqx.filter_grad` of the batch-mean loss, the batch vmapped inside `lax.scan`."""

    def total(model):
        def body(s, xt):
            y, s = jax.vmap(model)(xt[0], s)
            return s, jnp.mean(jax.vmap(loss_fn)(y, xt[1]))

        xt = (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1))
        return jnp.sum(jax.lax.scan(body, batched_states(model), xt)[1])

    return eqx.filter_grad(total)(model)


def eqtrace_settings(windows, raw_windows):
    """`(label, kwargs)` for every eqtrace rule to measure; a window of `None` passes no `window`
    argument (the library's default)."""

    def rule(algorithm, window, **options):
        label = f"eqtrace {algorithm}" + ("" if window is None else f" window={window}")
        label += "".join(f" {k}={v}" for k, v in options.items() if k != "decay")
        kwargs = {"algorithm": algorithm, **options}
        if window is not None:
            kwargs["window"] = window
        return label, kwargs

    return (
        [rule("d_rtrl", w) for w in windows]
        + [rule("es_d_rtrl", w, decay=DECAY) for w in windows]
        + [rule("es_d_rtrl", w, decay=DECAY, normalise=False) for w in raw_windows]
    )


def online_fn(kwargs):
    def grad(model, states, xs, targets):
        return eqtrace.batch_grad(eqtrace.online_grad, model, states, xs, targets, loss_fn, **kwargs)[0]

    return eqx.filter_jit(grad)


# ---------------------------------------------------------------------------------------------------
# metrics


def flat(tree, keep=None):
    """All inexact leaves of `tree` in one float64 vector; with `keep`, only the leaves whose path
    (`jax.tree_util.keystr`) it accepts."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(tree, eqx.is_inexact_array))
    parts = [
        np.asarray(a, np.float64).ravel() for p, a in leaves if keep is None or keep(jax.tree_util.keystr(p))
    ]
    return np.concatenate(parts)


def _metrics(g, ref):
    nr = np.linalg.norm(ref)
    return {
        "cos": float(g @ ref / (np.linalg.norm(g) * nr)),
        "norm_ratio": float(np.linalg.norm(g) / nr),
        "rel_err": float(np.linalg.norm(g - ref) / nr),
    }


def compare(g, ref):
    """Cosine, norm ratio and relative error of `g` against `ref`, in float64: over the whole model
    (`all`) and over the layers before the readout (`layers`: every leaf outside `out`)."""
    layers = lambda path: not path.startswith(".out")  # noqa: E731
    return {"all": _metrics(flat(g), flat(ref)), "layers": _metrics(flat(g, layers), flat(ref, layers))}


def per_leaf(g, ref):
    """The same three numbers per leaf, keyed by the leaf's path."""
    out = {}
    gl = jax.tree_util.tree_leaves_with_path(eqx.filter(g, eqx.is_inexact_array))
    rl = jax.tree_util.tree_leaves(eqx.filter(ref, eqx.is_inexact_array))
    for (path, a), r in zip(gl, rl):
        a, r = np.asarray(a, np.float64).ravel(), np.asarray(r, np.float64).ravel()
        nr, na = np.linalg.norm(r), np.linalg.norm(a)
        out[jax.tree_util.keystr(path)] = {
            "cos": float(a @ r / (na * nr)) if na > 0 and nr > 0 else None,
            "norm_ratio": float(na / nr) if nr > 0 else None,
            "rel_err": float(np.linalg.norm(a - r) / nr) if nr > 0 else None,
        }
    return out


def fmt_cell(m, part="all"):
    m = m[part]
    return f"{m['cos']:.3f} / {m['norm_ratio']:.2f} / {m['rel_err']:.2f}"


# ---------------------------------------------------------------------------------------------------
# driver


def run_model(name, key, settings, bt, timing):
    kmodel, kdata = jax.random.split(key)
    model = build_model(name, kmodel)
    xs, targets = make_data(name, kdata)
    states = batched_states(model)
    t0 = time.perf_counter()
    ys = forward(model, xs)
    g_ref = bptt(model, xs, targets)
    rec = {"model": name, "rules": {}, "info": {}}
    # eqtrace's own BPTT driver must give the same reference.
    g_drv = eqtrace.batch_grad(eqtrace.bptt_grad, model, states, xs, targets, loss_fn)[0]
    rec["info"]["bptt_driver_vs_reference"] = compare(g_drv, g_ref)["all"]
    assert rec["info"]["bptt_driver_vs_reference"]["rel_err"] < 1e-4, rec["info"]
    if name == "lif":

        def body(s, x):
            s = jax.vmap(model)(x, s)[1]
            return s, model.layer.spike(s[0])

        spikes = jax.lax.scan(body, states, jnp.swapaxes(xs, 0, 1))[1]
        rec["info"]["firing_rate"] = float(jnp.mean(spikes))
    print(f"\n== {name} ==" + (f" (firing rate {rec['info']['firing_rate']:.3f})" if name == "lif" else ""))

    grads, calls = {}, {}
    if bt is not None and name in BRAINTRACE_MODELS:
        twin = bt.Twin(name, model, N, N_OUT, B, DECAY)
        twin.check_forward(xs, np.asarray(ys))
        bt_ref = twin.bptt(xs, targets)
        agree = compare(bt_ref, g_ref)
        rec["info"]["bptt_braintrace_vs_eqtrace"] = agree["all"]
        scale = max(float(np.max(np.abs(flat(g_ref)))), 1e-30)
        diff = float(np.max(np.abs(flat(bt_ref) - flat(g_ref)))) / scale
        rec["info"]["bptt_max_abs_diff_over_max_abs"] = diff
        print(f"  forward outputs equal; BPTT braintrace vs eqtrace: {fmt_cell(agree)}, max diff {diff:.1e}")
        assert agree["all"]["cos"] > 1 - 1e-5 and agree["all"]["rel_err"] < 1e-3, (name, agree)
        for label, algorithm, vjp_method in bt.RULES:
            t1 = time.perf_counter()
            g, calls[label] = twin.online(algorithm, vjp_method, xs, targets)
            grads[label] = g
            m = compare(g, bt_ref)
            m.update(first_call_s=time.perf_counter() - t1, per_leaf=per_leaf(g, bt_ref))
            rec["rules"][label] = m
            print(f"  {label:44s} {fmt_cell(m)} | layers {fmt_cell(m, 'layers')}  [{m['first_call_s']:.1f}s]")

    for label, kwargs in settings:
        t1 = time.perf_counter()
        fn = online_fn(kwargs)
        g = fn(model, states, xs, targets)
        calls[label] = lambda fn=fn: fn(model, states, xs, targets)
        grads[label] = g
        m = compare(g, g_ref)
        m.update(first_call_s=time.perf_counter() - t1, per_leaf=per_leaf(g, g_ref))
        rec["rules"][label] = m
        print(f"  {label:44s} {fmt_cell(m)} | layers {fmt_cell(m, 'layers')}  [{m['first_call_s']:.1f}s]")

    # Timing, round-robin over the rules so that a change in the machine's load reaches them all:
    # in each round, `time_calls` takes the median of `reps` calls of one rule after a warm-up call;
    # a rule's time is the median of its rounds.
    t1 = time.perf_counter()
    rounds = {label: [] for label in calls}
    for _ in range(timing["rounds"]):
        for label, call in calls.items():
            seconds, _ = time_calls(call, min_reps=timing["reps"], max_reps=timing["reps"], min_time=math.inf)
            rounds[label].append(seconds)
    for label, times in rounds.items():
        rec["rules"][label].update(time_s=statistics.median(times), round_times_s=times)
    print(
        f"  timed {len(calls)} rules in {time.perf_counter() - t1:.0f}s: "
        + ", ".join(
            f"{label.replace('braintrace ', 'bt ').replace('eqtrace ', '')} {fmt_time(statistics.median(t))}"
            for label, t in rounds.items()
        )
    )
    for bt_label, eq_label in SAME_RULE:
        if bt_label in grads and eq_label in grads:
            leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(grads[bt_label], eqx.is_inexact_array))
            zero = [jax.tree_util.keystr(p) for p, a in leaves if not np.any(np.asarray(a))]
            a, b = (flat(grads[k], lambda path: path not in zero) for k in (eq_label, bt_label))
            diff = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            rec["info"].setdefault("same_rule", {})[f"{eq_label} vs {bt_label}"] = {
                "rel_diff": diff,
                "zero_in_braintrace": zero,
            }
            print(
                f"  {eq_label} vs {bt_label}: relative difference {diff:.1e}; "
                f"zero in braintrace: {', '.join(zero) or 'none'}"
            )
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def tables(results, labels, models):
    """Markdown: fidelity over the whole model, over the layers before the readout, and time."""
    head = "| rule | " + " | ".join(models) + " |\n|---|" + "---|" * len(models) + "\n"
    out = {"all": head, "layers": head, "time": head}
    by_model = {r["model"]: r["rules"] for r in results}
    for label in labels:
        for part in ("all", "layers"):
            cells = [fmt_cell(by_model[m][label], part) if label in by_model[m] else "–" for m in models]
            out[part] += f"| {label} | " + " | ".join(cells) + " |\n"
        cells = [fmt_time(by_model[m][label]["time_s"]) if label in by_model[m] else "–" for m in models]
        out["time"] += f"| {label} | " + " | ".join(cells) + " |\n"
    return out


def git_revision():
    """The commit of the working tree, with `+dirty` when `eqtrace/` has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "eqtrace"],
            cwd=os.path.dirname(here),
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_windows(text):
    """`"0,1,2"` → `[0, 1, 2]`; `"none"` → `[None]` (no `window` argument); `""` → `[]`."""
    if text == "none":
        return [None]
    return [int(w) for w in text.split(",") if w]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument(
        "--windows",
        default="0,1,2,4,8",
        help="comma-separated eqtrace `window` values; 'none': no `window` argument; '': no eqtrace rules",
    )
    p.add_argument(
        "--raw-windows",
        default="0,1",
        help="windows at which to also run es_d_rtrl normalise=False ('none' and '' as for --windows)",
    )
    p.add_argument("--no-braintrace", action="store_true", help="skip braintrace even if installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds over all rules")
    p.add_argument("--reps", type=int, default=3, help="timed calls per rule and round")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    models = args.models.split(",")
    windows, raw_windows = parse_windows(args.windows), parse_windows(args.raw_windows)
    settings = eqtrace_settings(windows, raw_windows)
    timing = {"rounds": args.rounds, "reps": args.reps}

    bt = None
    if args.no_braintrace:
        print("braintrace columns skipped (--no-braintrace)")
    else:
        try:
            import _braintrace_fidelity as bt
        except ImportError as e:
            print(
                f"braintrace columns skipped: braintrace 0.2.6 (with brainpy.state) is not importable ({e})"
            )

    meta = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.date.today().isoformat(),
        "git": git_revision(),
        "jax": jax.__version__,
        "equinox": eqx.__version__,
        "braintrace": bt.version() if bt is not None else None,
        "backend": jax.default_backend(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "protocol": {
            "n": N,
            "B": B,
            "T": T,
            "in": N_IN,
            "in_lif": N_IN_LIF,
            "out": N_OUT,
            "p_spike": P_SPIKE,
        },
        "decay": DECAY,
        "seed": args.seed,
        "timing": {"rounds": args.rounds, "reps_per_round": args.reps},
    }
    print(json.dumps({k: v for k, v in meta.items() if k != "protocol"}))
    t0 = time.perf_counter()
    keys = dict(zip(MODELS, jax.random.split(jax.random.key(args.seed), len(MODELS))))
    results = [run_model(m, keys[m], settings, bt, timing) for m in models]
    meta["total_s"] = time.perf_counter() - t0

    labels = ([label for label, _, _ in bt.RULES] if bt is not None else []) + [s for s, _ in settings]
    out = tables(results, labels, models)
    print(f"\nWhole model: cosine to BPTT / |g| / |g_BPTT| / relative error (took {meta['total_s']:.0f}s):\n")
    print(out["all"])
    print("Layers before the readout (every leaf outside `out`), same three numbers:\n")
    print(out["layers"])
    print(
        f"Time per gradient call (jitted, after compilation; median over {args.rounds} round-robin rounds "
        f"of the median of {args.reps} calls):\n"
    )
    print(out["time"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
