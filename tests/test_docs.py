"""The Python code blocks of the README and of some docs pages run as written."""

import pathlib
import re

import jax
import pytest


ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize(
    "page, printed",
    [
        ("README.md", "Hidden groups"),  # each prints a compiled graph
        ("docs/getting-started.md", "Hidden groups"),
        ("docs/guides/what-online-learning-credits.md", "whole model"),  # a gradient check's table
        ("docs/guides/choosing-an-algorithm.md", "es_d_rtrl  window=5"),
        ("docs/guides/eqx-nn-models.md", "(inferred; entries 8:12 of axis 0)"),
        ("docs/guides/ode-neurons.md", "D-RTRL vs BPTT, largest relative difference"),
        ("docs/guides/streaming.md", "steps since the last update: 0"),
        ("docs/guides/sharding.md", "the new weights are replicated: True"),
        ("docs/guides/checkpoints.md", "resumed after block 3"),
        ("docs/guides/freezing.md", "frozen weights unchanged: True"),
        ("docs/rules/ottt.md", "detach_reset=True: cosine to BPTT 1.000"),
        ("docs/rules/otpe.md", "EProp: cosine to BPTT 1.000"),
        ("docs/rules/rflo.md", "RFLO feedback=symmetric: cosine to BPTT"),
        ("docs/rules/d-rtrl.md", "stepped by hand: largest difference to BPTT"),
        ("docs/rules/es-d-rtrl.md", "constant input, ESDRTRL(decay=0.9): cosine to BPTT 1.000"),
        ("docs/rules/rtrl.md", "refused: RTRL's influence matrix"),
        ("docs/rules/snap-1.md", "SnAp1(): cosine to BPTT"),
        ("docs/rules/uoro.md", "mean over 1000 keys: relative error to RTRL"),
        ("docs/rules/e-prop.md", "FeedForwardSpikingLayer, EProp(): cosine to BPTT 1.000"),
        ("docs/rules/truncated-bptt.md", "TruncatedBPTT(window=20): cosine to BPTT 1.0000"),
        ("docs/rules/writing-a-rule.md", "SameStep vs TruncatedBPTT(window=1): largest difference"),
    ],
)
def test_code_blocks_run(page, printed, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # optax mixes integer counts with floats
        for block in blocks:
            exec(compile(block, page, "exec"), namespace)
    assert printed in capsys.readouterr().out
