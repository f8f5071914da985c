"""Time braintrace's online learners on the same GRU / vanilla-RNN problems as eqtrace's benchmarks.

Imported only when braintrace is installed (the optional `bench` extra)."""

import time
import warnings

import brainstate
import braintrace
import jax
import jax.numpy as jnp
from _timing import time_calls


def time_braintrace(
    cell: str,
    n_in: int,
    n: int,
    n_out: int,
    xs,
    targets,
    algorithm: str,
    reps: dict,
    *,
    compiled: list | None = None,
    **options,
):
    """Median seconds per gradient call of braintrace's `algorithm` (`"D_RTRL"` or `"pp_prop"`) on
    `xs`, `targets` shaped `(batch, T, ...)`; returns `(seconds, first_call_seconds, repetitions)`.
    Given a list `compiled`, appends the compiled XLA executable to it."""

    class BTNet(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            cls = {"gru": braintrace.nn.GRUCell, "rnn": braintrace.nn.ValinaRNNCell}[cell]
            kw = {"activation": "tanh"} if cell == "rnn" else {}
            self.rnn = cls(n_in, n, **kw)
            self.out = braintrace.nn.Linear(n, n_out)

        def update(self, x):
            return self.out(self.rnn(x))

    xs, targets = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1)  # braintrace: (T, B, ...)
    brainstate.random.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = braintrace.compile(
            BTNet(), getattr(braintrace, algorithm), xs[0], batch_size=xs.shape[1], **options
        )

    def step_loss(x, y):
        return jnp.mean((learner(x) - y) ** 2)

    @brainstate.transform.jit
    def grad(seq_x, seq_y):
        return learner.etrace_grad(seq_x, seq_y, step_fn=step_loss, return_value=True)

    t0 = time.perf_counter()
    jax.block_until_ready(grad(xs, targets))
    first = time.perf_counter() - t0
    # brainstate's jit compiles once more on the second call (about 1 s here): time after it.
    jax.block_until_ready(grad(xs, targets))
    seconds, nrep = time_calls(lambda: grad(xs, targets), **reps)
    if compiled is not None:
        compiled.append(grad.lower(xs, targets).compile())
    return seconds, first, nrep
