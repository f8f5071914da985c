"""The task suite (`benchmarks/task_suite.py`) runs in `--quick` mode and writes a well-formed table:
one row per rule and task, finite numbers where the rule ran, a reason where it did not, and BPTT
learning above chance. Two of its six tasks (a rate RNN and a spiking network) keep the test short:
each rule and task compiles its own training step."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "task_suite.py"
TASKS = ("adding", "evidence")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks") / "quick.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--quick", "--tasks", ",".join(TASKS), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_rule_and_task_has_a_row(quick):
    data, stdout = quick
    sys.path.insert(0, str(SUITE.parent))
    try:
        import task_suite
    finally:
        sys.path.remove(str(SUITE.parent))
    rules = [task_suite.rule_label(*r) for r in task_suite.available_rules()]
    tasks = [t["name"] for t in data["tasks"]]
    assert tuple(tasks) == TASKS
    assert {"BPTT", "DRTRL", "ESDRTRL(decay=0.9)"} <= set(rules)
    pairs = [(r["task"], r["rule"]) for r in data["rows"]]
    assert sorted(pairs) == sorted((t, r) for t in tasks for r in rules)
    for row in data["rows"]:
        assert row["status"] in ("ok", "error", "skipped"), row
        if row["status"] != "ok":
            assert row["reason"], row
            continue
        numbers = [row["metric_mean"], row["metric_std"], row["loss_mean"], row["loss_std"], row["time_s"]]
        assert all(math.isfinite(x) for x in numbers), row
        assert row["time_s"] > 0 and row["temp_bytes"] > 0, row
        assert len(row["runs"]) == len(data["meta"]["seeds"])
    # The progress lines name each task and rule as they finish.
    assert stdout.count("] rule ") == len(pairs)
    assert "| rule |" in stdout and "| BPTT |" in stdout


def test_bptt_learns_in_quick_mode(quick):
    data, _ = quick
    tasks = {t["name"]: t for t in data["tasks"]}
    for row in data["rows"]:
        if row["rule"] != "BPTT":
            continue
        assert row["status"] == "ok", row
        task = tasks[row["task"]]
        for run in row["runs"]:
            # The training loss falls, and the test accuracy beats chance. In so few steps the
            # adding problem only learns to predict the mean sum (its baseline, MSE 1/6, against
            # about 1 before training): its test MSE comes near the baseline.
            assert run["last_train_loss"] < run["first_train_loss"], (row["task"], run)
            if task["metric"] == "accuracy":
                assert run["accuracy"] > task["chance"] + 0.1, (row["task"], run)
            else:
                assert run["mse"] < 1.5 * task["chance"] < run["first_train_loss"], (row["task"], run)
