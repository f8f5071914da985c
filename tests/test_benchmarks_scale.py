"""The scale benchmark (`benchmarks/scale.py`) runs in `--quick` mode and writes the fields that
`benchmarks/README.md` and `docs/benchmarks.md` read; its memory figures show BPTT growing with T and
ES-D-RTRL not (beyond the input and loss copies that the forward scan makes too). No timing is
asserted: speed lives in the benchmarks."""

import json
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scale.py"
RULES = ("es_d_rtrl", "d_rtrl", "bptt", "forward")
MEMORY = ("temp_bytes", "argument_bytes", "output_bytes", "compile_s", "lower_s")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "quick.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_rows_have_the_fields_the_docs_read(quick):
    assert quick["meta"]["quick"] is True
    assert set(quick["base"]) == {"n", "batch", "T"}
    assert quick["sweep"] and quick["memory"]
    for row in quick["sweep"]:
        assert len(row["loadavg"]) == 3
        for rule in RULES:
            rec = row[rule]
            assert all(rec[k] > 0 for k in MEMORY), (rule, rec)
            # Either timed (per-step time consistent with the call's) or marked, with the reason.
            if rec["not_timed"] is None:
                assert rec["reps"] >= 1
                assert 1 <= rec["timed_T"] <= row["T"]
                assert rec["time_per_step_s"] == pytest.approx(rec["time_s"] / rec["timed_T"])
            else:
                assert rec["time_s"] is None and rec["time_per_step_s"] is None
    for row in quick["memory"]:
        assert len(row["loadavg"]) == 3
        assert all(row[rule][k] > 0 for rule in RULES for k in MEMORY)

    paper = quick["paper"]
    cfg = paper["config"]
    assert cfg["layers"] == 3 and cfg["neuron"] == "lif"
    # D-RTRL's traces: one (I + n) × n weight and an n bias per layer and example, float32. The
    # analytic size equals the size of the traces the rule returns.
    inputs = [cfg["n_in"]] + [cfg["n"]] * (cfg["layers"] - 1)
    expected = 4 * cfg["batch"] * sum((i + cfg["n"]) * cfg["n"] + cfg["n"] for i in inputs)
    assert paper["trace_bytes"] == paper["trace_bytes_eval_shape"] == expected
    assert paper["d_rtrl_temp_over_traces"] == pytest.approx(
        paper["memory"]["d_rtrl"]["temp_bytes"] / expected
    )
    for rule in RULES:
        assert paper["memory"][rule]["temp_bytes"] > 0
        assert paper["time"][rule]["time_per_step_s"] > 0  # tiny sizes: every rule is timed
    assert quick["oom"]["ram_bytes"] > 2**30 and quick["oom"]["rows"]
    assert "bptt_over_ram_T" in quick["oom"]


def test_memory_grows_with_T_for_bptt_not_for_es_d_rtrl(quick):
    rows = [
        r for r in quick["memory"] if r["n"] == quick["base"]["n"] and r["batch"] == quick["base"]["batch"]
    ]
    short, long = sorted(rows, key=lambda r: r["T"])[:: len(rows) - 1]
    assert long["T"] >= 10 * short["T"]

    def growth(rule):
        return long[rule]["temp_bytes"] - short[rule]["temp_bytes"]

    # The forward scan's growth is the copy of the inputs and per-step losses; ES-D-RTRL keeps
    # nothing more per step, BPTT keeps every step's activations.
    assert growth("es_d_rtrl") <= 1.1 * growth("forward") + 16 * 2**10
    assert growth("bptt") > 4 * growth("forward")
    assert long["bptt"]["temp_bytes"] > 5 * short["bptt"]["temp_bytes"]
