"""eqtrace in one page: build a recurrent model, compile its graph, train it online with D-RTRL.

The task: read a stream of noisy inputs and output, at every step, the input from `delay` steps
ago. The network must hold a short memory in its hidden state, and D-RTRL learns it forward in
time, with eligibility traces instead of back-propagation through time.

Run it with `python examples/quickstart.py`; `main(steps=..., ...)` takes small sizes (for tests).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqtrace
import eqtrace.nn as enn


# A model is an `eqx.Module` with `model(x, state) -> (y, new_state)` and `init_state()`.
class GRUModel(eqx.Module):
    rnn: enn.GRUCell
    out: enn.Linear

    def __init__(self, n_in, n_rec, n_out, *, key):
        k1, k2 = jax.random.split(key)
        self.rnn = enn.GRUCell(n_in, n_rec, key=k1)
        self.out = enn.Linear(n_rec, n_out, key=k2)

    def __call__(self, x, state):
        rnn = self.rnn(x, state["rnn"])
        return self.out(rnn.h), {"rnn": rnn}

    def init_state(self):
        return {"rnn": self.rnn.init_state()}


def delayed_copy(key, batch, seq_len, delay):
    """Inputs `(batch, T, 1)` of N(0, 1) noise; targets: the inputs shifted `delay` steps later."""
    xs = jax.random.normal(key, (batch, seq_len, 1))
    targets = jnp.pad(xs, ((0, 0), (delay, 0), (0, 0)))[:, :seq_len]
    return xs, targets


def loss_fn(y, target):
    return jnp.mean((y - target) ** 2)


def main(steps=300, *, hidden=32, seq_len=30, batch=16, delay=2, lr=1e-2, print_every=50, seed=0):
    """Train and return `(initial_loss, final_loss)`, the mean per-step losses of the first and last step."""
    model_key, data_key = jax.random.split(jax.random.key(seed))
    model = GRUModel(1, hidden, 1, key=model_key)

    # 1. Compile the model's graph: which weights reach which hidden states through which operations.
    x0, state0 = jnp.zeros((1,)), model.init_state()
    graph = eqtrace.compile_etrace_graph(model, x0, state0)
    eqtrace.show_graph(graph)

    # 2. An optax optimiser, and a jitted training step on a batch of sequences.
    optim = optax.adam(lr)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, xs, targets):
        states = jax.vmap(lambda _: model.init_state())(jnp.arange(xs.shape[0]))
        grads, losses = eqtrace.batch_grad(
            eqtrace.online_grad, model, states, xs, targets, loss_fn, algorithm="d_rtrl", graph=graph
        )
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, jnp.mean(losses)

    # 3. Train online: each step is one forward pass in time over the batch, then an update.
    print(f"training a GRU ({hidden} units) online with D-RTRL to copy its input {delay} steps later")
    for i, key in enumerate(jax.random.split(data_key, steps), start=1):
        xs, targets = delayed_copy(key, batch, seq_len, delay)
        model, opt_state, loss = step(model, opt_state, xs, targets)
        if i == 1:
            initial = float(loss)
        if i % print_every == 0 or i == steps:
            print(f"step {i:4d}  loss {float(loss):.4f}")
    final = float(loss)
    print(f"initial loss {initial:.4f} -> final loss {final:.4f}")
    return initial, final


if __name__ == "__main__":
    main()
