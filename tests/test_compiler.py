import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqtrace
import eqtrace.nn as enn

from .models import AdaptiveNeurons, ConvRNN, SingleLayerRNN, StackedCells, TwoLayerGRU


def _all_weight_paths(model):
    graph = eqtrace.compile_etrace_graph(model, *_example_inputs(model))
    return graph, {p for p in graph.module_info.weight_paths}


def _example_inputs(model):
    if isinstance(model, ConvRNN):
        return jnp.zeros((1, 28, 28)), model.init_state()
    if isinstance(model, AdaptiveNeurons):
        return jnp.zeros(model.w.shape[0]), model.init_state()
    if isinstance(model, StackedCells):
        return jnp.zeros(model.cells[0].input_size), model.init_state()
    return jnp.zeros(
        model.rnn.input_size if hasattr(model, "rnn") else model.rnn1.input_size
    ), model.init_state()


def _accounted(graph):
    related = {r.weight_path for r in graph.hidden_param_op_relations}
    excluded = {w.weight_path for w in graph.excluded_weights}
    assert not related & excluded
    return related | excluded


def test_single_layer_rnn():
    model = SingleLayerRNN(10, 32, 5, key=jax.random.key(0))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(10), model.init_state())
    assert len(graph.hidden_groups) == 1
    group = graph.hidden_groups[0]
    assert group.hidden_paths == (("rnn", "h"),)
    assert (group.num_state, group.varshape, group.index) == (1, (32,), 0)
    assert graph.hid_path_to_group[("rnn", "h")] is group
    rel = {r.weight_path: r for r in graph.hidden_param_op_relations}
    assert set(rel) == {("rnn", "W", "weight"), ("rnn", "W", "bias")}
    assert rel[("rnn", "W", "weight")].primitive is eqtrace.etp_matmul_p
    assert rel[("rnn", "W", "weight")].hidden_groups == (group,)
    assert rel[("rnn", "W", "weight")].elementwise_tail
    excluded = {w.weight_path: w.reason for w in graph.excluded_weights}
    assert excluded == {("out", "weight"): "non_temporal", ("out", "bias"): "non_temporal"}
    assert graph.hidden_perturb is not None
    assert graph.hidden_perturb.hidden_paths == (("rnn", "h"),)
    assert set(graph.dict()) >= {
        "module_info",
        "hidden_groups",
        "hid_path_to_group",
        "hidden_param_op_relations",
        "hidden_perturb",
        "excluded_weights",
    }


def test_two_layer_gru_has_two_groups_and_accounts_for_every_weight():
    model = TwoLayerGRU(10, 32, 5, key=jax.random.key(1))
    graph, weights = _all_weight_paths(model)
    assert [g.hidden_paths for g in graph.hidden_groups] == [(("rnn1", "h"),), (("rnn2", "h"),)]
    assert _accounted(graph) == weights
    for r in graph.hidden_param_op_relations:
        layer = r.weight_path[0]
        assert [g.hidden_paths[0][0] for g in r.hidden_groups] == [layer]
    # The reset gate reaches h only through the candidate's matmul.
    excluded = {w.weight_path: w.reason for w in graph.excluded_weights}
    assert excluded[("rnn1", "Wr", "weight")] == "via_other_etp_op"
    assert excluded[("out", "weight")] == "non_temporal"
    for layer in ("rnn1", "rnn2"):
        for gate in ("Wz", "Wh"):
            assert (layer, gate, "weight") in {r.weight_path for r in graph.hidden_param_op_relations}


def test_conv_rnn():
    model = ConvRNN(key=jax.random.key(2))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros((1, 28, 28)), model.init_state())
    assert len(graph.hidden_groups) == 1
    excluded = {w.weight_path: w for w in graph.excluded_weights}
    assert excluded[("conv", "weight")].reason == "via_other_etp_op"
    assert "etp_conv" in excluded[("conv", "weight")].detail
    assert ("rnn", "W", "weight") in {r.weight_path for r in graph.hidden_param_op_relations}
    assert _accounted(graph) == set(graph.module_info.weight_paths)


def test_conv_feeding_a_state_element_wise_is_a_relation():
    class ConvLeaky(eqx.Module):
        conv: enn.Conv1d

        def __call__(self, x, v):
            v = 0.9 * v + self.conv(x)
            return v, v

    model = ConvLeaky(enn.Conv1d(2, 3, kernel_size=3, key=jax.random.key(0)))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros((2, 7)), jnp.zeros((3, 7)))
    rel = graph.hidden_param_op_relations
    assert {r.weight_path for r in rel} == {("conv", "weight"), ("conv", "bias")}
    assert all(r.primitive is eqtrace.etp_conv_p for r in rel)
    assert graph.hidden_groups[0].varshape == (3, 7)


@pytest.mark.parametrize(
    "cell_cls, paths",
    [
        (enn.VanillaRNNCell, ("h",)),
        (enn.GRUCell, ("h",)),
        (enn.LSTMCell, ("h", "c")),
        (enn.MGUCell, ("h",)),
        (enn.MinimalRNNCell, ("h",)),
        (enn.IndRNNCell, ("h",)),
    ],
)
def test_every_cell_compiles_with_one_group_and_every_weight_accounted(cell_cls, paths):
    k1, k2 = jax.random.split(jax.random.key(3))
    model = StackedCells((cell_cls(4, 6, key=k1),), enn.Linear(6, 2, key=k2))
    graph, weights = _all_weight_paths(model)
    assert len(graph.hidden_groups) == 1
    assert set(graph.hidden_groups[0].hidden_paths) == {(0, p) for p in paths}
    assert graph.hidden_groups[0].position_wise
    # Only the Elman cell reaches its next state through its weights alone (D = 0).
    assert graph.hidden_groups[0].recurrent == (cell_cls is not enn.VanillaRNNCell)
    assert _accounted(graph) == weights
    assert graph.hidden_param_op_relations


def test_groups_come_from_data_flow_not_shapes():
    k1, k2 = jax.random.split(jax.random.key(4))
    model = AdaptiveNeurons(jax.random.normal(k1, (3, 5)), jnp.full(5, 2.0), jax.random.normal(k2, (5, 2)))
    graph, weights = _all_weight_paths(model)
    # V and a interact (through a custom_jvp spike); z has the same shape but evolves alone.
    assert [g.hidden_paths for g in graph.hidden_groups] == [((0,), (1,)), ((2,),)]
    rel = {r.weight_path: r for r in graph.hidden_param_op_relations}
    assert [g.index for g in rel[("w",)].hidden_groups] == [0, 1]
    assert rel[("tau",)].primitive is eqtrace.etp_element_wise_p
    assert [g.index for g in rel[("tau",)].hidden_groups] == [0]
    assert _accounted(graph) == weights


def test_mixing_transition_is_flagged():
    class Mixing(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            h = jnp.tanh(eqtrace.matmul(x, self.w) + jnp.roll(h, 1))
            return h, h

    graph = eqtrace.compile_etrace_graph(Mixing(jnp.ones((2, 3))), jnp.zeros(2), jnp.zeros(3))
    assert not graph.hidden_groups[0].position_wise
    assert "mixes positions" in str(graph)


def test_untagged_weight_is_excluded_with_reason():
    class Plain(eqx.Module):
        w: jax.Array
        u: jax.Array

        def __call__(self, x, h):
            h = jnp.tanh(eqtrace.matmul(x, self.w) + h @ self.u)
            return h, h

    model = Plain(jnp.ones((2, 3)), jnp.eye(3))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(2), jnp.zeros(3), infer_etp_ops=False)
    assert {w.weight_path: w.reason for w in graph.excluded_weights} == {("u",): "no_etp_op"}
    assert not graph.hidden_groups[0].position_wise


def test_weight_transformed_before_its_op():
    class Masked(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            h = 0.5 * h + eqtrace.matmul(x, self.w * 2.0)
            return h, h

    graph = eqtrace.compile_etrace_graph(Masked(jnp.ones((2, 3))), jnp.zeros(2), jnp.zeros(3))
    assert graph.excluded_weights[0].reason == "weight_to_weight"


def test_graph_is_immutable_hashable_and_static_under_filter_jit():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(5))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.hidden_groups = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        graph.hid_path_to_group[("x",)] = None  # type: ignore[index]
    assert hash(graph) == hash(graph)
    traces = []

    @eqx.filter_jit
    def step(graph, model, x, state):
        traces.append(None)
        return eqtrace._compiler.run_step(graph, model, x, state)

    state = model.init_state()
    for i in range(3):
        y, state = step(graph, model, jnp.full(3, float(i)), state)
    assert len(traces) == 1
    y_ref, state_ref = model(
        jnp.full(3, 2.0),
        eqtrace._compiler.run_step(
            graph,
            model,
            jnp.full(3, 1.0),
            eqtrace._compiler.run_step(graph, model, jnp.zeros(3), model.init_state())[1],
        )[1],
    )
    assert jnp.allclose(y, y_ref)


def test_run_step_equals_the_model_under_vmap_and_grad():
    model = TwoLayerGRU(3, 4, 2, key=jax.random.key(6))
    graph = eqtrace.compile_etrace_graph(model, jnp.zeros(3), model.init_state())
    xs = jax.random.normal(jax.random.key(7), (5, 3))
    state = jax.vmap(lambda _: model.init_state())(xs)
    y1, s1 = jax.vmap(lambda x, s: eqtrace._compiler.run_step(graph, model, x, s))(xs, state)
    y2, s2 = jax.vmap(model)(xs, state)
    assert jnp.allclose(y1, y2) and jnp.allclose(s1["rnn2"].h, s2["rnn2"].h)
    g1 = jax.grad(lambda m: eqtrace._compiler.run_step(graph, m, xs[0], model.init_state())[0].sum())(model)
    g2 = jax.grad(lambda m: m(xs[0], model.init_state())[0].sum())(model)
    assert all(jnp.allclose(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))


def test_show_graph_and_pictures_name_every_weight(capsys):
    model = TwoLayerGRU(4, 8, 3, key=jax.random.key(8))
    algo = eqtrace.D_RTRL(model).compile_graph(jnp.zeros(4))
    algo.show_graph()
    text = capsys.readouterr().out
    assert text == str(algo.graph) + "\n"
    assert "2 hidden groups" in text
    for path in algo.graph.module_info.weight_paths:
        assert repr(path[-1]) in text and repr(path[0]) in text
    mermaid, dot = algo.graph.to_mermaid(), algo.graph.to_dot()
    assert mermaid.startswith("flowchart LR") and dot.startswith("digraph")
    for text in (mermaid, dot):
        assert "etp_matmul" in text and "group 1" in text and "via_other_etp_op" in text


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_model_without_etp_op():
    class NoTag(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            h = jnp.tanh(x @ self.w + h)
            return h, h

    # With inference on, `x @ w` is inferred as `eqtrace.matmul` (see tests/test_infer.py).
    with pytest.raises(ValueError, match="no ETP operation"):
        eqtrace.compile_etrace_graph(NoTag(jnp.ones((2, 3))), jnp.zeros(2), jnp.zeros(3), infer_etp_ops=False)


def test_state_shape_change():
    class Grows(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            return h, jnp.concatenate([h, eqtrace.matmul(x, self.w)])

    with pytest.raises(ValueError, match=r"\(\) changes across the step"):
        eqtrace.compile_etrace_graph(Grows(jnp.ones((2, 3))), jnp.zeros(2), jnp.zeros(3))


def test_state_structure_change():
    class Restructures(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            y = eqtrace.matmul(x, self.w)
            return y, {"h": h["h"] + y, "extra": y}

    with pytest.raises(ValueError, match="structure differs"):
        eqtrace.compile_etrace_graph(Restructures(jnp.ones((2, 3))), jnp.zeros(2), {"h": jnp.zeros(3)})


def test_non_array_hidden_leaf():
    class Leaky(eqx.Module):
        w: jax.Array

        def __call__(self, x, state):
            h = 0.5 * state["rnn"]["h"] + eqtrace.matmul(x, self.w)
            return h, {"rnn": {"h": h}}

    with pytest.raises(TypeError, match=r"`state`.*\('rnn', 'h'\).*float"):
        eqtrace.compile_etrace_graph(Leaky(jnp.ones((2, 3))), jnp.zeros(2), {"rnn": {"h": 0.0}})


def test_weight_written_by_the_step():
    class Writes(eqx.Module):
        w: jax.Array

        def __call__(self, x, state):
            h, _ = state
            h = 0.5 * h + eqtrace.matmul(x, self.w)
            return h, (h, self.w)

    with pytest.raises(ValueError, match=r"writes the weight \('w',\)"):
        eqtrace.compile_etrace_graph(Writes(jnp.ones((2, 3))), jnp.zeros(2), (jnp.zeros(3), jnp.ones((2, 3))))


def test_input_of_another_shape_at_run_time():
    model = SingleLayerRNN(3, 4, 2, key=jax.random.key(10))
    algo = eqtrace.D_RTRL(model).compile_graph(jnp.zeros(3))
    y, _ = algo(jnp.ones(3), model.init_state())
    assert y.shape == (2,)
    with pytest.raises(ValueError, match=r"`x`.*float64\[5\].*compiled for float64\[3\]"):
        algo(jnp.ones(5), model.init_state())
    with pytest.raises(ValueError, match=r"`x`.*Batch with `jax.vmap`"):
        algo(jnp.ones((4, 3)), model.init_state())
    with pytest.raises(ValueError, match=r"`x`.*float32\[3\].*compiled for float64\[3\]"):
        algo(jnp.ones(3, jnp.float32), model.init_state())


def test_model_must_return_a_pair():
    class Single(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            return eqtrace.matmul(x, self.w)

    with pytest.raises(TypeError, match=r"pair `\(y, new_state\)`"):
        eqtrace.compile_etrace_graph(Single(jnp.ones((2, 3))), jnp.zeros(2), jnp.zeros(3))


def test_etp_op_inside_scan_is_refused():
    class Loops(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            def body(h, _):
                return jnp.tanh(eqtrace.matmul(x, self.w) + h), None

            h, _ = jax.lax.scan(body, h, length=2)
            return h, h

    with pytest.raises(ValueError, match="inside `scan`"):
        eqtrace.compile_etrace_graph(Loops(jnp.ones((2, 3))), jnp.zeros(2), jnp.zeros(3))


def test_states_of_one_group_must_share_a_shape():
    class Broadcasts(eqx.Module):
        w: jax.Array

        def __call__(self, x, state):
            v, a = state
            v = 0.9 * v + eqtrace.matmul(x, self.w) - a
            return v, (v, 0.5 * a)

    with pytest.raises(ValueError, match=r"evolve together.*\(0,\): float64\[3\], \(1,\): float64\[\]"):
        eqtrace.compile_etrace_graph(
            Broadcasts(jnp.ones((2, 3))), jnp.zeros(2), (jnp.zeros(3), jnp.zeros(()))
        )
