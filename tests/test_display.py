"""A compiled graph displays itself in Jupyter: a Mermaid flowchart in Markdown, an SVG drawn by
Graphviz's `dot` where it is installed, and the text of `show_graph` otherwise."""

import stat
import sys

import jax
import jax.numpy as jnp
import pytest

import eqtrace

from .models import TwoLayerGRU


@pytest.fixture(scope="module")
def graph():
    model = TwoLayerGRU(4, 8, 3, key=jax.random.key(0))
    return eqtrace.compile_etrace_graph(model, jnp.zeros(4), model.init_state())


def _fake_dot(folder, exit_code=0):
    """A `dot` that answers `<svg>` with its arguments and input inside, or fails."""
    dot = folder / "dot"
    dot.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "text = sys.stdin.read()\n"
        f"sys.stdout.write('<svg><desc>' + ' '.join(sys.argv[1:]) + text + '</desc></svg>')\n"
        f"sys.exit({exit_code})\n"
    )
    dot.chmod(dot.stat().st_mode | stat.S_IXUSR)
    return dot


def test_markdown_is_a_mermaid_block(graph):
    markdown = graph._repr_markdown_()
    assert markdown == f"```mermaid\n{graph.to_mermaid()}\n```\n"
    assert markdown.count("```") == 2  # nothing inside closes the block early
    assert "group 1" in markdown and "etp_matmul" in markdown


def test_svg_is_drawn_by_dot(graph, tmp_path, monkeypatch):
    _fake_dot(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    svg = graph._repr_svg_()
    assert svg is not None and svg.startswith("<svg>")
    assert "-Tsvg" in svg and graph.to_dot() in svg


def test_without_dot_the_text_shows(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    assert graph._repr_svg_() is None
    _fake_dot(tmp_path, exit_code=1)  # a `dot` that fails gives no SVG either
    assert graph._repr_svg_() is None

    class Printer:  # what IPython's pretty printer passes
        def __init__(self):
            self.out = []

        def text(self, s):
            self.out.append(s)

    printer = Printer()
    graph._repr_pretty_(printer, cycle=False)
    assert printer.out == [str(graph)]
    assert "2 hidden groups" in printer.out[0]
