"""The training examples run at tiny sizes and learn: the loss falls, and progress is printed."""

import importlib.util
import json
import pathlib

import jax
import pytest


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's Adam mixes its int32 step count with float Python scalars, which the suite's strict
    # dtype promotion (conftest.py) rejects; the examples run under JAX's default, "standard".
    with jax.numpy_dtype_promotion("standard"):
        yield


def _load(name):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eqtrace_training_examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    quickstart = _load("quickstart")
    initial, final = quickstart.main(
        steps=60, hidden=8, seq_len=12, batch=8, delay=1, lr=3e-2, print_every=20
    )
    out = capsys.readouterr().out
    assert "ETraceGraph" in out
    assert "('rnn', 'h')" in out
    assert sum(line.startswith("step ") for line in out.splitlines()) == 3
    assert "initial loss" in out
    assert final < 0.5 * initial


def _adding(capsys, tmp_path, algorithm):
    adding = _load("adding_problem")
    argv = ["--algorithm", algorithm, "--steps", "300", "--seq-len", "8", "--hidden", "16"]
    argv += ["--batch", "32", "--lr", "1e-2", "--print-every", "100", "--curve", str(tmp_path / "c.json")]
    final = adding.main(argv)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3
    assert all("baseline" in line and "ms/step" in line for line in lines)
    initial = float(lines[0].split()[3])
    # The curve file holds what was printed.
    curve = json.loads((tmp_path / "c.json").read_text())
    assert curve["step"] == [100, 200, 300] and curve["algorithm"] == algorithm
    assert [f"{v:.4f}" for v in curve["loss"]] == [line.split()[3] for line in lines]
    assert curve["loss"][-1] == final
    return initial, final, adding.BASELINE


def test_adding_problem_d_rtrl(capsys, tmp_path):
    initial, final, baseline = _adding(capsys, tmp_path, "d_rtrl")
    assert final < initial
    assert final < 0.25 * baseline


def test_adding_problem_bptt(capsys, tmp_path):
    initial, final, baseline = _adding(capsys, tmp_path, "bptt")
    assert final < initial
    assert final < 0.25 * baseline
