"""Rate neurons defined by an ODE, solved by Diffrax at every step, and trained online with D-RTRL.

Each neuron's membrane follows `dV/dt = (-V + W x + b) / τ`, integrated over one step `dt` by
`diffrax.diffeqsolve` (Tsit5, Diffrax's default adjoint); the network reads `tanh(V)` out linearly.
Both the input weights and the per-neuron time constants `τ` are learnt. The task: reproduce the
output of a *teacher* network of the same form, with other weights and time constants spread from
fast to slow, driven by the same noisy inputs. On these position-wise dynamics D-RTRL's gradient is
exact, so online learning matches BPTT while its memory stays constant in the sequence length.

Run it with `python examples/ode_neurons.py`; `main(steps=..., ...)` takes small sizes (for tests).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqtrace
import eqtrace.nn as enn


class ODERateNetwork(eqx.Module):
    """Leaky-integrator rate neurons `dV/dt = (-V + W x + b) / τ`, solved over `dt` per step, with a
    linear readout of `tanh(V)`. The ETP operations (the input layer, and `τ = exp(log_tau)` through
    `eqtrace.element_wise`) stand before the solve; the vector field reads them through `args`."""

    inputs: enn.Linear
    log_tau: jax.Array
    readout: enn.Linear
    dt: float = eqx.field(static=True)

    def __init__(self, n_in, n_hidden, n_out, *, tau, dt=1.0, key):
        k1, k2 = jax.random.split(key)
        self.inputs = enn.Linear(n_in, n_hidden, key=k1)
        self.log_tau = jnp.log(jnp.broadcast_to(jnp.asarray(tau, float), (n_hidden,)))
        self.readout = enn.Linear(n_hidden, n_out, key=k2)
        self.dt = dt

    def __call__(self, x, v):
        current = self.inputs(x)
        tau = eqtrace.element_wise(self.log_tau, jnp.exp)
        term = diffrax.ODETerm(lambda t, v, args: (-v + args[0]) / args[1])
        solution = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, self.dt, self.dt, v, args=(current, tau))
        assert solution.ys is not None  # saved at `t1`, diffrax's default
        v = solution.ys[-1]
        return self.readout(jnp.tanh(v)), v

    def init_state(self):
        return jnp.zeros(self.log_tau.shape)


@eqx.filter_jit
def teacher_data(teacher, key, batch, seq_len, n_in):
    """Noisy inputs `(batch, T, n_in)` and the teacher's outputs on them."""
    xs = jax.random.normal(key, (batch, seq_len, n_in))

    def run(x_seq):
        def body(v, x):
            y, v = teacher(x, v)
            return v, y

        return jax.lax.scan(body, teacher.init_state(), x_seq)[1]

    return xs, jax.vmap(run)(xs)


def loss_fn(y, target):
    return jnp.mean((y - target) ** 2)


def main(steps=200, *, n_in=3, hidden=8, seq_len=20, batch=16, lr=2e-2, print_every=50, seed=0):
    """Train and return `(initial_loss, final_loss)`, the mean per-step losses of the first and last step."""
    k_teacher, k_student, k_data = jax.random.split(jax.random.key(seed), 3)
    teacher = ODERateNetwork(n_in, hidden, 1, tau=jnp.geomspace(0.5, 8.0, hidden), key=k_teacher)
    teacher = eqx.tree_at(lambda t: t.readout.weight, teacher, 3.0 * teacher.readout.weight)
    model = ODERateNetwork(n_in, hidden, 1, tau=2.0, key=k_student)

    # The compiler follows the solve's loop: one position-wise group, fed element-wise by the input
    # layer and by the time constants, so every learnt weight has an eligibility trace.
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(n_in), model.init_state())
    eqtrace.show_graph(graph)

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

    print(f"training {hidden} ODE rate neurons (Tsit5 per step) online with D-RTRL to follow a teacher")
    for i, key in enumerate(jax.random.split(k_data, steps), start=1):
        xs, targets = teacher_data(teacher, key, batch, seq_len, n_in)
        model, opt_state, loss = step(model, opt_state, xs, targets)
        if i == 1:
            initial = float(loss)
        if i % print_every == 0 or i == steps:
            print(f"step {i:4d}  loss {float(loss):.4f}")
    final = float(loss)
    print(f"initial loss {initial:.4f} -> final loss {final:.4f}")
    print("time constants learnt:", jnp.round(jnp.sort(jnp.exp(model.log_tau)), 2))
    return initial, final


if __name__ == "__main__":
    main()
