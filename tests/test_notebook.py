"""The graph compilation tutorial is a notebook shown with its stored outputs
(`docs/hooks/notebooks.py`): a fresh run must print the same, so they cannot drift.

After changing the notebook or what it prints, store its new outputs with
`JAX_PLATFORMS=cpu python docs/hooks/run_notebook.py docs/tutorials/graph-compilation.ipynb`.
"""

import importlib.util
import math
import os
import pathlib
import re

import nbformat
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs/tutorials/graph-compilation.ipynb"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _hook(name):
    spec = importlib.util.spec_from_file_location(f"eqtrace_docs_{name}", ROOT / "docs/hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _texts(cell):
    """What a code cell shows as text: what it prints, and the text forms of its results."""
    texts = ["".join(o.text for o in cell.outputs if o.output_type == "stream")]
    for output in cell.outputs:
        assert output.output_type != "error", f"{output.ename}: {output.evalue}"
        data = output.get("data", {})
        texts += [data[kind] for kind in ("text/plain", "text/markdown") if kind in data]
    return [_ADDRESS.sub("0x…", text) for text in texts]


def _same(fresh: str, stored: str) -> bool:
    """Equal but for float rounding: the same words, and numbers that agree to 6 digits or are both
    at float32 rounding level (relative errors against an oracle)."""
    if _NUMBER.sub("#", fresh) != _NUMBER.sub("#", stored):
        return False
    for a, b in zip(_NUMBER.findall(fresh), _NUMBER.findall(stored)):
        x, y = float(a), float(b)
        if not (math.isclose(x, y, rel_tol=1e-6) or max(abs(x), abs(y)) < 1e-5):
            return False
    return True


@pytest.fixture(scope="module")
def notebooks():
    stored = nbformat.read(NOTEBOOK, as_version=4)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
    fresh = _hook("run_notebook").run(NOTEBOOK, timeout=120)
    return stored, fresh


def test_fresh_run_prints_the_stored_outputs(notebooks):
    stored, fresh = notebooks
    code = [(s, f) for s, f in zip(stored.cells, fresh.cells) if s.cell_type == "code"]
    assert len(code) >= 10
    assert all(s.outputs for s, _ in code), "every code cell shows something"
    for index, (s, f) in enumerate(code):
        assert s.source == f.source
        stored_texts, fresh_texts = _texts(s), _texts(f)
        assert len(stored_texts) == len(fresh_texts), f"code cell {index}"
        for a, b in zip(fresh_texts, stored_texts):
            assert _same(a, b), f"code cell {index} now shows\n{a}\ninstead of\n{b}"


def test_graph_displays_itself(notebooks):
    # The cell that ends with a graph shows it as a Mermaid diagram (and as SVG, where Graphviz is).
    _, fresh = notebooks
    results = [
        o
        for c in fresh.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "execute_result"
    ]
    assert results
    for result in results:
        assert result.data["text/markdown"].startswith("```mermaid\nflowchart LR\n")
        assert result.data["text/plain"].startswith("ETraceGraph: ")


def test_page_shows_every_cell_and_output():
    stored = nbformat.read(NOTEBOOK, as_version=4)
    page, pictures = _hook("notebooks").notebook_to_markdown(stored, "tutorials/graph-compilation")
    assert page.startswith("# Graph compilation and visualisation\n\n[Download")
    assert pictures == []  # the graph shows as Mermaid, which the site draws
    position = 0
    for cell in stored.cells:
        shown = [cell.source.strip()]
        if cell.cell_type == "code":
            shown += [o.text.strip() for o in cell.outputs if o.output_type == "stream"]
            shown += [o.data["text/markdown"].strip() for o in cell.outputs if "data" in o]
        for text in filter(None, shown):
            found = page.find(text.split("\n")[0], position)
            assert found >= 0, text[:200]
            position = found
    assert _same("err 1e-07 at 3.0", "err 9e-08 at 3.0") and not _same("err 1e-07", "err 3e-01")
