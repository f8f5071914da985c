"""A small jaxpr interpreter: the compiler uses it to inline nested calls, the algorithms to re-run a
step with hooks at ETP operations and at the points where new hidden values are produced."""

from collections.abc import Callable, Mapping, Sequence

from .._jax_internals import (
    bind_equation,
    closed_call_body,
    ClosedJaxpr,
    CONTROL_FLOW,
    CUSTOM_CALLS,
    Literal,
    source_location,
    Var,
)
from .._ops import etp_op_of


def _sub_jaxprs(eqn) -> list[ClosedJaxpr]:
    subs = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, ClosedJaxpr):
                subs.append(v)
            elif hasattr(v, "eqns") and hasattr(v, "invars"):
                subs.append(ClosedJaxpr(v, ()))
    return subs


def _etp_ops_inside(eqn) -> list[str]:
    """The names of the ETP operations inside `eqn`'s sub-jaxprs, at any depth."""
    found = []
    for sub in _sub_jaxprs(eqn):
        for inner in sub.jaxpr.eqns:
            op = etp_op_of(inner.primitive)
            found += [op.name] if op is not None else _etp_ops_inside(inner)
    return found


def _loops_around_etp_ops(eqn) -> list[str]:
    """The loops and branches inside or at `eqn` that hold an ETP operation, outermost first."""
    names = [eqn.primitive.name] if eqn.primitive in CONTROL_FLOW and _etp_ops_inside(eqn) else []
    for sub in _sub_jaxprs(eqn):
        for inner in sub.jaxpr.eqns:
            inside = _loops_around_etp_ops(inner)
            names += [n for n in inside if n not in names]
    return names


def _refuse(eqn, found: list[str]) -> ValueError:
    """The error for ETP operations inside an equation that eqtrace cannot inline."""
    ops = ", ".join(sorted(set(found)))
    at = source_location(eqn)
    loops = _loops_around_etp_ops(eqn)
    inside = " inside ".join(f"`{n}`" for n in reversed(loops))
    if loops and eqn.primitive.name not in loops:
        inside += f" inside `{eqn.primitive.name}`"
    where = f"An ETP operation ({ops}) is used inside {inside or f'`{eqn.primitive.name}`'}"
    where += (f" at {at}" if at else "") + " within the step."
    if loops:
        return ValueError(
            f"{where} The online rules record each ETP operation's operands and hold its output fixed "
            "once per step, which cannot be done inside a loop or a branch (an ODE solve runs its "
            "vector field in a loop). Apply the operation before the loop and pass its output in: for "
            "`diffrax.diffeqsolve`, compute `eqtrace.matmul(x, w)` (or `eqtrace.element_wise(...)`) "
            "before the solve and pass it through `args` or a closure; for `lax.cond`/`lax.switch`, "
            "compute it before and pass it to the branches. Plain `jnp` operations inside are fine."
        )
    if eqn.primitive in CUSTOM_CALLS:
        return ValueError(
            f"{where} That is a function with a custom derivative (`jax.custom_jvp` or "
            "`jax.custom_vjp`) around an ETP operation: the online rules record each ETP operation's "
            "operands and hold its output fixed, which cannot be done inside a custom derivative rule "
            "without bypassing it. Apply the custom derivative to the non-linearity only and call the "
            "ETP operation outside it, as the surrogate spike functions of `eqtrace.nn` do: "
            "`spike(eqtrace.matmul(x, w))` with `spike` a `jax.custom_jvp`, not a custom rule around "
            "`eqtrace.matmul`."
        )
    return ValueError(f"{where} ETP operations must stand in the step itself or in `jax.jit` calls.")


def inline_eval(closed: ClosedJaxpr, args: Sequence) -> list:
    """Evaluate `closed`, inlining nested `jit`/`closed_call`/`remat` bodies; under `jax.make_jaxpr`
    this yields a flat jaxpr. ETP operations inside any other equation with a body (control flow,
    custom derivatives) are refused."""
    env: dict = {}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for var, val in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = val
    for var, val in zip(closed.jaxpr.invars, args):
        env[var] = val
    for eqn in closed.jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        body = closed_call_body(eqn)
        if body is not None:
            outs = inline_eval(body, invals)
        else:
            found = _etp_ops_inside(eqn)
            if found:
                raise _refuse(eqn, found)
            outs = bind_equation(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            if isinstance(var, Var):
                env[var] = val
    return [read(v) for v in closed.jaxpr.outvars]


def evaluate(
    closed: ClosedJaxpr,
    args: Sequence,
    *,
    etp_outputs: Mapping[int, object] | None = None,
    on_etp: Callable[[int, list, object], None] | None = None,
    at_vars: Mapping[Var, Callable] | None = None,
) -> list:
    """Evaluate a flat jaxpr with hooks.

    - `etp_outputs[i]` replaces the output of equation `i` (an ETP operation) without computing it.
    - `on_etp(i, operands, output)` is called for every ETP equation `i`.
    - `at_vars[var](value)` replaces `var`'s value where it is produced, so every later read sees
      the result (a perturbation `value + p`, or `stop_gradient(value)`).
    """
    etp_outputs = etp_outputs or {}
    at_vars = at_vars or {}
    env: dict = {}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for var, val in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = val
    for var, val in zip(closed.jaxpr.invars, args):
        env[var] = val
    for i, eqn in enumerate(closed.jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        outs = [etp_outputs[i]] if i in etp_outputs else bind_equation(eqn, invals)
        if on_etp is not None and etp_op_of(eqn.primitive) is not None:
            on_etp(i, invals, outs[0])
        for var, val in zip(eqn.outvars, outs):
            if isinstance(var, Var):
                env[var] = at_vars[var](val) if var in at_vars else val
    return [read(v) for v in closed.jaxpr.outvars]
