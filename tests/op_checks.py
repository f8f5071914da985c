"""Checks shared by the tests of individual ETP operations: the tagged operation against its untagged
computation (values, derivatives, batching, compiled code), and online rules against BPTT and the
brute-force references, per step, for weights whose trace layout has input axes anywhere."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqtrace

from .brute_force import _layout, _shared_as_trace, d_rtrl_reference_step, es_d_rtrl_reference_step
from .helpers import assert_tree_allclose
from .test_ops import binds, entry_instructions


def check_transparent(tagged, ref, args, primitive, *, diff_argnums=None, untagged=None):
    """`tagged` computes `ref` and binds `primitive`: values, JVP, VJP, gradients under `jit`, a
    batched first operand under `vmap`, and the same compiled program as `untagged` (the same
    computation without the tag; `ref` by default)."""
    argnums = tuple(range(len(args))) if diff_argnums is None else diff_argnums
    assert binds(tagged, *args, primitive=primitive)
    assert not binds(ref, *args, primitive=primitive)
    assert_tree_allclose(tagged(*args), ref(*args))
    keys = jax.random.split(jax.random.key(11), len(args))
    tangents = [
        jax.random.normal(k, jnp.shape(a), jnp.result_type(a)) if i in argnums else None
        for i, (k, a) in enumerate(zip(keys, args))
    ]

    def restrict(fn):
        def f(*diff):
            full = list(args)
            for i, d in zip(argnums, diff):
                full[i] = d
            return fn(*full)

        return f

    diff = [args[i] for i in argnums]
    tans = [tangents[i] for i in argnums]
    assert_tree_allclose(jax.jvp(restrict(tagged), diff, tans), jax.jvp(restrict(ref), diff, tans))
    y, vjp = jax.vjp(restrict(tagged), *diff)
    cot = jnp.cos(y)
    got = vjp(cot)
    assert_tree_allclose(got, jax.vjp(restrict(ref), *diff)[1](cot))
    assert all(bool(jnp.any(g != 0)) for g in got)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)) ** 2)

    grad_argnums = tuple(range(len(diff)))
    assert_tree_allclose(
        jax.jit(jax.grad(loss(restrict(tagged)), argnums=grad_argnums))(*diff),
        jax.grad(loss(restrict(ref)), argnums=grad_argnums)(*diff),
    )
    # A batch of inputs keeps the tag.
    xs = jnp.stack([args[0], args[0]])
    in_axes = (0,) + (None,) * (len(args) - 1)
    assert_tree_allclose(jax.vmap(tagged, in_axes)(xs, *args[1:]), jax.vmap(ref, in_axes)(xs, *args[1:]))
    assert binds(jax.vmap(tagged, in_axes), xs, *args[1:], primitive=primitive)
    # Tagging costs nothing.
    untagged = ref if untagged is None else untagged
    assert entry_instructions(loss(tagged), *args) == entry_instructions(loss(untagged), *args)


_d_rtrl_step = eqx.filter_jit(eqtrace.d_rtrl_step)
_es_d_rtrl_step = eqx.filter_jit(eqtrace.es_d_rtrl_step)


def mse(y, t):
    return jnp.sum((y - t) ** 2)


def per_step_bptt(model, state, xs, targets, t, loss_fn=mse):
    """`∂L_t/∂θ` by back-propagation through the first `t + 1` steps."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_t(params):
        m = eqx.combine(params, static)
        s = state
        for i in range(t + 1):
            y, s = m(xs[i], s)
        return loss_fn(y, targets[t])

    return jax.grad(loss_t)(params)


def check_d_rtrl_equals_bptt(model, state, xs, targets):
    """D-RTRL's gradient of every step equals BPTT's (a model where D-RTRL is exact)."""
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    traces = eqtrace.d_rtrl_init(graph, model, state)
    for t in range(len(xs)):
        traces, _, _, grads = _d_rtrl_step(graph, model, traces, xs[t], targets[t], mse)
        assert_tree_allclose(grads, per_step_bptt(model, state, xs, targets, t))
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    return graph


def memory_in_trace_layout(graph, memory, model):
    """The reference memory of D-RTRL in its trace layout (`weight.shape + (S,)`), for weights whose
    input axes stand anywhere (`relation.input_axes`), and the largest entry off the diagonal."""
    offsets, _ = _layout(graph)
    paths = graph.hidden_perturb.hidden_paths
    index = {p: i for i, p in enumerate(graph.module_info.weight_paths)}
    weights = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    traces, off_diagonal = [], 0.0
    for r, rel in enumerate(graph.hidden_param_op_relations):
        if not rel.per_position:
            continue
        w = weights[index[rel.weight_path]]
        idx = np.indices(w.shape).reshape(w.ndim, -1)
        for group in rel.hidden_groups:
            if rel.shared_axes:  # a kernel shared across positions: its per-position trace
                ks = [k for k, p in enumerate(paths) if p in group.hidden_paths]
                block = jnp.stack([memory[r][offsets[k] : offsets[k + 1]] for k in ks])
                trace, off = _shared_as_trace(rel, group, block, w.shape)
                traces.append(trace)
                off_diagonal = max(off_diagonal, off)
                continue
            pos = np.ravel_multi_index(
                tuple(idx[a] for a in range(w.ndim) if a not in rel.input_axes), group.varshape
            )
            ks = [k for k, p in enumerate(paths) if p in group.hidden_paths]
            block = np.stack([np.asarray(memory[r][offsets[k] : offsets[k + 1]]) for k in ks])  # (S, P, W)
            cols = np.arange(w.size)
            diag = block[:, pos, cols]
            rest = block.copy()
            rest[:, pos, cols] = 0.0
            off_diagonal = max(off_diagonal, float(np.max(np.abs(rest))))
            traces.append(jnp.asarray(diag.T.reshape(w.shape + (len(ks),))))
    return traces, off_diagonal


def check_brute_force(model, state, xs, targets, *, decay=0.7, live=jax.tree.leaves):
    """D-RTRL and ES-D-RTRL equal their brute-force references, step by step; the gradients
    `live(grads)` are not zero."""
    graph = eqtrace.compile_etrace_graph(model, xs[0], state)
    for window in (1,):
        traces = eqtrace.d_rtrl_init(graph, model, state, window=window)
        memory, ref_state = {}, state
        for x, target in zip(xs, targets):
            traces, _, _, grads = _d_rtrl_step(graph, model, traces, x, target, mse)
            memory, ref_grads, ref_state = d_rtrl_reference_step(
                graph, model, ref_state, x, target, mse, memory, window
            )
            assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
            ref_traces, off_diagonal = memory_in_trace_layout(graph, memory, model)
            assert off_diagonal == 0.0
            assert_tree_allclose(list(traces.eps), ref_traces)
    traces = eqtrace.es_d_rtrl_init(graph, model, state, decay)
    memory, ref_state = {"x": {}, "f": {}}, state
    for x, target in zip(xs, targets):
        traces, _, _, grads = _es_d_rtrl_step(graph, model, traces, x, target, mse)
        memory, ref_grads, ref_state = es_d_rtrl_reference_step(
            graph, model, ref_state, x, target, mse, memory, decay
        )
        assert_tree_allclose(jax.tree.leaves(grads), ref_grads)
    assert all(bool(jnp.any(g != 0)) for g in live(grads))
    return graph
