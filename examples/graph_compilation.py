"""Graph compilation and visualisation: the braintrace tutorial, in eqtrace's idiom.

Three models are compiled into an `eqtrace.ETraceGraph` and inspected: a single-layer RNN, two
stacked GRUs, and a convolution feeding an RNN; a fourth, with a delay line and a weight used both
inside and outside an ETP operation, shows what the graph reports beyond the tutorial. See
`docs/tutorials/graph-compilation.ipynb` (the same code as a notebook).

Run it with `python examples/graph_compilation.py`; `main(small=True)` uses small sizes (for tests).
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqtrace
import eqtrace.nn as enn


# ---------------------------------------------------------------------------------------------
# Models. Each is an `eqx.Module` with `model(x, state) -> (y, new_state)` and `init_state()`.
# ---------------------------------------------------------------------------------------------


class SingleLayerRNN(eqx.Module):
    rnn: enn.ValinaRNNCell
    out: enn.Linear

    def __init__(self, n_in, n_rec, n_out, *, key):
        k1, k2 = jax.random.split(key)
        self.rnn = enn.ValinaRNNCell(n_in, n_rec, key=k1)
        self.out = enn.Linear(n_rec, n_out, key=k2)

    def __call__(self, x, state):
        rnn = self.rnn(x, state["rnn"])
        return self.out(rnn.h), {"rnn": rnn}

    def init_state(self):
        return {"rnn": self.rnn.init_state()}


class TwoLayerRNN(eqx.Module):
    rnn1: enn.GRUCell
    rnn2: enn.GRUCell
    out: enn.Linear

    def __init__(self, n_in, n_rec, n_out, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.rnn1 = enn.GRUCell(n_in, n_rec, key=k1)
        self.rnn2 = enn.GRUCell(n_rec, n_rec, key=k2)
        self.out = enn.Linear(n_rec, n_out, key=k3)

    def __call__(self, x, state):
        rnn1 = self.rnn1(x, state["rnn1"])
        rnn2 = self.rnn2(rnn1.h, state["rnn2"])
        return self.out(rnn2.h), {"rnn1": rnn1, "rnn2": rnn2}

    def init_state(self):
        return {"rnn1": self.rnn1.init_state(), "rnn2": self.rnn2.init_state()}


class ConvRNN(eqx.Module):
    conv: enn.Conv2d
    rnn: enn.ValinaRNNCell
    out: enn.Linear

    def __init__(self, *, size=28, channels=8, n_rec=64, n_out=10, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = enn.Conv2d(1, channels, kernel_size=3, padding="SAME", key=k1)
        self.rnn = enn.ValinaRNNCell(channels * size * size, n_rec, key=k2)
        self.out = enn.Linear(n_rec, n_out, key=k3)

    def __call__(self, x, state):
        # x: (1, size, size), a single-channel image
        features = self.conv(x).reshape(-1)
        rnn = self.rnn(features, state["rnn"])
        return self.out(rnn.h), {"rnn": rnn}

    def init_state(self):
        return {"rnn": self.rnn.init_state()}


class DelayLineRNN(eqx.Module):
    rnn: enn.IndRNNCell
    out: enn.Linear

    def __init__(self, n_in, n_rec, n_out, *, key):
        k1, k2 = jax.random.split(key)
        self.rnn = enn.IndRNNCell(n_in, n_rec, activation=jnp.tanh, key=k1)
        self.out = enn.Linear(2 * n_rec, n_out, key=k2)

    def __call__(self, x, state):
        h = self.rnn(x, enn.IndRNNState(h=state["h"])).h
        h = h + 0.5 * (x @ self.rnn.W.weight)  # the input weight again, outside `eqtrace.matmul`
        y = self.out(jnp.concatenate([h, state["h_prev"]]))  # h_t and h_{t-2}
        return y, {"h": h, "h_prev": state["h"]}  # `h_prev` copies the old `h`: a delay line

    def init_state(self):
        zeros = jnp.zeros(self.rnn.hidden_size)
        return {"h": zeros, "h_prev": zeros}


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------


def inspect_graph(graph: eqtrace.ETraceGraph) -> None:
    """The notebook's programmatic inspection, plus the weights outside any relation."""
    print("=== Hidden Groups ===")
    for g in graph.hidden_groups:
        print(f"  Group {g.index}: {g.num_state} state(s), shape {g.varshape}")
        print(f"    Paths: {g.hidden_paths}")

    print("\n=== Weight-Primitive-Hidden Relations ===")
    for i, r in enumerate(graph.hidden_param_op_relations):
        print(f"  Relation {i}:")
        print(f"    Weight path: {r.weight_path}")
        print(f"    Primitive: {r.primitive}")
        print(f"    Hidden groups: {[g.index for g in r.hidden_groups]}")

    print("\n=== Perturbation ===")
    print(f"  Has perturbation: {graph.hidden_perturb is not None}")
    if graph.hidden_perturb is not None:
        for path, producer in zip(graph.hidden_perturb.hidden_paths, graph.hidden_perturb.producers):
            print(f"    {path} <- {producer}")

    print("\n=== Excluded Weights (no trace: exact gradient within the window only) ===")
    for w in graph.excluded_weights:
        print(f"  {w.weight_path}: {w.reason}")


def main(small: bool = False) -> None:
    n_in, n_rec, n_out = (4, 8, 3) if small else (10, 32, 5)
    size, channels, conv_rec = (6, 2, 8) if small else (28, 8, 64)
    steps = 6 if small else 20
    key1, key2, key3, key4, key5 = jax.random.split(jax.random.key(0), 5)

    # --- Single-layer RNN -----------------------------------------------------------------
    print("## Single-layer RNN\n")
    model = SingleLayerRNN(n_in, n_rec, n_out, key=key1)
    algo = eqtrace.D_RTRL(model).compile_graph(jnp.zeros(n_in))
    algo.show_graph()

    # --- Understanding ETraceGraph --------------------------------------------------------
    print("\n## Understanding ETraceGraph\n")
    inspect_graph(algo.graph)

    # The compiled algorithm runs one step, checking shapes against the compiled graph.
    y, state = algo(jnp.ones(n_in), model.init_state())
    print(f"\nOne step: y.shape = {y.shape}, state['rnn'].h.shape = {state['rnn'].h.shape}")

    # --- Two-layer RNN --------------------------------------------------------------------
    print("\n## Two-layer RNN\n")
    model2 = TwoLayerRNN(n_in, n_rec, n_out, key=key2)
    algo2 = eqtrace.D_RTRL(model2).compile_graph(jnp.zeros(n_in))
    algo2.show_graph()

    graph2 = algo2.graph
    print(f"\nNumber of hidden groups: {len(graph2.hidden_groups)}")
    print(f"Number of weight-hidden relations: {len(graph2.hidden_param_op_relations)}")

    print("\nHidden groups:")
    for g in graph2.hidden_groups:
        print(f"  Group {g.index}: {g.hidden_paths}")

    print("\nRelations:")
    for i, r in enumerate(graph2.hidden_param_op_relations):
        groups = [g.index for g in r.hidden_groups]
        print(f"  Weight {i}: {r.weight_path} -> hidden group(s) {groups}")

    print("\nExcluded weights:")
    for w in graph2.excluded_weights:
        print(f"  {w.weight_path}: {w.reason}")

    print("\nMermaid:")
    print(graph2.to_mermaid())

    # --- Convolutional network ------------------------------------------------------------
    print("\n## Convolutional network\n")
    model3 = ConvRNN(size=size, channels=channels, n_rec=conv_rec, key=key3)
    algo3 = eqtrace.D_RTRL(model3).compile_graph(jnp.zeros((1, size, size)))
    algo3.show_graph()

    # --- compile_etrace_graph directly ----------------------------------------------------
    print("\n## Using compile_etrace_graph directly\n")
    model_direct = SingleLayerRNN(n_in, n_rec, n_out, key=key4)
    graph_direct = eqtrace.compile_etrace_graph(model_direct, jnp.zeros(n_in), model_direct.init_state())

    print(f"Number of hidden groups: {len(graph_direct.hidden_groups)}")
    print(f"Number of relations: {len(graph_direct.hidden_param_op_relations)}")
    print(f"Has perturbation: {graph_direct.hidden_perturb is not None}")

    print("\nGraph fields:")
    for key in graph_direct.dict().keys():
        print(f"  {key}")

    # --- Delay lines and weights with an untraced use -------------------------------------
    print("\n## Delay lines and weights with an untraced use\n")
    model5 = DelayLineRNN(n_in, n_rec, n_out, key=key5)
    # With `infer_etp_ops=False` the plain `@` on `W` stays untagged: an untraced use of `W`.
    graph5 = eqtrace.compile_etrace_graph(model5, jnp.zeros(n_in), infer_etp_ops=False)
    eqtrace.show_graph(graph5)

    xs = jax.random.normal(jax.random.key(1), (steps, n_in))  # (time, features)
    targets = jnp.zeros((steps, n_out))
    loss_fn = lambda y, target: jnp.sum((y - target) ** 2)
    g_bptt, _ = eqtrace.bptt_grad(model5, model5.init_state(), xs, targets, loss_fn)
    for window in (1, steps):
        g, _ = eqtrace.online_grad(
            model5, model5.init_state(), xs, targets, loss_fn, window=window, graph=graph5
        )
        print(f"\nwindow={window}: relative error against BPTT")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_bptt)):
            error = jnp.linalg.norm(a - b) / jnp.linalg.norm(b)
            print(f"  {jax.tree_util.keystr(path):<14} {float(error):.0e}")


if __name__ == "__main__":
    main()
