"""Freezing a GRU's big gate weights: trace size, XLA memory and time of `online_grad`, with and
without `filter_spec`. Prints a Markdown table (used in docs/guides/freezing.md).

    PYTHONPATH=. python benchmarks/freezing.py [--input 512 --hidden 128 --batch 16 --steps 100]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

import eqtrace
from benchmarks._timing import fmt_bytes, fmt_time, measure


class Model(eqx.Module):
    rnn: eqtrace.nn.GRUCell
    out: eqtrace.nn.Linear

    def __call__(self, x, state):
        state = self.rnn(x, state)
        return self.out(state.h), state

    def init_state(self):
        return self.rnn.init_state()


def loss_fn(y, target):
    return jnp.mean((y - target) ** 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    model = Model(
        eqtrace.nn.GRUCell(args.input, args.hidden, key=k1), eqtrace.nn.Linear(args.hidden, 10, key=k2)
    )
    # Train the gates' biases and the readout; freeze the gates' `(input + hidden, hidden)` weights.
    frozen_spec = eqx.tree_at(
        lambda m: (m.rnn.Wz.weight, m.rnn.Wr.weight, m.rnn.Wh.weight),
        jtu.tree_map(eqx.is_inexact_array, model),
        replace=(False, False, False),
    )
    xs = jax.random.normal(k3, (args.batch, args.steps, args.input))
    targets = jnp.zeros((args.batch, args.steps, 10))
    states = jtu.tree_map(lambda a: jnp.broadcast_to(a, (args.batch,) + a.shape), model.init_state())
    x0 = jnp.zeros(args.input)
    reps = dict(min_reps=3, max_reps=7, min_time=1.5)
    print(
        f"GRU input {args.input}, hidden {args.hidden}, readout 10, batch {args.batch}, T = {args.steps}, "
        f"float32, {jax.devices()[0].platform}"
    )
    print()
    print("| rule | weights | trace bytes per example | XLA temp memory | time per sequence batch |")
    print("|---|---|---|---|---|")
    for algorithm in (eqtrace.DRTRL(), eqtrace.ESDRTRL()):
        for name, spec in (("all trained", None), ("gate weights frozen", frozen_spec)):
            graph = eqtrace.compile_etrace_graph(
                model, x0, model.init_state(), filter_spec=eqx.is_inexact_array if spec is None else spec
            )
            traces = algorithm.init(graph, model, model.init_state())
            trace_bytes = sum(a.nbytes for a in jtu.tree_leaves(eqx.filter(traces, eqx.is_array)))

            def grad(model, states, xs, targets):
                return eqtrace.batch_grad(
                    eqtrace.online_grad, model, states, xs, targets, loss_fn, algorithm=algorithm, graph=graph
                )

            rec = measure(grad, (model, states, xs, targets), run=True, reps=reps)
            print(
                f"| {type(algorithm).__name__} | {name} | {fmt_bytes(trace_bytes)} | "
                f"{fmt_bytes(rec['temp_bytes'])} | {fmt_time(rec['time_s'])} |"
            )


if __name__ == "__main__":
    main()
