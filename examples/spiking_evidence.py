"""Evidence accumulation with a recurrent spiking network, learnt online (ES-D-RTRL or D-RTRL).

Each trial has `T = cue + delay + recall` steps of Poisson spike trains from `--inputs` input
neurons in three populations. During the cue period the *left* and *right* populations fire at
rates `r_left` and `r_right` (spike probabilities per step): one side, drawn at random, fires at
`--rate-high`, the other at `--rate-low`. Then both fall silent for the delay, and a *recall*
population fires during the last `recall` steps. The label is the side that fired more (0: left,
1: right).

The model is a `RecurrentSpikingLayer` of ALIF neurons read by a `LeakyRateReadout` with two
outputs. The loss is the cross-entropy of the readout during the recall window only: the target at
each step is `(label, mask)`, with the mask `1 / recall` in the recall window and `0` elsewhere.
The prediction is the argmax of the readout at the final step; chance is 50%.

Training is Adam after clipping the gradient's global norm, with a learning rate that decays to
zero over the run (cosine), and the neurons' spike function has a shallow sigmoid surrogate
(`--surrogate-alpha 2`, peak derivative 0.5). With the steeper default surrogate (`alpha=4`) and a
constant learning rate, BPTT learnt the task and then fell back to chance on some seeds.
`benchmarks/task_suite.py` trains this task (as `evidence`, with these defaults) with every rule over
three seeds.

Run it with `python examples/spiking_evidence.py` (`--algorithm d_rtrl` or `bptt` for the others);
`main([...])` returns the final test accuracy (for tests); `--curve FILE` also writes the training
curve as JSON (`benchmarks/spiking_curves.py` plots three rules over three seeds). The first
progress line's time per step includes the one-off JIT compilation.
"""

import argparse
import json
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqtrace
import eqtrace.nn as enn


CHANCE = 0.5


class SpikingClassifier(eqx.Module):
    """Poisson spikes → recurrent spiking layer → leaky rate readout (the logits)."""

    rec: enn.RecurrentSpikingLayer
    out: enn.LeakyRateReadout

    def __init__(self, n_in, n_rec, n_out, *, neuron, input_scale, readout_tau, surrogate_alpha, key):
        k1, k2 = jax.random.split(key)
        # A shallow surrogate (peak derivative alpha / 4): with a steep one, the gradient through
        # the recurrent spikes over the whole trial is large and noisy, and training that has
        # reached high accuracy can fall back to chance.
        surrogate = enn.SigmoidSurrogate(alpha=surrogate_alpha)
        if neuron == "alif":
            cell = enn.ALIF(n_rec, tau=20.0, tau_a=200.0, beta=0.2, v_th=1.0, surrogate=surrogate)
        else:
            cell = enn.LIF(n_rec, tau=20.0, v_th=1.0, surrogate=surrogate)
        rec = enn.RecurrentSpikingLayer(n_in, n_rec, neuron=cell, key=k1)
        # Scale the input rows of the weight so that sparse Poisson input drives the neurons to fire.
        rec = eqx.tree_at(lambda r: r.W.weight, rec, rec.W.weight.at[:n_in].multiply(input_scale))
        self.rec = rec
        self.out = enn.LeakyRateReadout(n_rec, n_out, tau=readout_tau, key=k2)

    def __call__(self, x, state):
        rec = self.rec(x, state["rec"])
        out = self.out(self.rec.spike(rec), state["out"])
        return out.r, {"rec": rec, "out": out}

    def init_state(self):
        return {"rec": self.rec.init_state(), "out": self.out.init_state()}


def evidence_batch(key, batch, n_in, cue, delay, recall, rate_high, rate_low, dtype):
    """`xs` `(batch, T, n_in)` of 0/1 spikes, `targets` `(batch, T, 2)` = (label, mask), and
    `labels` `(batch,)`."""
    T = cue + delay + recall
    n_side = (2 * n_in) // 5  # 40% left, 40% right, 20% recall cue
    lkey, skey = jax.random.split(key)
    labels = jax.random.bernoulli(lkey, 0.5, (batch,)).astype(jnp.int32)
    right = labels.astype(dtype)[:, None]
    rate_left = rate_high * (1 - right) + rate_low * right  # (batch, 1)
    rate_right = rate_high * right + rate_low * (1 - right)
    t = jnp.arange(T)
    is_cue = (t < cue).astype(dtype)[None, :]  # (1, T)
    is_recall = (t >= cue + delay).astype(dtype)[None, :]
    rates = jnp.concatenate(
        [
            jnp.broadcast_to((rate_left * is_cue)[:, :, None], (batch, T, n_side)),
            jnp.broadcast_to((rate_right * is_cue)[:, :, None], (batch, T, n_side)),
            jnp.broadcast_to((0.2 * is_recall)[:, :, None], (batch, T, n_in - 2 * n_side)),
        ],
        axis=-1,
    )
    xs = (jax.random.uniform(skey, rates.shape, dtype) < rates).astype(dtype)
    mask = jnp.broadcast_to(is_recall / recall, (batch, T))
    targets = jnp.stack([jnp.broadcast_to(right, (batch, T)), mask], axis=-1)
    return xs, targets, labels


def loss_fn(y, target):
    label, mask = target[0], target[1]
    logp = jax.nn.log_softmax(y)
    return -mask * (label * logp[1] + (1 - label) * logp[0])


def predict(model, xs):
    """Argmax of the readout at the final step, for a batch `(batch, T, n_in)`."""

    def run(x_seq):
        def body(s, x):
            y, s = model(x, s)
            return s, y

        _, ys = jax.lax.scan(body, model.init_state(), x_seq)
        return jnp.argmax(ys[-1]).astype(jnp.int32)

    return jax.vmap(run)(xs)


def make_step(optim, algorithm, decay):
    if algorithm == "bptt":
        grad_fn, kwargs = eqtrace.bptt_grad, {}
    else:
        grad_fn, kwargs = eqtrace.online_grad, {"algorithm": algorithm}
        if algorithm == "es_d_rtrl":
            kwargs["decay"] = decay

    @eqx.filter_jit
    def step(model, opt_state, xs, targets, labels):
        batch = xs.shape[0]
        states = jax.vmap(lambda _: model.init_state())(jnp.arange(batch))
        grads, losses = eqtrace.batch_grad(grad_fn, model, states, xs, targets, loss_fn, **kwargs)
        accuracy = jnp.mean(predict(model, xs) == labels)  # of the model before this update
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, jnp.sum(losses), accuracy

    return step


@eqx.filter_jit
def accuracy(model, xs, labels):
    return jnp.mean(predict(model, xs) == labels)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--algorithm", choices=["es_d_rtrl", "d_rtrl", "bptt"], default="es_d_rtrl")
    parser.add_argument("--neuron", choices=["alif", "lif"], default="alif")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--inputs", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--cue", type=int, default=30)
    parser.add_argument("--delay", type=int, default=10)
    parser.add_argument("--recall", type=int, default=5)
    parser.add_argument("--rate-high", type=float, default=0.08)
    parser.add_argument("--rate-low", type=float, default=0.03)
    parser.add_argument("--input-scale", type=float, default=3.0)
    parser.add_argument("--readout-tau", type=float, default=5.0)
    parser.add_argument("--surrogate-alpha", type=float, default=2.0, help="slope of the sigmoid surrogate")
    parser.add_argument("--decay", type=float, default=0.9, help="ES-D-RTRL's input-trace decay")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping (global norm)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--test-batch", type=int, default=512)
    parser.add_argument("--print-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curve", default=None, help="write the training curve to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    """Train and return the test accuracy on `--test-batch` fresh trials."""
    args = parse_args(argv)
    mkey, dkey, tkey = jax.random.split(jax.random.key(args.seed), 3)
    model = SpikingClassifier(
        args.inputs,
        args.hidden,
        2,
        neuron=args.neuron,
        input_scale=args.input_scale,
        readout_tau=args.readout_tau,
        surrogate_alpha=args.surrogate_alpha,
        key=mkey,
    )
    dtype = model.rec.W.weight.dtype
    task = (args.cue, args.delay, args.recall, args.rate_high, args.rate_low, dtype)
    # The learning rate decays to zero over the run (cosine): at a constant rate, Adam's steps keep
    # their size after the task is learnt and can carry the network away from the solution.
    schedule = optax.cosine_decay_schedule(args.lr, args.steps)
    optim = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(schedule))
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(optim, args.algorithm, args.decay)

    print(
        f"evidence accumulation: {args.inputs} inputs, {args.hidden} {args.neuron.upper()} neurons, "
        f"T={args.cue + args.delay + args.recall}, batch={args.batch}, algorithm={args.algorithm}, "
        f"chance {CHANCE:.2f}"
    )
    test_xs, _, test_labels = evidence_batch(tkey, args.test_batch, args.inputs, *task)
    initial = float(accuracy(model, test_xs, test_labels))
    print(f"initial test accuracy {initial:.3f}")
    losses, accs = [], []
    curve = {"step": [], "loss": [], "accuracy": []}  # means over each `--print-every` block
    tic = time.perf_counter()
    for i, key in enumerate(jax.random.split(dkey, args.steps), start=1):
        xs, targets, labels = evidence_batch(key, args.batch, args.inputs, *task)
        model, opt_state, loss, acc = step(model, opt_state, xs, targets, labels)
        losses.append(loss)
        accs.append(acc)
        if i % args.print_every == 0 or i == args.steps:
            mean_loss = float(jnp.mean(jnp.stack(losses)))
            mean_acc = float(jnp.mean(jnp.stack(accs)))
            toc = time.perf_counter()
            for name, value in (("step", i), ("loss", mean_loss), ("accuracy", mean_acc)):
                curve[name].append(value)
            print(
                f"step {i:5d}  loss {mean_loss:.4f}  accuracy {mean_acc:.3f}  "
                f"{1e3 * (toc - tic) / len(losses):.1f} ms/step"
            )
            losses, accs, tic = [], [], toc
    final = float(accuracy(model, test_xs, test_labels))
    print(f"test accuracy {final:.3f} on {args.test_batch} fresh trials (chance {CHANCE:.2f})")
    if args.curve is not None:
        record = dict(vars(args), **curve, initial_test_accuracy=initial, test_accuracy=final)
        pathlib.Path(args.curve).write_text(json.dumps(record, indent=1))
    return final


if __name__ == "__main__":
    main()
