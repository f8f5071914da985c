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
