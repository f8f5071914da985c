"""The example scripts run (at small sizes) and print what the docs show."""

import importlib.util
import pathlib

import pytest


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eqtrace_examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph_compilation_output():
    import contextlib
    import io

    module = _load("graph_compilation")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main(small=True)
    return buffer.getvalue()


def _section(text, title):
    """The printed text from the heading `## title` to the next heading."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : None if end == -1 else end]


def test_graph_compilation_single_layer(graph_compilation_output):
    single = _section(graph_compilation_output, "Single-layer RNN")
    assert "ETraceGraph: 1 hidden group, 2 relations, 2 weights outside any relation" in single
    assert "('rnn', 'W', 'weight')  --etp_matmul-->  [0]" in single
    assert "('out', 'weight')  non_temporal" in single
    assert "('rnn', 'h') <- tanh" in single

    inspect = _section(graph_compilation_output, "Understanding ETraceGraph")
    assert "Group 0: 1 state(s), shape (8,)" in inspect
    assert "Paths: (('rnn', 'h'),)" in inspect
    assert "Primitive: etp_matmul" in inspect
    assert "Has perturbation: True" in inspect
    assert "One step: y.shape = (3,), state['rnn'].h.shape = (8,)" in inspect


def test_graph_compilation_two_gru(graph_compilation_output):
    two = _section(graph_compilation_output, "Two-layer RNN")
    assert "ETraceGraph: 2 hidden groups, 8 relations, 6 weights outside any relation" in two
    assert "Number of hidden groups: 2" in two
    assert "Number of weight-hidden relations: 8" in two
    assert "Group 1: (('rnn2', 'h'),)" in two
    assert "('rnn2', 'Wh', 'weight') -> hidden group(s) [1]" in two
    # The reset gate reaches `h` only through the candidate's matmul; the readout reaches no state.
    assert "('rnn1', 'Wr', 'weight'): via_other_etp_op" in two
    assert "('out', 'weight'): non_temporal" in two
    assert "flowchart LR" in two
    assert "g1([\"group 1<br/>('rnn2', 'h')\"])" in two


def test_graph_compilation_conv(graph_compilation_output):
    conv = _section(graph_compilation_output, "Convolutional network")
    assert "ETraceGraph: 1 hidden group, 2 relations, 4 weights outside any relation" in conv
    assert "('conv', 'weight')  via_other_etp_op: etp_conv output" in conv
    assert "('rnn', 'W', 'weight')  --etp_matmul-->  [0]" in conv


def test_graph_compilation_direct(graph_compilation_output):
    direct = _section(graph_compilation_output, "Using compile_etrace_graph directly")
    assert "Number of hidden groups: 1" in direct
    assert "Number of relations: 2" in direct
    fields = [line.strip() for line in direct.split("Graph fields:\n")[1].splitlines()]
    assert fields == [
        "module_info",
        "hidden_groups",
        "hid_path_to_group",
        "hidden_param_op_relations",
        "excluded_weights",
        "hidden_perturb",
        "partly_traced_weights",
        "untraced_hidden_paths",
        "frozen_weights",
    ]


def test_graph_compilation_delay_line(graph_compilation_output):
    section = _section(graph_compilation_output, "Delay lines and weights with an untraced use")
    assert "('h_prev',) <- copy" in section
    assert "untraced_use: also used by `dot_general`" in section
    # A window as long as the sequence is BPTT for every leaf, the partly traced one included.
    full = section.split("window=")[-1].splitlines()[1:]
    errors = [float(line.split()[-1]) for line in full if line.strip()]
    assert errors and max(errors) < 1e-4


def test_ode_neurons_learns(capsys):
    import jax

    with jax.numpy_dtype_promotion("standard"):  # optax mixes integer counts with floats
        initial, final = _load("ode_neurons").main(steps=30, hidden=4, seq_len=8, batch=8, print_every=10)
    out = capsys.readouterr().out
    assert "('log_tau',)          --etp_element_wise-->  [0]" in out
    assert sum(line.startswith("step ") for line in out.splitlines()) == 3
    assert final < 0.5 * initial
