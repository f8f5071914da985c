"""Helpers shared by the tests: pytree comparison with tolerances that depend on dtype, and the
oracles that several rules' tests share."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqtrace


# (rtol, atol) by floating dtype; anything else (integers, bools) must match exactly.
_TOLERANCES = {
    jnp.dtype(jnp.float64): (1e-6, 1e-9),
    jnp.dtype(jnp.complex128): (1e-6, 1e-9),
    jnp.dtype(jnp.float32): (1e-4, 1e-6),
    jnp.dtype(jnp.complex64): (1e-4, 1e-6),
    jnp.dtype(jnp.float16): (1e-2, 1e-3),
    jnp.dtype(jnp.bfloat16): (1e-2, 1e-3),
}


def _tolerances(a, b, rtol, atol):
    # The looser tolerance of the two dtypes: comparing float32 to float64 is judged as float32.
    tols = [_TOLERANCES.get(jnp.result_type(x), (0.0, 0.0)) for x in (a, b)]
    default_rtol = max(t[0] for t in tols)
    default_atol = max(t[1] for t in tols)
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def _leaf_report(a, b, rtol, atol):
    """`None` if the leaves match, else a short description of how they differ."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    rtol, atol = _tolerances(a, b, rtol, atol)
    with jax.numpy_dtype_promotion("standard"):
        ok = bool(jnp.allclose(a, b, rtol=rtol, atol=atol))
    if ok:
        return None
    diff = np.abs(np.asarray(a, dtype=np.complex128) - np.asarray(b, dtype=np.complex128))
    scale = atol + rtol * np.abs(np.asarray(b, dtype=np.complex128))
    if diff.size == 0:
        return "empty leaves differ"
    worst = np.unravel_index(np.argmax(diff - scale), diff.shape)
    return (
        f"max |a-b| = {diff.max():.3e} (rtol={rtol:g}, atol={atol:g}); worst at index "
        f"{tuple(int(i) for i in worst)}: {np.asarray(a)[worst]!r} vs {np.asarray(b)[worst]!r}"
    )


def _compare(a, b, rtol, atol):
    """A list of `(path, report)` for every leaf that differs, or a structure mismatch."""
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(a)
    b_leaves, b_def = jax.tree_util.tree_flatten_with_path(b)
    if a_def != b_def:
        return [("<structure>", f"{a_def} != {b_def}")]
    failures = []
    for (path, x), (_, y) in zip(a_leaves, b_leaves, strict=True):
        report = _leaf_report(x, y, rtol, atol)
        if report is not None:
            failures.append((jax.tree_util.keystr(path) or "<root>", report))
    return failures


def tree_allclose(a, b, rtol=None, atol=None) -> bool:
    """Whether two pytrees have the same structure and leaf-wise `jnp.allclose` leaves.

    Default tolerances depend on the leaves' dtype: float64 `rtol=1e-6, atol=1e-9`, float32
    `rtol=1e-4, atol=1e-6`; integer and boolean leaves must be equal.
    """
    return not _compare(a, b, rtol, atol)


def assert_tree_allclose(a, b, rtol=None, atol=None) -> None:
    """Like `tree_allclose`, but fails with the leaf that differs most, and how."""
    failures = _compare(a, b, rtol, atol)
    if failures:
        lines = "\n".join(f"  {path}: {report}" for path, report in failures)
        raise AssertionError(f"pytrees differ in {len(failures)} leaf/leaves:\n{lines}")


def bptt_step_grads(model, state, xs, targets, loss_fn):
    """Per step `t`, the BPTT gradient of the loss `L_t` alone (through every earlier step), on a
    leading time axis: the oracle for a rule's per-step gradient."""
    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def losses(p):
        m = eqx.combine(p, static)

        def body(s, xt):
            y, s = m(xt[0], s)
            return s, loss_fn(y, xt[1])

        return jax.lax.scan(body, state, (xs, targets))[1]

    return jax.jacrev(losses)(params)


def rule_steps(rule, graph, model, state, xs, targets, loss_fn):
    """Yields `(traces, grads)` after each step of `rule` (its jitted `step`, from `rule.init`)."""
    step = eqx.filter_jit(rule.step)
    traces = rule.init(graph, model, state)
    for x, target in zip(xs, targets):
        traces, _, _, grads = step(graph, model, traces, x, target, loss_fn)
        yield traces, grads


def d_rtrl_step_grads(graph, model, state, xs, targets, loss_fn):
    """Each step's D-RTRL gradient (from zero traces), stacked along a leading time axis, in the
    layout of `bptt_step_grads`."""
    grads = [g for _, g in rule_steps(eqtrace.DRTRL(), graph, model, state, xs, targets, loss_fn)]
    return jax.tree.map(lambda *a: jnp.stack(a), *grads)


def check_drivers_sum_steps(rule, model, state, xs, targets, loss_fn, steps):
    """Assert that `online_grad` and `batch_grad`, under `eqx.filter_jit`, sum a rule's steps:
    `online_grad` on the first sequence gives the sum of `steps(xs[0], targets[0])`, and `batch_grad`
    (every example from `state`) the batch mean of those sums.

    `xs`, `targets` are a batch of sequences, `(batch, time, ...)`; `steps(xs, targets)` yields one
    sequence's per-step gradients, in the structure of `eqx.filter(model, eqx.is_inexact_array)` (the
    rule's own steps, or a reference of them). Returns the gradients of `online_grad` and
    `batch_grad`, for further checks.
    """
    batch, time = xs.shape[:2]
    sums = []
    for b in range(batch):
        total = None
        for g in steps(xs[b], targets[b]):
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        sums.append(total)
    online = eqx.filter_jit(lambda m, s, x, y: eqtrace.online_grad(m, s, x, y, loss_fn, algorithm=rule))
    grads, losses = online(model, state, xs[0], targets[0])
    assert losses.shape == (time,)
    assert_tree_allclose(grads, sums[0])
    states = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), state)
    batched = eqx.filter_jit(
        lambda m, s, x, y: eqtrace.batch_grad(eqtrace.online_grad, m, s, x, y, loss_fn, algorithm=rule)
    )
    batch_grads, losses = batched(model, states, xs, targets)
    assert losses.shape == (time,)
    assert_tree_allclose(batch_grads, jax.tree.map(lambda *g: sum(g) / batch, *sums))
    return grads, batch_grads
