"""The Python code blocks of the README and the getting-started page run as written."""

import pathlib
import re

import jax
import pytest


ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_code_blocks_run(page, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # optax mixes integer counts with floats
        for block in blocks:
            exec(compile(block, page, "exec"), namespace)
    assert "Hidden groups" in capsys.readouterr().out  # each page prints a compiled graph
