"""A small jaxpr interpreter: the compiler uses it to inline nested calls, the algorithms to re-run a
step with hooks at ETP operations and at the points where new hidden values are produced."""

from collections.abc import Callable, Mapping, Sequence

from .._jax_internals import (
    bind_equation,
    closed_call_body,
    ClosedJaxpr,
    CONTROL_FLOW,
    custom_call_body,
    Literal,
    Var,
)
from .._ops import etp_op_of


def _contains_etp_op(closed: ClosedJaxpr) -> bool:
    for eqn in closed.jaxpr.eqns:
        if etp_op_of(eqn.primitive) is not None:
            return True
        for sub in _sub_jaxprs(eqn):
            if _contains_etp_op(sub):
                return True
        body = closed_call_body(eqn) or custom_call_body(eqn)
        if body is not None and _contains_etp_op(body):
            return True
    return False


def _sub_jaxprs(eqn) -> list[ClosedJaxpr]:
    subs = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, ClosedJaxpr):
                subs.append(v)
            elif hasattr(v, "eqns") and hasattr(v, "invars"):
                subs.append(ClosedJaxpr(v, ()))
    return subs


def inline_eval(closed: ClosedJaxpr, args: Sequence) -> list:
    """Evaluate `closed`, inlining nested `jit`/`closed_call`/`remat` bodies; under `jax.make_jaxpr`
    this yields a flat jaxpr. ETP operations inside control flow are refused."""
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
            if eqn.primitive in CONTROL_FLOW and any(_contains_etp_op(s) for s in _sub_jaxprs(eqn)):
                raise ValueError(
                    f"An ETP operation is used inside `{eqn.primitive.name}` within the step. eqtrace "
                    "traces one time step: move the loop out of the model's `__call__` (the drivers "
                    "scan over time), or use plain `jnp` operations inside the loop."
                )
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
