"""Loop-invariant code motion: what a step's loops, branches and calls compute from weights alone
is computed once, before them.

Inside the body of a `while`, `scan`, `cond` or `checkpoint`, or of a function with a custom
derivative, an operation whose operands come from weights and from values that do not change from
one iteration to the next (`W @ x + b` or `exp(log_tau)` in an ODE's vector field, `x` the step's
input) gives the same value every time the body runs. It is computed before the body and passed
in; repeated through every enclosing body, it reaches the step itself, where inference recognises
its ETP operations, and the body it leaves acts position by position. A product of what a loop
carries (`W @ v`) stays where it is, and its weight is noted with the construct that holds it.

Values do not change, nor do derivatives: loops, branches and checkpoints are rebuilt around the
new body with `jax.lax`, and a `jax.custom_vjp` function (the solve under Diffrax's default
adjoint) keeps its own rule for its operands. The cotangent of a value moved out of it comes from
one forward-mode derivative of its body per value, exact when that value reaches every output of
the function position by position (checked here, or nothing is moved): the body is then
differentiated with its inner custom derivatives replaced by their primal functions, which must be
loops (checked too), whose derivative their rules compute (the checkpointed loops of Equinox and
Diffrax). A custom derivative of the identity placed after such a function (Equinox's
`_stop_gradient_on_unperturbed`) decides from its operands which tangents to keep; values moved out
now carry tangents it cannot see, so it becomes the identity.
"""

import dataclasses
from typing import Any, cast

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .._jax_internals import (
    bind_equation,
    closed_call_body,
    ClosedJaxpr,
    COND,
    cond_branches,
    CONV_GENERAL_DILATED,
    custom_call_body,
    CUSTOM_JVP_CALL,
    CUSTOM_VJP_CALL,
    DOT_GENERAL,
    INLINED_CALLS,
    Literal,
    REMAT,
    remat_options,
    SCAN,
    scan_options,
    scan_parts,
    Var,
    WHILE,
    while_cond,
    while_parts,
)
from ._evaluate import _sub_jaxprs
from ._flow import body_flow, calls_custom_vjp


_PRODUCTS = (DOT_GENERAL, CONV_GENERAL_DILATED)


def _inexact(x) -> bool:
    """Whether a value, or an abstract value, is of a floating or complex dtype."""
    return jnp.issubdtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype, jnp.inexact)


def _struct(aval) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


@dataclasses.dataclass
class _Context:
    """What the motion found: per weight index, why a product of it stays in a body; `where`, the
    bodies around the one being rebuilt, outermost first."""

    notes: dict = dataclasses.field(default_factory=dict)
    where: list = dataclasses.field(default_factory=list)
    moved: int = 0

    def note(self, weights, what: str, why: str) -> None:
        """Note, for each of `weights`, `what` uses it (inside the bodies in `where`), and `why` it
        stays there; the first note of a weight (the innermost) is kept."""
        inside = "".join(f" inside `{n}`" for n in reversed(self.where))
        for w in sorted(weights):
            self.notes.setdefault(w, f"{what}{inside}{why}")


def _call(closed: ClosedJaxpr, args, *, strip: bool = False) -> list:
    """Evaluate `closed` on `args`; with `strip`, every `jax.custom_vjp` function in it, at any
    depth, is replaced by its primal function (so that forward-mode autodiff goes through)."""
    env: dict = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for eqn in closed.jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if strip and _calls_custom_vjp(eqn):
            outs = _stripped(eqn, invals)
        else:
            outs = bind_equation(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            if isinstance(var, Var):
                env[var] = val
    return [read(v) for v in closed.jaxpr.outvars]


def _calls_custom_vjp(eqn) -> bool:
    return eqn.primitive is CUSTOM_VJP_CALL or any(calls_custom_vjp(sub.jaxpr) for sub in _sub_jaxprs(eqn))


def _loops(jaxpr) -> bool:
    """Whether `jaxpr` runs a `while` or a `scan`, at any depth."""
    eqns = jaxpr.eqns
    return any(e.primitive in (WHILE, SCAN) or any(_loops(b.jaxpr) for b in _sub_jaxprs(e)) for e in eqns)


def _custom_rules_of_loops(closed: ClosedJaxpr) -> bool:
    """Whether every `jax.custom_vjp` function in `closed`, at any depth, is a loop's (its primal
    function runs a loop, as the checkpointed loops of Equinox and Diffrax do), whose rule is then
    taken to compute its primal's derivative; a surrogate gradient's is not."""
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive is CUSTOM_VJP_CALL and not _loops(_body(eqn).jaxpr):
            return False
        if not all(_custom_rules_of_loops(sub) for sub in _sub_jaxprs(eqn)):
            return False
    return True


def _stripped(eqn, invals) -> list:
    """`eqn` with the custom derivatives in it replaced by their primal functions."""
    p = eqn.primitive
    inline = custom_call_body(eqn) or (closed_call_body(eqn) if p is not REMAT else None)
    if inline is not None:
        return _call(inline, invals, strip=True)
    strip = lambda closed: lambda *a: _call(closed, a, strip=True)  # noqa: E731
    if p is COND:
        return _rebuild(eqn, invals, [strip(b) for b in cond_branches(eqn)], [])
    if p in (WHILE, SCAN, REMAT):
        return _rebuild(eqn, invals, [strip(closed_call_body(eqn) if p is REMAT else _loop_body(eqn))], [])
    return bind_equation(eqn, invals)


def _body(eqn) -> ClosedJaxpr:
    """The body of a call, checkpoint or custom derivative equation."""
    return cast(ClosedJaxpr, custom_call_body(eqn) or closed_call_body(eqn))


def _loop_body(eqn) -> ClosedJaxpr:
    return while_parts(eqn)[0] if eqn.primitive is WHILE else scan_parts(eqn)[0]


def _rebuild(eqn, invals, bodies: list, hoisted: list) -> list:
    """Bind `eqn` again with new bodies, each called with its original inputs followed by
    `hoisted` (the values moved out of it, computed before it)."""
    p = eqn.primitive
    if p is WHILE:
        _, nc, nb = while_parts(eqn)
        cond = while_cond(eqn)
        cond_consts, consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
        out = lax.while_loop(
            lambda c: _call(cond, [*cond_consts, *c])[0],
            lambda c: tuple(bodies[0](*consts, *c, *hoisted)),
            tuple(init),
        )
        return list(out)
    if p is SCAN:
        _, n_consts, n_carry = scan_parts(eqn)
        consts, init, xs = (
            invals[:n_consts],
            invals[n_consts : n_consts + n_carry],
            invals[n_consts + n_carry :],
        )

        def step(carry, x):
            outs = bodies[0](*consts, *carry, *x, *hoisted)
            return outs[:n_carry], outs[n_carry:]

        carry, ys = lax.scan(step, list(init), list(xs), **scan_options(eqn))
        return [*carry, *ys]
    if p is COND:
        return list(lax.switch(invals[0], [lambda *a, b=b: b(*a, *hoisted) for b in bodies], *invals[1:]))
    if p is REMAT:
        return list(jax.checkpoint(lambda *a: bodies[0](*a), **remat_options(eqn))(*invals, *hoisted))
    raise AssertionError(f"no rebuild for {p}")


def _split(body: ClosedJaxpr, invariant: list, deps: list, ctx: _Context):
    """Move out of `body` what it computes from weights and its `invariant` inputs alone (weight
    products, biases, time constants), and what that reads there.

    **Returns:**

    `None` when nothing moves; else `(moved, rest, weights)`: `moved(*invariant inputs)` computes
    the values moved out, `rest(*inputs, *moved values)` the body's outputs, and `weights[k]` the
    weights the `k`-th moved value depends on.
    """
    avals = [_struct(v.aval) for v in body.jaxpr.invars]
    # What the bodies inside `body` move out comes up to its level first.
    surfaced = jax.make_jaxpr(lambda *a: _run(body, a, deps, ctx))(*avals)
    jaxpr = surfaced.jaxpr
    invariant_vars = {v for v, ok in zip(jaxpr.invars, invariant) if ok} | set(jaxpr.constvars)
    weights: dict = dict(zip(jaxpr.invars, deps))
    producer: dict = {}
    targets = []
    for eqn in jaxpr.eqns:
        reads = [v for v in eqn.invars if isinstance(v, Var)]
        got = frozenset().union(*(weights.get(v, frozenset()) for v in reads))
        for o in eqn.outvars:
            weights[o], producer[o] = got, eqn
        fixed = [isinstance(v, Literal) or v in invariant_vars for v in eqn.invars]
        if all(fixed) and not _sub_jaxprs(eqn) and not eqn.effects:
            invariant_vars.update(eqn.outvars)
            if got:  # computed from weights, the same every time: `W @ x + b`, `exp(log_tau)`
                targets.append(eqn)
        # A product of a weight whose other operand changes: it stays, and its weight is noted.
        sides = [weights.get(v, frozenset()) for v, ok in zip(eqn.invars, fixed) if ok and isinstance(v, Var)]
        if eqn.primitive in _PRODUCTS and any(sides) and not all(fixed):
            why = (
                ", with an operand computed there from what the loop carries (as `W @ v` in an ODE's "
                "vector field): the product cannot be computed once before it, so it is not traced"
            )
            ctx.note(frozenset().union(*sides), f"used by `{eqn.primitive.name}`", why)
    if not targets:
        return None
    moved_ids: set = set()
    stack = list(targets)
    while stack:
        eqn = stack.pop()
        if id(eqn) not in moved_ids:
            moved_ids.add(id(eqn))
            stack += [producer[v] for v in eqn.invars if isinstance(v, Var) and v in producer]
    moved = [e for e in jaxpr.eqns if id(e) in moved_ids]
    kept = [e for e in jaxpr.eqns if id(e) not in moved_ids]
    defined = {o for e in moved for o in e.outvars}
    values: list = []
    for v in [v for e in kept for v in e.invars] + list(jaxpr.outvars):
        if isinstance(v, Var) and v in defined and v not in values:
            values.append(v)
    inputs = [v for v, ok in zip(jaxpr.invars, invariant) if ok]

    def run(eqns, env, outvars):
        env = {**dict(zip(jaxpr.constvars, surfaced.consts)), **env}
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        for eqn in eqns:
            for var, val in zip(eqn.outvars, bind_equation(eqn, [read(v) for v in eqn.invars])):
                env[var] = val
        return [read(v) for v in outvars]

    moved_fn = lambda *a: run(moved, dict(zip(inputs, a)), values)  # noqa: E731
    rest_fn = lambda *a: run(kept, dict(zip([*jaxpr.invars, *values], a)), jaxpr.outvars)  # noqa: E731
    moved_jaxpr = jax.make_jaxpr(moved_fn)(*[_struct(v.aval) for v in inputs])
    rest_jaxpr = jax.make_jaxpr(rest_fn)(*avals, *[_struct(v.aval) for v in values])
    return moved_jaxpr, rest_jaxpr, [weights[v] for v in values]


def _lift(eqn, invals: list, deps: list, ctx: _Context) -> list | None:
    """`eqn` evaluated with what its bodies compute from weights alone moved out before it where
    it can be, or `None` where nothing moves."""
    p = eqn.primitive
    if p in INLINED_CALLS:
        return _run(_body(eqn), invals, deps, ctx)
    if p in (WHILE, SCAN):
        body = _loop_body(eqn)
        if p is WHILE:
            _, nc, nb = while_parts(eqn)
            first, n_fixed = nc, nb
        else:
            first, n_fixed = 0, scan_parts(eqn)[1]
        n = len(body.jaxpr.invars)
        bodies = [(body, [True] * n_fixed + [False] * (n - n_fixed), invals[first : first + n_fixed])]
        sub_deps = deps[first:]
    elif p is COND:
        n = len(invals) - 1
        bodies = [(b, [True] * n, invals[1:]) for b in cond_branches(eqn)]
        sub_deps = deps[1:]
    elif p is REMAT or p is CUSTOM_VJP_CALL:
        body = _body(eqn)
        if p is CUSTOM_VJP_CALL and not _loops(body.jaxpr):
            why = (
                ", a custom derivative that is not a loop's (a surrogate gradient, say), which nothing is "
                "moved out of: what it computes from the weights is not traced"
            )
            ctx.note(frozenset().union(*deps), f"used inside `{p.name}`", why)
            return None
        bodies = [(body, [True] * len(invals), invals)]
        sub_deps = deps
    else:  # a `custom_jvp` rule cannot take a value moved out: what is inside stays
        if p is CUSTOM_JVP_CALL:
            why = (
                ", a function with a custom JVP rule, which nothing is moved out of: what it computes from "
                "the weights is not traced"
            )
            ctx.note(frozenset().union(*deps), f"used inside `{p.name}`", why)
        return None
    ctx.where.append(p.name)
    try:
        splits = [_split(b, fixed, sub_deps, ctx) for b, fixed, _ in bodies]
    finally:
        ctx.where.pop()
    if all(s is None for s in splits):
        return None
    if p is CUSTOM_VJP_CALL:
        [(moved, rest, weights)] = cast(list[tuple], splits)
        if not _reaches_position_wise(rest, len(invals)):
            why = (
                ": computed there from the weights alone, it reaches the function's outputs through an "
                "operation that mixes positions, so it stays under the custom derivative and is not traced"
            )
            ctx.note(frozenset().union(*weights), f"used inside `{p.name}`", why)
            return None
        if not _custom_rules_of_loops(rest):
            why = (
                ": computed there from the weights alone, it reaches a custom derivative that is not a "
                "loop's (a surrogate gradient, say), which the derivative of a moved value would bypass, so "
                "it stays and is not traced"
            )
            ctx.note(frozenset().union(*weights), f"used inside `{p.name}`", why)
            return None
        ctx.moved += 1
        hoisted = _call(moved, invals)
        return list(_custom_vjp(eqn, moved, rest)(*invals, *hoisted))
    ctx.moved += 1
    new_bodies, hoisted = [], []
    for (body, _, fixed_vals), s in zip(bodies, splits):
        if s is None:
            new_bodies.append(lambda *a, body=body: _call(body, a[: len(body.jaxpr.invars)]))
            continue
        moved, rest, _ = s
        start, values = len(hoisted), _call(moved, fixed_vals)
        hoisted += values
        new_bodies.append(_reading(rest, len(body.jaxpr.invars), start, len(values)))
    return _rebuild(eqn, invals, new_bodies, hoisted)


def _reading(rest: ClosedJaxpr, n: int, start: int, k: int):
    """A body, called with its `n` inputs and every value moved out of its equation, that reads
    its own `k` values, from `start` on."""
    return lambda *a: _call(rest, [*a[:n], *a[n + start : n + start + k]])


def _reaches_position_wise(rest: ClosedJaxpr, n: int) -> bool:
    """Whether every value moved out of a custom derivative (the inputs of `rest` from `n` on)
    reaches each of its inexact outputs, if at all, position by position."""
    for k, v in enumerate(rest.jaxpr.invars[n:]):
        flow = body_flow(rest, len(v.aval.shape))
        for o, edges in zip(rest.jaxpr.outvars, flow):
            if _inexact(o.aval) and not edges.get(n + k, True):
                return False
    return True


def _custom_vjp(eqn, moved: ClosedJaxpr, rest: ClosedJaxpr):
    """The function of `eqn` (a `jax.custom_vjp` call) taking the values moved out of it as more
    inputs, with a rule built on its own: the original rule gives the cotangents of its operands,
    from which the part that now flows through the moved values is taken out; those values get
    theirs by forward mode, one derivative each (see the module's docstring)."""
    n = len(eqn.invars)

    @jax.custom_vjp
    def call(*args):
        return tuple(_call(rest, args))

    def fwd(*args):
        values = [jnp.asarray(a.value) for a in args]
        # Which inputs are differentiated, in the residuals' structure (no leaves: `()` or `None`).
        perturbed = tuple(() if a.perturbed and _inexact(a.value) else None for a in args)
        return call(*values), (values, perturbed)

    def bwd(res, cts):
        args, perturbed = res
        cts = [_instantiate(c) for c in cts]
        operands = list(args[:n])
        diff = [i for i in range(n) if perturbed[i] is not None]
        out: list = [None] * len(args)
        for k in range(n, len(args)):
            if perturbed[k] is not None:
                out[k] = _moved_cotangent(rest, args, k, cts)
        if not diff:
            return tuple(out)

        def with_diff(d):
            full = list(operands)
            for i, x in zip(diff, d):
                full[i] = x
            return full

        _, pull = jax.vjp(lambda *d: bind_equation(eqn, with_diff(d)), *[operands[i] for i in diff])
        ct_operands = pull(cts)
        ct_moved = [jnp.zeros_like(args[k]) if out[k] is None else out[k] for k in range(n, len(args))]
        _, pull_moved = jax.vjp(lambda *d: _call(moved, with_diff(d)), *[operands[i] for i in diff])
        for i, a, b in zip(diff, ct_operands, pull_moved(ct_moved)):
            out[i] = a - b
        return tuple(out)

    call.defvjp(fwd, bwd, symbolic_zeros=True)
    return call


def _instantiate(ct):
    """A cotangent, with a symbolic zero made an array of zeros."""
    if isinstance(ct, SymbolicZero):
        aval: Any = ct.aval
        return jnp.zeros(aval.shape, aval.dtype)
    return ct


def _moved_cotangent(rest: ClosedJaxpr, args, k: int, cts):
    """`(∂rest/∂args[k])ᵀ cts` for an input that reaches every output position by position: one
    forward-mode derivative along ones gives the diagonal, summed over the outputs' leading axes."""
    diff = [i for i, a in enumerate(args) if _inexact(a)]

    def f(*d):
        full = list(args)
        for i, x in zip(diff, d):
            full[i] = x
        outs = _call(rest, full, strip=True)
        return [o for o in outs if _inexact(o)]

    primals = [args[i] for i in diff]
    tangents = [jnp.ones_like(a) if i == k else jnp.zeros_like(a) for i, a in zip(diff, primals)]
    _, t_out = jax.jvp(f, primals, tangents)
    target = args[k]
    flow = body_flow(rest, target.ndim)
    reached = [k in edges for o, edges in zip(rest.jaxpr.outvars, flow) if _inexact(o.aval)]
    ct_inexact = [c for c, o in zip(cts, rest.jaxpr.outvars) if _inexact(o.aval)]
    total = jnp.zeros_like(target)
    for ct, t, ok in zip(ct_inexact, t_out, reached):
        if ok:  # (its trailing axes are the target's: checked when it was moved)
            total = total + (ct * t).reshape(-1, *target.shape).sum(axis=0).astype(target.dtype)
    return total


def _forwarded(eqn, invals: list, rebuilt: set) -> list | None:
    """A custom derivative of the identity on outputs of a rebuilt custom derivative (as Equinox
    puts after a checkpointed loop) decides which tangents to keep from which of that function's
    operands are differentiated. Values moved out of it now carry derivatives too, so it becomes
    the identity, whose derivative is the true one. `None` for other equations."""
    body = _body(eqn).jaxpr
    position = {v: k for k, v in enumerate(body.invars)}
    if body.eqns or not all(isinstance(o, Var) and o in position for o in body.outvars):
        return None
    if not any(
        isinstance(eqn.invars[position[o]], Var) and eqn.invars[position[o]] in rebuilt for o in body.outvars
    ):
        return None
    return [invals[position[o]] for o in body.outvars]


def _run(closed: ClosedJaxpr, args, deps: list, ctx: _Context) -> list:
    """Evaluate `closed` with what its equations' bodies compute from weights alone moved out
    where it can be (`deps[i]`: the weights input `i` depends on)."""
    env: dict = dict(zip(closed.jaxpr.constvars, closed.consts))
    weights: dict = {}
    for var, val, d in zip(closed.jaxpr.invars, args, deps):
        env[var], weights[var] = val, d
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    rebuilt: set = set()  # the outputs of custom derivatives that values were moved out of
    for eqn in closed.jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_deps = [frozenset() if isinstance(v, Literal) else weights.get(v, frozenset()) for v in eqn.invars]
        outs = None
        if eqn.primitive is CUSTOM_JVP_CALL and rebuilt:
            outs = _forwarded(eqn, invals, rebuilt)
        if outs is None and any(in_deps) and _sub_jaxprs(eqn):
            outs = _lift(eqn, invals, in_deps, ctx)
            if outs is not None and eqn.primitive is CUSTOM_VJP_CALL:
                rebuilt.update(eqn.outvars)
        if outs is None:
            outs = bind_equation(eqn, invals)
        got = frozenset().union(*in_deps)
        for var, val in zip(eqn.outvars, outs):
            if isinstance(var, Var):
                env[var], weights[var] = val, got
    return [read(v) for v in closed.jaxpr.outvars]


def hoist_loop_invariants(closed: ClosedJaxpr, num_weights: int) -> tuple[ClosedJaxpr, dict[int, str]]:
    """Move what a step's loops, branches and calls compute from weights alone out of them (see
    the module's docstring).

    **Arguments:**

    - `closed`: the flat step, whose first `num_weights` inputs are the model's array leaves.

    **Returns:**

    The step with those computations moved out (`closed` itself where none moves), and for each
    weight (by input index) with a product that stays inside a body, a sentence saying where and why.
    """
    jaxpr = closed.jaxpr
    deps = [
        frozenset([i]) if i < num_weights and _inexact(v.aval) else frozenset()
        for i, v in enumerate(jaxpr.invars)
    ]
    if not any(_sub_jaxprs(e) for e in jaxpr.eqns):
        return closed, {}
    ctx = _Context()
    new = jax.make_jaxpr(lambda *a: _run(closed, a, deps, ctx))(*[_struct(v.aval) for v in jaxpr.invars])
    return (new if ctx.moved else closed), ctx.notes
