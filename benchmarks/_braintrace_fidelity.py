"""braintrace twins of `fidelity.py`'s eqtrace models: the same equations and the same weights, for
comparing online gradients on identical problems.

Imported only when braintrace is installed (the optional `bench` extra; tested with 0.2.6).
Parameter layout: braintrace's `Linear` keeps one `ParamState` holding `{'weight': (in, out),
'bias': (out,)}` and computes `x @ weight + bias`, the layout of `eqtrace.nn.Linear` (`weight`
`(in, out)`), so weights are copied without transposes; the GRU gates (`Wz`, `Wr`, `Wh`, each on
`[x; h]`, the reset gate applied to `h` before `Wh`) are separate layers in both libraries.
"""

import importlib.metadata
import warnings

import brainpy.state
import brainstate
import braintools
import braintrace
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


# (label, algorithm, vjp_method): the braintrace rules that fidelity.py measures.
RULES = (
    ("braintrace D_RTRL single-step", braintrace.D_RTRL, "single-step"),
    ("braintrace D_RTRL multi-step", braintrace.D_RTRL, "multi-step"),
    ("braintrace pp_prop single-step", braintrace.pp_prop, "single-step"),
    ("braintrace pp_prop multi-step", braintrace.pp_prop, "multi-step"),
)


def version():
    return importlib.metadata.version("braintrace")


class IndRNN(brainstate.nn.Module):
    """$h' = \\tanh(x W + b + u \\odot h)$, `u` through braintrace's ETP `element_wise` (as
    `eqtrace.nn.IndRNNCell` uses eqtrace's); braintrace has no IndRNN cell of its own."""

    def __init__(self, n_in, n):
        super().__init__()
        self.n = n
        self.W = braintrace.nn.Linear(n_in, n)
        self.u = brainstate.ParamState(jnp.zeros((n,), jnp.float32))

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(
            braintools.init.param(braintools.init.ZeroInit(), (self.n,), batch_size)
        )

    def reset_state(self, batch_size=None, **kwargs):
        self.h.value = braintools.init.param(braintools.init.ZeroInit(), (self.n,), batch_size)

    def update(self, x):
        self.h.value = jnp.tanh(self.W(x) + braintrace.element_wise(self.u.value) * self.h.value)
        return self.h.value


class Stack(brainstate.nn.Module):
    """Cells `l0`, `l1`, ... in sequence, then a Linear readout `out`."""

    def __init__(self, cells, n, n_out):
        super().__init__()
        self.n_layers = len(cells)
        for i, c in enumerate(cells):
            setattr(self, f"l{i}", c)
        self.out = braintrace.nn.Linear(n, n_out)

    def update(self, x):
        for i in range(self.n_layers):
            x = getattr(self, f"l{i}")(x)
        return self.out(x)


class LIFNet(brainstate.nn.Module):
    """brainpy.state's LIF (soft reset, sigmoid surrogate of slope 4, tau 20, threshold 1, all
    unitless) driven through a `DeltaProj` by `Linear([x_t; s_{t-1}])`, read by braintrace's
    `LeakyRateReadout` (tau 5)."""

    def __init__(self, n_in, n, n_out):
        super().__init__()
        self.neu = brainpy.state.LIF(
            n,
            R=1.0,
            tau=20.0,
            V_th=1.0,
            V_reset=0.0,
            V_rest=0.0,
            V_initializer=braintools.init.Constant(0.0),
            spk_fun=braintools.surrogate.Sigmoid(4.0),
            spk_reset="soft",
        )
        self.syn = brainstate.nn.DeltaProj(comm=braintrace.nn.Linear(n_in + n, n), post=self.neu)
        self.out = braintrace.nn.LeakyRateReadout(n, n_out, tau=5.0)

    def update(self, x):
        self.syn(jnp.concatenate([x, self.neu.get_spike()], axis=-1))
        return self.out(self.neu(0.0))


def _linear(eq_lin, bt_lin):
    """Pairs for a Linear: (eqtrace getter, braintrace ParamState, key in its dict)."""
    return [
        (lambda m, f=eq_lin: f(m).weight, bt_lin.weight, "weight"),
        (lambda m, f=eq_lin: f(m).bias, bt_lin.weight, "bias"),
    ]


def build(name, n_in, n, n_out):
    """The braintrace model `name` and its parameter pairs `(eqtrace getter, ParamState, key)`."""
    if name in ("indrnn", "rnn", "gru2"):
        if name == "indrnn":
            cells = [IndRNN(n_in, n)]
        elif name == "rnn":
            cells = [braintrace.nn.ValinaRNNCell(n_in, n, activation="tanh")]
        else:
            cells = [braintrace.nn.GRUCell(n_in, n), braintrace.nn.GRUCell(n, n)]
        net = Stack(cells, n, n_out)
        pairs = []
        for i, c in enumerate(cells):
            cell = lambda m, i=i: m.cells[i]  # noqa: E731
            if name == "indrnn":
                pairs += _linear(lambda m, cell=cell: cell(m).W, c.W)
                pairs.append((lambda m, cell=cell: cell(m).u, c.u, None))
            elif name == "rnn":
                pairs += _linear(lambda m, cell=cell: cell(m).W, c.W)
            else:
                for g in ("Wz", "Wr", "Wh"):
                    pairs += _linear(lambda m, cell=cell, g=g: getattr(cell(m), g), getattr(c, g))
        pairs += _linear(lambda m: m.out, net.out)
        return net, pairs
    if name == "lif":
        net = LIFNet(n_in, n, n_out)
        pairs = _linear(lambda m: m.layer.W, net.syn.comm)
        pairs.append((lambda m: m.out.W.weight, net.out.W, None))
        return net, pairs
    raise ValueError(f"no braintrace twin for {name!r}")


class Twin:
    """The braintrace copy of an eqtrace model, with its BPTT and online gradients returned in the
    eqtrace model's structure."""

    def __init__(self, name, eq_model, n, n_out, batch, decay):
        brainstate.environ.set(dt=1.0)
        n_in = 100 if name == "lif" else 32
        self.name, self.batch, self.decay = name, batch, decay
        self.eq_model = eq_model
        self.net, self.pairs = build(name, n_in, n, n_out)
        # Copy every weight; a ParamState holding a dict (a Linear) is written once, whole.
        values = {}
        for get, state, key in self.pairs:
            value = jnp.asarray(get(eq_model), jnp.float32)
            if key is None:
                values[id(state)] = (state, value)
            else:
                values.setdefault(id(state), (state, {}))[1][key] = value
        for state, value in values.values():
            old = state.value
            assert jax.tree.structure(old) == jax.tree.structure(value), (self.name, old, value)
            assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(value)))
            state.value = value
        covered = {id(s) for _, s, _ in self.pairs}
        self.params = self.net.states(brainstate.ParamState)
        missing = [p for p, s in self.params.items() if id(s) not in covered]
        assert not missing, f"braintrace parameters not copied from eqtrace: {missing}"
        self.path_of = {id(s): p for p, s in self.params.items()}
        n_leaves = len(jax.tree.leaves(eqx.filter(eq_model, eqx.is_inexact_array)))
        assert n_leaves == len(self.pairs), f"{name}: eqtrace has {n_leaves} leaves, {len(self.pairs)} mapped"

    def _to_eqtrace(self, grads):
        """braintrace gradients `{path: value}` → the eqtrace model's structure (zeros elsewhere)."""
        vals, getters = [], []
        for get, state, key in self.pairs:
            g = grads[self.path_of[id(state)]]
            vals.append(np.asarray(g if key is None else g[key]))
            getters.append(get)
        zero = jax.tree.map(jnp.zeros_like, eqx.filter(self.eq_model, eqx.is_inexact_array))
        return eqx.tree_at(lambda m: [get(m) for get in getters], zero, [jnp.asarray(v) for v in vals])

    def _fresh_states(self):
        brainstate.nn.init_all_states(self.net, batch_size=self.batch)

    def check_forward(self, xs, ys_eqtrace):
        """Assert that the output sequence equals eqtrace's (`ys_eqtrace` `(T, B, out)`)."""
        self._fresh_states()
        xs_t = jnp.swapaxes(xs, 0, 1)

        @brainstate.transform.jit
        def run(xs_t):
            brainstate.nn.reset_all_states(self.net, batch_size=self.batch)
            return brainstate.transform.for_loop(self.net, xs_t)

        ys = np.asarray(run(xs_t))
        np.testing.assert_allclose(
            ys, ys_eqtrace, rtol=1e-4, atol=1e-5, err_msg=f"{self.name}: outputs differ"
        )

    def bptt(self, xs, targets):
        """BPTT gradient of the batch-mean $\\sum_t \\mathrm{MSE}_t$, in eqtrace's structure."""
        self._fresh_states()
        xs_t, ts_t = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1)

        def total(xs_t, ts_t):
            brainstate.nn.reset_all_states(self.net, batch_size=self.batch)
            losses = brainstate.transform.for_loop(lambda x, t: jnp.mean((self.net(x) - t) ** 2), xs_t, ts_t)
            return jnp.sum(losses)

        grad = brainstate.transform.jit(brainstate.transform.grad(total, self.params))
        return self._to_eqtrace(grad(xs_t, ts_t))

    def online(self, algorithm, vjp_method, xs, targets):
        """braintrace's online gradient (`etrace_grad`, one step per call, `reduction='sum'`) from
        zero states and traces, in eqtrace's structure; with a callable that repeats the (compiled) call."""
        xs_t, ts_t = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1)
        options = {"vjp_method": vjp_method}
        if algorithm is braintrace.pp_prop:
            options["decay_or_rank"] = self.decay
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner = braintrace.compile(self.net, algorithm, xs_t[0], batch_size=self.batch, **options)
        # Every state the learner and the model carry (hidden states, traces, step counter),
        # restored to its value right after compilation at the start of each call.
        states = [s for s in learner.states().values() if not isinstance(s, brainstate.ParamState)]
        initial = [s.value for s in states]

        def step_loss(x, t):
            return jnp.mean((learner(x) - t) ** 2)

        @brainstate.transform.jit
        def grad(xs_t, ts_t):
            for s, v in zip(states, initial):
                s.value = v
            return learner.etrace_grad(xs_t, ts_t, step_fn=step_loss, reduction="sum")

        g = jax.block_until_ready(grad(xs_t, ts_t))
        g2 = grad(xs_t, ts_t)
        assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2))), (
            "braintrace's gradient changed between calls: its states were not reset"
        )
        return self._to_eqtrace(g), lambda: grad(xs_t, ts_t)
