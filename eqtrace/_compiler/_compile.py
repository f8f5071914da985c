"""`compile_etrace_graph`: trace one step, inline nested calls, check it, and assemble the graph
from the data-flow analyses (hidden groups, relations, perturbation points)."""

import contextlib
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._jax_internals import Var
from .._ops import etp_op_of
from ._dataflow import hidden_dependencies
from ._evaluate import inline_eval
from ._flow import calls_custom_vjp
from ._freeze import freeze, frozen_paths
from ._graph import ETraceGraph, HiddenPerturbation, ModuleInfo, Path
from ._hidden_groups import find_hidden_groups
from ._infer import infer_operations
from ._matmul_weights import matmul_only_weights
from ._relations import find_relations


def key_to_path(keypath) -> Path:
    """A JAX key path as a tuple of plain names and indices: `('rnn', 'W', 'weight')`."""
    out: list[str | int] = []
    for k in keypath:
        if isinstance(k, jtu.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jtu.DictKey):
            out.append(k.key)
        elif isinstance(k, jtu.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jtu.FlattenedIndexKey):
            out.append(k.key)
        else:
            out.append(str(k))
    return tuple(out)


def canonical_dtype(dtype):
    """The dtype JAX computes in for an input of `dtype` (NumPy's float64 is float32 without x64)."""
    return jax.dtypes.canonicalize_dtype(dtype, allow_extended_dtype=True)


def _paths(tree) -> tuple[Path, ...]:
    return tuple(key_to_path(p) for p, _ in jtu.tree_flatten_with_path(tree)[0])


def _check_leaves_are_arrays(tree, name: str) -> None:
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        if not eqx.is_array(leaf):
            raise TypeError(
                f"`{name}` must be a pytree of JAX arrays, but the leaf at {key_to_path(path)} is a "
                f"{type(leaf).__name__} ({leaf!r}). Use `jnp.asarray(...)` for it."
            )


def _check_real(tree, name: str) -> None:
    for path, leaf in jtu.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]:
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise TypeError(
                f"`{name}` leaf at {key_to_path(path)} is {leaf.dtype}: eqtrace traces real weights and "
                "states only. Keep a complex quantity as two real arrays (its real and imaginary parts)."
            )


def _state_mismatch(model, state) -> str | None:
    """A message naming the first leaf of `state` whose shape differs from `model.init_state()`'s."""
    try:
        want = eqx.filter_eval_shape(model.init_state)
    except Exception:
        return None
    if jtu.tree_structure(want) != jtu.tree_structure(state):
        return None
    for (path, w), s in zip(jtu.tree_flatten_with_path(want)[0], jtu.tree_leaves(state)):
        got, expected = getattr(s, "shape", None), getattr(w, "shape", None)
        if got != expected:
            return (
                f"`state` leaf at {key_to_path(path)} has shape {got}, but `model.init_state()` makes "
                f"it {expected}: this state does not fit the model. Start from `model.init_state()`, "
                "or a state of its shapes"
                + ("; batch with `jax.vmap`." if len(got or ()) > len(expected or ()) else ".")
            )
    return None


@contextlib.contextmanager
def naming_state_mismatch(model, state):
    """Let errors raised while running `model` on `state` through, unless a leaf of `state` has
    another shape than in `model.init_state()`: then raise a `ValueError` that names that leaf."""
    try:
        yield
    except Exception as error:
        message = _state_mismatch(model, state)
        if message is None:
            raise
        raise ValueError(message) from error


def _split_output(out, state):
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "`model(x, state)` must return a pair `(y, new_state)`, got "
            f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, tuple) else "") + "."
        )
    return out


def _check_state_preserved(state, new_state) -> None:
    old_def = jtu.tree_structure(state)
    new_def = jtu.tree_structure(new_state)
    if old_def != new_def:
        raise ValueError(
            "`model(x, state)` returned a new state whose structure differs from `state`:\n"
            f"  state:     {old_def}\n  new state: {new_def}\n"
            "The step must return a state of the same structure, shapes and dtypes."
        )
    for (path, old), new in zip(jtu.tree_flatten_with_path(state)[0], jtu.tree_leaves(new_state)):
        if not isinstance(new, jax.ShapeDtypeStruct):
            raise TypeError(
                f"The new state leaf at {key_to_path(path)} is a {type(new).__name__}, expected an array."
            )
        if old.shape != new.shape or canonical_dtype(old.dtype) != new.dtype:
            raise ValueError(
                f"The hidden state at {key_to_path(path)} changes across the step: it enters as "
                f"{old.dtype}{list(old.shape)} and leaves as {new.dtype}{list(new.shape)}. A hidden "
                "state must keep its shape and dtype."
            )


def _trace(model, x, state):
    """Trace `(model, x, state) -> (y, new_state)` into a flat jaxpr over the array leaves."""
    if not callable(model):
        raise TypeError(f"`model` must be callable as `model(x, state)`, got {type(model).__name__}.")
    _check_leaves_are_arrays(x, "x")
    _check_leaves_are_arrays(state, "state")
    _check_real(model, "model")
    _check_real(state, "state")
    dynamic, static = eqx.partition((model, x, state), eqx.is_array)
    leaves, in_treedef = jtu.tree_flatten(dynamic)

    def step(*flat):
        m, xx, s = eqx.combine(jtu.tree_unflatten(in_treedef, flat), static)
        y, new_state = _split_output(m(xx, s), s)
        return y, new_state

    closed, out_shape, out_static = eqx.filter_make_jaxpr(step)(*leaves)
    _check_state_preserved(state, eqx.combine(out_shape, out_static)[1])
    n_h = len(jtu.tree_leaves(eqx.filter(state, eqx.is_array)))

    def flat_step(*args):
        outs = inline_eval(closed, args)
        # A state leaf that takes another leaf's old value (a delay line, a swap) is produced by the
        # step like any other: a copy gives it an equation, so it is traced with its group.
        old = list(args[len(args) - n_h :])
        for i in range(n_h):
            k = len(outs) - n_h + i
            if any(outs[k] is h for j, h in enumerate(old) if j != i):
                outs[k] = jnp.copy(outs[k])
        return outs

    flat = jax.make_jaxpr(flat_step)(*leaves)
    out_treedef = jtu.tree_structure(out_shape)
    return flat, in_treedef, static, out_treedef, out_static


def compile_etrace_graph(
    model: PyTree,
    x: PyTree,
    state: PyTree = None,
    *,
    filter_spec: PyTree = eqx.is_inexact_array,
    infer_etp_ops: bool = True,
) -> ETraceGraph:
    """Trace one step of `model` and compile its eligibility-trace graph.

    Call it once, outside `jit`; the graph is immutable and hashable, so it can be passed to
    `eqx.filter_jit` functions as a static argument.

    **Arguments:**

    - `model`: a callable pytree (usually an `eqx.Module`) with `model(x, state) -> (y, new_state)`.
      Its inexact-array leaves are the trainable weights.
    - `x`: one step's input (an array or pytree of arrays), unbatched.
    - `state`: the hidden state pytree; `model.init_state()` when omitted.
    - `filter_spec`: which leaves are trained, as for `eqx.partition(model, filter_spec)`: a
      callable or a pytree of bools (a prefix of `model`'s structure). The inexact leaves it leaves
      out are frozen (`graph.frozen_weights`): no rule keeps a trace for them or computes their
      gradient, which is `None`. Default: every inexact array.
    - `infer_etp_ops`: recognise the trainable operations of untagged layers (`eqx.nn.Linear`,
      `eqx.nn.GRUCell`, `jnp.matmul`, `a * h`, ...) as ETP operations, shown as *inferred* in the
      graph; explicit tags take precedence. `False`: only tagged operations are traced.

    **Returns:**

    An [`eqtrace.ETraceGraph`][].

    !!! example

        ```python
        graph = eqtrace.compile_etrace_graph(model, jnp.zeros(10), model.init_state())
        eqtrace.show_graph(graph)
        ```
    """
    if state is None:
        if not hasattr(model, "init_state"):
            raise TypeError("`state` was not given and `model` has no `init_state()` method to make one.")
        state = model.init_state()
    with naming_state_mismatch(model, state):
        flat, in_treedef, static, out_treedef, out_static = _trace(model, x, state)

    weight_paths = _paths(eqx.filter(model, eqx.is_array))
    input_paths = _paths(x)
    hidden_paths = _paths(state)
    n_w, n_x, n_h = len(weight_paths), len(input_paths), len(hidden_paths)
    inferred, inside = frozenset(), {}
    if infer_etp_ops:
        flat, inferred, inside = infer_operations(flat, n_w, n_h)
    jaxpr = flat.jaxpr
    weight_vars = jaxpr.invars[:n_w]
    hidden_in = jaxpr.invars[n_w + n_x :]
    num_outputs = len(jaxpr.outvars) - n_h
    hidden_out = jaxpr.outvars[num_outputs:]
    hidden_avals = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in hidden_in)
    input_avals = tuple(
        jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars[n_w : n_w + n_x]
    )

    if not any(etp_op_of(e.primitive) is not None for e in jaxpr.eqns):
        raise ValueError(
            "The model uses no ETP operation"
            + (
                " and none could be inferred (no weight goes through a matrix product or convolution, "
                "or reaches a hidden state position by position)"
                if infer_etp_ops
                else " (and `infer_etp_ops=False`)"
            )
            + ", so no weight can be trained online. Build its layers from `eqtrace.nn` (e.g. "
            "`eqtrace.nn.Linear`) or call `eqtrace.matmul`, `eqtrace.conv` or `eqtrace.element_wise` "
            "on the weights in its `__call__`."
        )
    weight_index = {v: i for i, v in enumerate(weight_vars)}
    for path, v in zip(hidden_paths, hidden_out):
        if isinstance(v, Var) and v in weight_index:
            raise ValueError(
                f"The step writes the weight {weight_paths[weight_index[v]]} into the hidden state at "
                f"{path}. Weights are parameters of the step, not its state: keep a separate state leaf."
            )

    # Which hidden states are traced: inexact ones that the step computes anew.
    producers = {o: eqn for eqn in jaxpr.eqns for o in eqn.outvars}
    traced = [
        i
        for i, v in enumerate(hidden_out)
        if jnp.issubdtype(hidden_avals[i].dtype, jnp.inexact) and isinstance(v, Var) and v in producers
    ]
    seen_vars: dict = {}
    for i in traced:
        if hidden_out[i] in seen_vars:
            raise ValueError(
                f"The hidden states at {hidden_paths[seen_vars[hidden_out[i]]]} and {hidden_paths[i]} "
                "are the same array after the step; give each state its own value."
            )
        seen_vars[hidden_out[i]] = i

    groups = find_hidden_groups(jaxpr, hidden_in, hidden_out, hidden_paths, hidden_avals, traced)
    relations, excluded, partly = find_relations(
        jaxpr,
        weight_vars,
        weight_paths,
        hidden_out,
        hidden_paths,
        traced,
        groups,
        inferred=inferred,
        inside=inside,
    )

    perturb = None
    if traced:
        new_vars = [hidden_out[i] for i in traced]
        chain = hidden_dependencies(jaxpr, new_vars)
        perturb = HiddenPerturbation(
            hidden_paths=tuple(hidden_paths[i] for i in traced),
            perturb_vars=tuple(new_vars),
            producers=tuple(producers[v].primitive.name for v in new_vars),
            chained=any(set(chain.get(v, {})) - {k} for k, v in enumerate(new_vars)),
        )
    module_info = ModuleInfo(
        closed_jaxpr=flat,
        weight_paths=weight_paths,
        input_paths=input_paths,
        hidden_paths=hidden_paths,
        in_treedef=in_treedef,
        in_static=static,
        out_treedef=out_treedef,
        out_static=out_static,
        input_avals=input_avals,
        hidden_avals=hidden_avals,
        num_outputs=num_outputs,
        forward_differentiable=not calls_custom_vjp(jaxpr),
        matmul_weights=matmul_only_weights(jaxpr, weight_vars),
    )
    hid_path_to_group = {p: g for g in groups for p in g.hidden_paths}
    graph = ETraceGraph(
        module_info=module_info,
        hidden_groups=tuple(groups),
        hid_path_to_group=types.MappingProxyType(hid_path_to_group),
        hidden_param_op_relations=tuple(relations),
        excluded_weights=tuple(excluded),
        partly_traced_weights=tuple(partly),
        hidden_perturb=perturb,
        untraced_hidden_paths=tuple(p for i, p in enumerate(hidden_paths) if i not in traced),
    )
    return freeze(graph, frozen_paths(model, filter_spec))
