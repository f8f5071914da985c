"""A task suite: every learning rule and BPTT trained with Optax on the same tasks, budget and seeds.

Usage:

    python benchmarks/task_suite.py --out benchmarks/results-tasks-2cpu.json   # see below
    python benchmarks/task_suite.py --quick --out /tmp/tasks-quick.json       # tiny sizes, 1 seed
    python benchmarks/task_suite.py --tasks adding,copy --out a.json          # a subset (also --rules)
    python benchmarks/task_suite.py --merge a.json b.json --out all.json      # join subsets
    python benchmarks/plot.py    # draws docs/images/task-suite.png from results-tasks-2cpu.json

The full suite took 811 + 1150 + 860 s as three `--tasks` subsets run side by side on a 2-core CPU
that other jobs kept loaded (load average 10-18); each rule and task compiles its own training step.

Tasks (each trained with Adam, its learning rate decaying to zero (cosine), after clipping the
gradient's global norm to 1; the same learning rate, batch, number of steps and seeds for every
rule; tested on a fixed held-out set):

- `adding`: the adding problem (`examples/adding_problem.py`) with a GRU; test MSE of the answer,
  against the baseline 1/6 of always answering 1.
- `copy`: two symbols out of four, one-hot, then a silent delay, then two recall steps with a
  "go" input in which the symbols must be given back in order; an LSTM; per-step accuracy.
- `dms`: delayed match-to-sample with Poisson spikes: a sample (population A or B) then a delay,
  then a test stimulus (A or B), then a response window; *match* when the two are the same; a
  recurrent ALIF layer with a leaky readout; accuracy in the response window.
- `evidence`: evidence accumulation, `examples/spiking_evidence.py` with its defaults (a recurrent
  ALIF layer with a leaky readout); accuracy in the recall window.
- `digits-rnn`: scikit-learn's bundled 8×8 digits, one image row per time step, an IndRNN; the
  answer is read at the last row.
- `digits-snn`: the same digits, each pixel a Poisson spike train at a rate proportional to its
  intensity, a recurrent LIF layer with a leaky readout; accuracy over the second half of the steps.

A run is *learnt* when its final test metric is more than halfway from chance to perfect
(accuracy), or below half the baseline (adding MSE). Time per step is the median wall time of a
training step (gradient and Adam update, already compiled) in this process; memory is the XLA temp
memory of that jitted step (`compiled.memory_analysis()`). A rule that raises on a task is recorded
with its error; RTRL is skipped where `N·P·T` (its influence matrix's entries, `N` states by `P`
weights, times the sequence length) exceeds `--rtrl-max`: each of its steps costs about `N`
pullbacks and an `N × N × P` product.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

import eqtrace
import eqtrace.nn as enn


HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
import adding_problem as ap  # noqa: E402
import spiking_evidence as se  # noqa: E402


# The rules, in table order: (name in `eqtrace`, its options). A rule that this version of eqtrace
# does not have is left out; "BPTT" is `eqtrace.bptt_grad`.
RULES = (
    ("BPTT", {}),
    ("TruncatedBPTT", {"window": 4}),
    ("RTRL", {"max_size": None}),
    ("DRTRL", {}),
    ("ESDRTRL", {"decay": 0.9}),
    ("SnAp1", {}),
    ("UORO", {}),
    ("EProp", {}),
    ("OSTL", {}),
    ("OTTT", {}),
    ("OTPE", {}),
    ("RFLO", {}),
)


def available_rules():
    return [(name, opts) for name, opts in RULES if name == "BPTT" or hasattr(eqtrace, name)]


def rule_label(name, opts):
    shown = {k: v for k, v in opts.items() if k != "max_size"}
    return name + ("(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else "")


# ---------------------------------------------------------------------------------------------
# Models


class RateRNN(eqx.Module):
    """A rate RNN cell read by a `Linear` layer."""

    cell: enn.AbstractRNNCell
    out: enn.Linear

    def __init__(self, cell, n_in, n_rec, n_out, *, key):
        k1, k2 = jax.random.split(key)
        self.cell = cell(n_in, n_rec, key=k1)
        self.out = enn.Linear(n_rec, n_out, key=k2)

    def __call__(self, x, state):
        cell = self.cell(x, state["cell"])
        return self.out(cell.h), {"cell": cell}

    def init_state(self):
        return {"cell": self.cell.init_state()}


def spiking_net(n_in, n_rec, n_out, *, neuron, input_scale, key, surrogate_alpha=2.0):
    """The evidence example's network: a recurrent LIF/ALIF layer and a leaky readout."""
    return se.SpikingClassifier(
        n_in,
        n_rec,
        n_out,
        neuron=neuron,
        input_scale=input_scale,
        readout_tau=5.0,
        surrogate_alpha=surrogate_alpha,
        key=key,
    )


# ---------------------------------------------------------------------------------------------
# Losses: every target is `(value, mask)` per step.


def mse_loss(y, target):
    return target[1] * (y[0] - target[0]) ** 2


def xent_loss(y, target):
    label = jax.nn.one_hot(target[0].astype(jnp.int32), y.shape[-1], dtype=y.dtype)
    return -target[1] * jnp.sum(label * jax.nn.log_softmax(y))


# ---------------------------------------------------------------------------------------------
# Data: `batch(key, size) -> (xs, targets)`, `(size, T, n_in)` and `(size, T, 2)`.


def adding_batch(key, batch, seq_len):
    """`examples/adding_problem.py`'s task: two distinct marked steps among the first `T - 1`, the
    target their sum at the last step; drawn without a permutation, which is slow to compile."""
    vkey, ikey, jkey = jax.random.split(key, 3)
    values = jax.random.uniform(vkey, (batch, seq_len))
    i = jax.random.randint(ikey, (batch,), 0, seq_len - 1)
    j = jax.random.randint(jkey, (batch,), 0, seq_len - 2)
    j = j + (j >= i)  # uniform over the steps other than i
    t = jnp.arange(seq_len)[None, :]
    markers = ((t == i[:, None]) | (t == j[:, None])).astype(values.dtype)
    xs = jnp.stack([values, markers], axis=-1)
    total = jnp.sum(values * markers, axis=1)
    mask = jnp.zeros((batch, seq_len)).at[:, -1].set(1.0)
    return xs, jnp.stack([jnp.broadcast_to(total[:, None], (batch, seq_len)), mask], axis=-1)


def copy_batch(key, batch, n_sym, length, delay):
    """`length` one-hot symbols, `delay` silent steps, then `length` recall steps with a go input."""
    T = 2 * length + delay
    syms = jax.random.randint(key, (batch, length), 0, n_sym)
    xs = jnp.zeros((batch, T, n_sym + 1))
    xs = xs.at[:, :length, :n_sym].set(jax.nn.one_hot(syms, n_sym))
    xs = xs.at[:, length + delay :, n_sym].set(1.0)
    labels = jnp.zeros((batch, T)).at[:, length + delay :].set(syms.astype(jnp.float32))
    mask = jnp.zeros((batch, T)).at[:, length + delay :].set(1.0 / length)
    return xs, jnp.stack([labels, mask], axis=-1)


def dms_batch(key, batch, n_in, stim, delay, response, rate):
    """Sample (A or B), delay, test (A or B), response window with a go population: label 1 when
    the test matches the sample. Populations: 40% A, 40% B, 20% go; Poisson at `rate`."""
    T = 2 * stim + delay + response
    n_pop = (2 * n_in) // 5
    k1, k2, k3 = jax.random.split(key, 3)
    sample = jax.random.bernoulli(k1, 0.5, (batch,)).astype(jnp.float32)  # 1: B
    test = jax.random.bernoulli(k2, 0.5, (batch,)).astype(jnp.float32)
    t = jnp.arange(T)
    in_sample = (t < stim).astype(jnp.float32)
    in_test = ((t >= stim + delay) & (t < 2 * stim + delay)).astype(jnp.float32)
    in_resp = (t >= 2 * stim + delay).astype(jnp.float32)
    b = sample[:, None] * in_sample + test[:, None] * in_test  # B on
    a = (1 - sample[:, None]) * in_sample + (1 - test[:, None]) * in_test  # A on
    rates = jnp.concatenate(
        [
            jnp.broadcast_to(a[:, :, None], (batch, T, n_pop)),
            jnp.broadcast_to(b[:, :, None], (batch, T, n_pop)),
            jnp.broadcast_to(in_resp[None, :, None], (batch, T, n_in - 2 * n_pop)),
        ],
        axis=-1,
    )
    xs = (jax.random.uniform(k3, rates.shape) < rate * rates).astype(jnp.float32)
    label = (sample == test).astype(jnp.float32)
    targets = jnp.stack(
        [jnp.broadcast_to(label[:, None], (batch, T)), jnp.broadcast_to(in_resp / response, (batch, T))], -1
    )
    return xs, targets


def evidence_batch(key, batch, n_in, cue, delay, recall, rate_high, rate_low):
    xs, targets, _ = se.evidence_batch(key, batch, n_in, cue, delay, recall, rate_high, rate_low, jnp.float32)
    return xs, targets


def load_digits():
    """scikit-learn's bundled 8×8 digits (no download), intensities in [0, 1], and labels."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def digits_split(n_test):
    """A fixed shuffle, the last `n_test` images held out."""
    images, labels = load_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    return (images[:-n_test], labels[:-n_test]), (images[-n_test:], labels[-n_test:])


def digits_rows(images, labels):
    """One row of 8 pixels per step; the answer at the last step."""
    n = len(labels)
    xs = images.reshape(n, 8, 8)
    mask = jnp.zeros((n, 8)).at[:, -1].set(1.0)
    lab = jnp.broadcast_to(labels.astype(jnp.float32)[:, None], (n, 8))
    return xs, jnp.stack([lab, mask], -1)


def digits_spikes(key, images, labels, steps, rate):
    """Each pixel a Poisson spike train at `rate × intensity`; the loss over the second half."""
    n = len(labels)
    xs = (jax.random.uniform(key, (n, steps, 64)) < rate * images[:, None, :]).astype(jnp.float32)
    t = jnp.arange(steps)
    late = (t >= steps // 2).astype(jnp.float32) / (steps - steps // 2)
    lab = jnp.broadcast_to(labels.astype(jnp.float32)[:, None], (n, steps))
    return xs, jnp.stack([lab, jnp.broadcast_to(late, (n, steps))], -1)


def sampler(images, labels, encode):
    """Batches drawn from a fixed training set, encoded by `encode(key, images, labels)`."""
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    def batch(key, size):
        ikey, ekey = jax.random.split(key)
        idx = jax.random.randint(ikey, (size,), 0, len(labels))
        return encode(ekey, images[idx], labels[idx])

    return batch


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: its model, its data (`batch(key, size) -> (xs, targets)` and a fixed test set), its
    loss, how it is scored, and its training budget."""

    name: str
    description: str
    make_model: Callable
    batch: Callable
    test: tuple
    loss_fn: Callable
    metric: str  # "accuracy" or "mse"
    chance: float  # chance accuracy, or the baseline MSE
    steps: int
    batch_size: int
    lr: float


def fixed(fn, *args):
    """`fn(*args)` under `jax.jit` (one compilation instead of many small eager ones): a test set."""
    return jax.jit(lambda: fn(*args))()


def make_tasks(quick, names=None):
    """The six tasks (those in `names`, if given); `quick`: tiny sizes, for a smoke test."""
    want = lambda name: names is None or name in names  # noqa: E731
    q = quick
    tkey = jax.random.key(1234)  # the test sets are the same for every rule and seed
    tasks = []

    n_test = 64 if q else 512
    T = 10 if q else 30
    h = 8 if q else 16
    if want("adding"):
        tasks.append(
            Task(
                "adding",
                f"adding problem, T={T}, GRU {h}",
                lambda key, h=h: ap.GRURegressor(2, h, 1, key=key),
                lambda key, b, T=T: adding_batch(key, b, T),
                fixed(adding_batch, tkey, n_test, T),
                mse_loss,
                "mse",
                ap.BASELINE,
                steps=40 if q else 400,
                batch_size=16 if q else 32,
                lr=1e-2,
            )
        )

    n_sym, length, delay = 4, 2, (3 if q else 10)
    h = 8 if q else 16
    if want("copy"):
        tasks.append(
            Task(
                "copy",
                f"copy {length} of {n_sym} symbols after a {delay}-step delay, LSTM {h}",
                lambda key, h=h: RateRNN(enn.LSTMCell, n_sym + 1, h, n_sym, key=key),
                lambda key, b, a=(n_sym, length, delay): copy_batch(key, b, *a),
                fixed(copy_batch, tkey, n_test, n_sym, length, delay),
                xent_loss,
                "accuracy",
                1.0 / n_sym,
                steps=40 if q else 400,
                batch_size=16 if q else 32,
                lr=1e-2,
            )
        )

    n_in, h = (20, 16) if q else (40, 32)
    stim, delay, resp = (4, 3, 3) if q else (10, 10, 5)
    args = (n_in, stim, delay, resp, 0.2)
    if want("dms"):
        tasks.append(
            Task(
                "dms",
                f"delayed match-to-sample, {stim}+{delay}+{stim}+{resp} steps, {n_in} Poisson inputs, "
                f"{h} recurrent ALIF",
                # A steeper surrogate than the evidence task's: with alpha=2, one seed in three stayed
                # at 71% under BPTT.
                lambda key, h=h, n_in=n_in: spiking_net(
                    n_in, h, 2, neuron="alif", input_scale=3.0, surrogate_alpha=4.0, key=key
                ),
                lambda key, b, args=args: dms_batch(key, b, *args),
                fixed(dms_batch, tkey, n_test, *args),
                xent_loss,
                "accuracy",
                0.5,
                steps=40 if q else 400,
                batch_size=16 if q else 32,
                lr=5e-3,
            )
        )

    # The full size is `examples/spiking_evidence.py` with its defaults (model, task and budget).
    cue, delay, recall = (12, 3, 5) if q else (30, 10, 5)
    args = (n_in, cue, delay, recall, 0.15 if q else 0.08, 0.03)
    if want("evidence"):
        tasks.append(
            Task(
                "evidence",
                f"evidence accumulation, cue {cue}, delay {delay}, recall {recall}, {n_in} Poisson inputs, "
                f"{h} recurrent ALIF",
                lambda key, h=h, n_in=n_in: spiking_net(n_in, h, 2, neuron="alif", input_scale=3.0, key=key),
                lambda key, b, args=args: evidence_batch(key, b, *args),
                fixed(evidence_batch, tkey, n_test, *args),
                xent_loss,
                "accuracy",
                0.5,
                steps=40 if q else 400,
                batch_size=16 if q else 32,
                lr=5e-3,
            )
        )

    if want("digits-rnn") or want("digits-snn"):
        (tr_img, tr_lab), (te_img, te_lab) = digits_split(360)
        if q:
            te_img, te_lab = te_img[:64], te_lab[:64]
    h = 16 if q else 32
    if want("digits-rnn"):
        tasks.append(
            Task(
                "digits-rnn",
                f"scikit-learn digits, 8 rows of 8 pixels, IndRNN {h}",
                lambda key, h=h: RateRNN(enn.IndRNNCell, 8, h, 10, key=key),
                sampler(tr_img, tr_lab, lambda key, im, lab: digits_rows(im, lab)),
                fixed(digits_rows, te_img, te_lab),
                xent_loss,
                "accuracy",
                0.1,
                steps=40 if q else 400,
                batch_size=16 if q else 32,
                lr=1e-2,
            )
        )

    steps_snn, rate = (8 if q else 20), 0.5
    h = 16 if q else 48
    if want("digits-snn"):
        tasks.append(
            Task(
                "digits-snn",
                f"scikit-learn digits, Poisson rate-coded over {steps_snn} steps, {h} recurrent LIF",
                lambda key, h=h: spiking_net(64, h, 10, neuron="lif", input_scale=1.0, key=key),
                sampler(
                    tr_img, tr_lab, lambda key, im, lab, s=steps_snn: digits_spikes(key, im, lab, s, rate)
                ),
                fixed(digits_spikes, tkey, te_img, te_lab, steps_snn, rate),
                xent_loss,
                "accuracy",
                0.1,
                steps=40 if q else 400,
                batch_size=16 if q else 32,
                lr=5e-3,
            )
        )
    return tasks


def learnt(task, value):
    if task.metric == "mse":
        return value < 0.5 * task.chance
    return value > task.chance + 0.5 * (1 - task.chance)


# ---------------------------------------------------------------------------------------------
# Training


def init_states(model, batch):
    return jax.vmap(lambda _: model.init_state())(jnp.arange(batch))


def grad_fn(name, opts):
    """`(model, states, xs, targets, loss_fn) -> (grads, losses)` for the rule `name`."""
    if name == "BPTT":
        return lambda *a: eqtrace.batch_grad(eqtrace.bptt_grad, *a)
    rule = getattr(eqtrace, name)(**opts)
    return lambda *a: eqtrace.batch_grad(eqtrace.online_grad, *a, algorithm=rule)


def evaluate(model, xs, targets, loss_fn, metric):
    """Mean summed loss per sequence, and the metric: the MSE of the masked steps, or the accuracy
    of the readout's argmax over the masked steps."""

    def run(x_seq):
        def body(s, x):
            y, s = model(x, s)
            return s, y

        return jax.lax.scan(body, model.init_state(), x_seq)[1]

    ys = jax.vmap(run)(xs)  # (batch, T, n_out)
    losses = jax.vmap(jax.vmap(loss_fn))(ys, targets)
    on = targets[..., 1] > 0
    if metric == "mse":
        value = jnp.sum(jnp.where(on, (ys[..., 0] - targets[..., 0]) ** 2, 0)) / jnp.sum(on)
    else:
        right = jnp.argmax(ys, -1) == targets[..., 0].astype(jnp.int32)
        value = jnp.sum(right & on) / jnp.sum(on)
    return jnp.mean(jnp.sum(losses, -1)), value


def state_and_weight_sizes(model):
    n = sum(a.size for a in jtu.tree_leaves(eqx.filter(model.init_state(), eqx.is_inexact_array)))
    p = sum(a.size for a in jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))
    return n, p


def short_error(e):
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def run_rule(task, name, opts, seeds, log, batch, score):
    """Train `task` with one rule for each seed; the row of results. `batch` and `score` are the
    task's jitted data and test functions, shared by the rules."""
    optim = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(task.lr, task.steps))
    )
    grads_of = grad_fn(name, opts)
    model = task.make_model(jax.random.key(0))
    dyn, static = eqx.partition(model, eqx.is_array)

    def train_step(dyn, opt_state, xs, targets):
        model = eqx.combine(dyn, static)
        grads, losses = grads_of(model, init_states(model, xs.shape[0]), xs, targets, task.loss_fn)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(dyn, updates), opt_state, jnp.sum(losses)

    xs, targets = batch(jax.random.key(0), task.batch_size)
    t0 = time.perf_counter()
    compiled = jax.jit(train_step).lower(dyn, optim.init(dyn), xs, targets).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    runs, times = [], []
    for seed in seeds:
        mkey, dkey = jax.random.split(jax.random.key(seed))
        dyn = eqx.filter(task.make_model(mkey), eqx.is_array)
        opt_state = optim.init(dyn)
        first = None
        tic = time.perf_counter()
        for key in jax.random.split(dkey, task.steps):
            xs, targets = batch(key, task.batch_size)
            jax.block_until_ready(xs)
            t = time.perf_counter()
            dyn, opt_state, loss = compiled(dyn, opt_state, xs, targets)
            loss = float(loss)
            times.append(time.perf_counter() - t)
            first = loss if first is None else first
        test_loss, value = (float(v) for v in score(eqx.combine(dyn, static), *task.test))
        runs.append(
            {
                "seed": seed,
                "first_train_loss": first,
                "last_train_loss": loss,
                "test_loss": test_loss,
                task.metric: value,
                "learnt": bool(learnt(task, value)),
                "wall_s": time.perf_counter() - tic,
            }
        )
        log(f"  {name} seed {seed}: test loss {test_loss:.4f}, {task.metric} {value:.3f}")
    values = [r[task.metric] for r in runs]
    losses = [r["test_loss"] for r in runs]
    return {
        "status": "ok",
        "runs": runs,
        "metric_mean": statistics.fmean(values),
        "metric_std": statistics.pstdev(values),
        "loss_mean": statistics.fmean(losses),
        "loss_std": statistics.pstdev(losses),
        "learnt": sum(r["learnt"] for r in runs),
        "time_s": statistics.median(times),
        "compile_s": compile_s,
        "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
    }


def run_suite(tasks, rules, seeds, rtrl_max, log):
    rows = []
    for i, task in enumerate(tasks, 1):
        n, p = state_and_weight_sizes(task.make_model(jax.random.key(0)))
        cost = n * p * task.test[0].shape[1]  # influence-matrix entries RTRL updates per sequence
        batch = jax.jit(task.batch, static_argnums=1)
        score = eqx.filter_jit(
            lambda model, xs, t, task=task: evaluate(model, xs, t, task.loss_fn, task.metric)
        )
        budget = f"{task.steps} steps of batch {task.batch_size}, Adam {task.lr:g}"
        log(f"[{i}/{len(tasks)}] {task.name}: {task.description}; {budget}")
        for j, (name, opts) in enumerate(rules, 1):
            row = {"task": task.name, "rule": rule_label(name, opts), "metric": task.metric}
            t0 = time.perf_counter()
            if name == "RTRL" and cost > rtrl_max:
                reason = f"too costly: N·P·T = {n}·{p}·{cost // (n * p)} = {cost:.2g} > {rtrl_max:.2g}"
                row.update(status="skipped", reason=reason)
            else:
                try:
                    row.update(run_rule(task, name, opts, seeds, log, batch, score))
                except Exception as e:  # a rule that does not apply to this model is a result too
                    row.update(status="error", reason=short_error(e))
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            log(f"[{i}/{len(tasks)} {task.name}] rule {j}/{len(rules)} {row['rule']}: {summary(row)}")
    return rows


def summary(row):
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    m = row["metric"]
    return (
        f"{m} {row['metric_mean']:.3f} ± {row['metric_std']:.3f}, test loss {row['loss_mean']:.4f} ± "
        f"{row['loss_std']:.4f}, learnt {row['learnt']}/{len(row['runs'])}, "
        f"{row['time_s'] * 1e3:.1f} ms/step, temp {fmt_bytes(row['temp_bytes'])}, {row['wall_s']:.0f} s"
    )


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def table(data):
    """Two Markdown tables, one row per rule and one column per task: the final test metric (mean ±
    std over seeds; the seeds that learnt where not all did, "fails" where none did), then the time
    per training step and the XLA temp memory. A rule that did not run gives its reason."""
    rows = data["rows"]
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    tasks = data["tasks"]
    find = {(r["task"], r["rule"]): r for r in rows}

    def head(t):
        chance = f"{100 * t['chance']:.0f}%" if t["metric"] == "accuracy" else f"{t['chance']:.3f}"
        return f"{t['name']} ({'accuracy' if t['metric'] == 'accuracy' else 'MSE'}; chance {chance})"

    def metric(t, r):
        if r["status"] != "ok":
            return r["status"]
        scale = 100 if t["metric"] == "accuracy" else 1
        mean, std = scale * r["metric_mean"], scale * r["metric_std"]
        value = f"{mean:.1f} ± {std:.1f}%" if scale == 100 else f"{mean:.4f} ± {std:.4f}"
        n = len(r["runs"])
        return value + (
            "" if r["learnt"] == n else " **fails**" if r["learnt"] == 0 else f" ({r['learnt']}/{n})"
        )

    def cost(t, r):
        return (
            r["status"]
            if r["status"] != "ok"
            else f"{r['time_s'] * 1e3:.1f} ms, {fmt_bytes(r['temp_bytes'])}"
        )

    out = []
    for title, cell in (("rule", metric), ("time per step, temp memory", cost)):
        out.append(
            f"| {title} | " + " | ".join(head(t) if cell is metric else t["name"] for t in tasks) + " |"
        )
        out.append("|---" * (len(tasks) + 1) + "|")
        for rule in rules:
            out.append(f"| {rule} | " + " | ".join(cell(t, find[(t["name"], rule)]) for t in tasks) + " |")
        out.append("")
    notes = [r for r in rows if r["status"] != "ok"]
    out.extend(f"- {r['rule']} on {r['task']}: {r['status']}: {r['reason']}" for r in notes)
    return "\n".join(out).rstrip() + "\n"


def merge(paths, out):
    """Join the results of runs on different tasks (`--tasks`), in the order given, into `out`."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    meta = dict(parts[0]["meta"], parts=[d["meta"] for d in parts])
    meta["total_s"] = sum(d["meta"]["total_s"] for d in parts)
    data = {
        "meta": meta,
        "tasks": [t for d in parts for t in d["tasks"]],
        "rows": [r for d in parts for r in d["rows"]],
    }
    pathlib.Path(out).write_text(json.dumps(data, indent=1))
    print(table(data))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke test)")
    p.add_argument("--merge", nargs="+", default=None, help="join these results files into --out, and stop")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the task names")
    p.add_argument("--rules", default=None, help="comma-separated subset of the rule names")
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds 0, 1, ... per rule and task (3; 1 with --quick)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps for every task (default: each task's)"
    )
    p.add_argument(
        "--rtrl-max",
        type=int,
        default=2 * 10**5,
        help="run RTRL where N·P·T (its cost per sequence) is at most this",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)

    def log(msg):
        print(msg, flush=True)

    tasks = make_tasks(args.quick, args.tasks.split(",") if args.tasks else None)
    if args.steps is not None:
        tasks = [dataclasses.replace(t, steps=args.steps) for t in tasks]
    rules = available_rules()
    if args.rules:
        wanted = args.rules.split(",")
        rules = [r for r in rules if r[0] in wanted]
    meta = {
        "jax": jax.__version__,
        "eqx": eqx.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "seeds": list(range(args.seeds or (1 if args.quick else 3))),
        "rtrl_max": args.rtrl_max,
        "command": "python benchmarks/task_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    log(json.dumps(meta))
    t0 = time.perf_counter()
    rows = run_suite(tasks, rules, meta["seeds"], args.rtrl_max, log)
    meta["total_s"] = time.perf_counter() - t0
    info = [
        {
            "name": t.name,
            "description": t.description,
            "metric": t.metric,
            "chance": t.chance,
            "steps": t.steps,
            "batch": t.batch_size,
            "lr": t.lr,
        }
        for t in tasks
    ]
    data = {"meta": meta, "tasks": info, "rows": rows}
    log(f"\nsuite took {meta['total_s']:.0f} s\n")
    log(table(data))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1, allow_nan=True)
    return data


if __name__ == "__main__":
    main()
