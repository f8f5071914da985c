"""The spiking evidence-accumulation example runs at a tiny size, prints its progress and learns:
its test accuracy after training is well above chance (50%), for ES-D-RTRL and D-RTRL."""

import importlib.util
import json
import pathlib

import jax
import pytest


EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "spiking_evidence.py"

# An easy, short version of the task: rates 0.15 vs 0.03 over a 12-step cue, a 3-step delay.
TINY = ["--steps", "100", "--inputs", "20", "--hidden", "16", "--cue", "12", "--delay", "3"]
TINY += ["--recall", "5", "--rate-high", "0.15", "--rate-low", "0.03", "--batch", "16"]
TINY += ["--lr", "1e-2", "--test-batch", "256", "--print-every", "25"]


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's Adam mixes its int32 step count with float Python scalars, which the suite's strict
    # dtype promotion (conftest.py) rejects; the examples run under JAX's default, "standard".
    with jax.numpy_dtype_promotion("standard"):
        yield


def _load():
    spec = importlib.util.spec_from_file_location("eqtrace_training_examples_spiking_evidence", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("algorithm", ["es_d_rtrl", "d_rtrl"])
def test_spiking_evidence_learns(capsys, tmp_path, algorithm):
    example = _load()
    finals = []
    for seed in (0, 1):
        curve_file = tmp_path / f"curve-{seed}.json"
        argv = ["--algorithm", algorithm, "--seed", str(seed), *TINY, "--curve", str(curve_file)]
        finals.append(example.main(argv))
        out = capsys.readouterr().out
        lines = [line for line in out.splitlines() if line.startswith("step ")]
        assert len(lines) == 4
        # The curve file holds what was printed, and the final test accuracy.
        curve = json.loads(curve_file.read_text())
        assert [f"{v:.4f}" for v in curve["loss"]] == [line.split()[3] for line in lines]
        assert curve["test_accuracy"] == finals[-1] and curve["seed"] == seed
        assert all("loss" in line and "accuracy" in line and "ms/step" in line for line in lines)
        assert "initial test accuracy" in out
        assert "test accuracy" in out.splitlines()[-1]
    # Before training the readout guesses (about 50%); trained, every seed is well above
    # chance (0.73 to 1.0 over seeds 0-7 for both algorithms; seeds 0 and 1 give 0.97 to 1.0).
    assert min(finals) > example.CHANCE + 0.15, finals
