"""The built docs site loads nothing from other hosts: its pages typeset their maths and draw their
Mermaid diagrams from scripts the site serves itself, so they work without network access.

`tests/site_in_chromium.py` opens the pages in a browser; this checks the built HTML."""

import html.parser
import pathlib
import posixpath
import re
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).parent.parent
MATHJAX = "javascripts/vendor/mathjax/tex-mml-chtml.js"
MERMAID = "javascripts/vendor/mermaid.tiny.js"
# Tags that load a resource as the page opens, and the attribute naming it.
LOADING = {"script": "src", "link": "href", "img": "src", "iframe": "src", "source": "src", "embed": "src"}
EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, //host
EXTERNAL_IN_CSS = re.compile(r"(?:@import\s+(?:url\()?|url\()\s*['\"]?\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.styles: list[str] = []
        self.maths = 0
        self.diagrams = 0
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        self.maths += "arithmatex" in classes
        self.diagrams += tag == "pre" and "mermaid" in classes
        self._in_style = tag == "style"
        for name, value in attrs.items():
            if name == "style" and value:
                self.styles.append(value)

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)

    def scripts(self) -> list[tuple[str, dict[str, str | None]]]:
        return [(a["src"], a) for t, a in self.tags if t == "script" and a.get("src")]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "`mkdocs build --strict` failed (the docs' requirements: `pip install -e '.[docs]'`):\n"
        + result.stderr[-4000:]
    )
    return site_dir


@pytest.fixture(scope="module")
def pages(site) -> dict[str, _Page]:
    parsed = {}
    for path in sorted(site.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        parsed[path.relative_to(site).as_posix()] = page
    assert "index.html" in parsed and len(parsed) > 5
    return parsed


def _resolve(site: pathlib.Path, page: str, url: str) -> pathlib.Path:
    """The file of the site that `url`, as written in `page`, points at."""
    url = url.split("#")[0].split("?")[0]
    return site / posixpath.normpath(posixpath.join(posixpath.dirname(page), url))


def test_pages_load_nothing_from_other_hosts(site, pages):
    external = [
        f"{name}: <{tag} {attr}={attrs[attr]!r}>"
        for name, page in pages.items()
        for tag, attrs in page.tags
        if (attr := LOADING.get(tag)) and EXTERNAL.match(attrs.get(attr) or "")
    ]
    assert not external, "pages load from other hosts:\n" + "\n".join(external)
    styles = [
        f"{name}: {style.strip()[:120]!r}"
        for name, page in pages.items()
        for style in page.styles
        if EXTERNAL_IN_CSS.search(style)
    ]
    assert not styles, "inline styles load from other hosts:\n" + "\n".join(styles)
    sheets = [
        path.relative_to(site).as_posix()
        for path in site.rglob("*.css")
        if EXTERNAL_IN_CSS.search(path.read_text(encoding="utf-8"))
    ]
    assert not sheets, f"stylesheets load from other hosts: {sheets}"


def test_pages_with_maths_load_mathjax_from_the_site(site, pages):
    with_maths = [name for name, page in pages.items() if page.maths]
    assert "guides/what-online-learning-credits/index.html" in with_maths
    for name in with_maths:
        scripts = [src for src, _ in pages[name].scripts()]
        local = [src for src in scripts if _resolve(site, name, src) == site / MATHJAX]
        assert local, f"{name} has maths but does not load {MATHJAX}: {scripts}"
        config = [src for src in scripts if _resolve(site, name, src) == site / "javascripts/mathjax.js"]
        assert config and scripts.index(config[0]) < scripts.index(local[0]), name
    # What MathJax loads beside itself: its fonts, and TeX extensions on demand.
    mathjax = (site / MATHJAX).parent
    assert (site / MATHJAX).stat().st_size > 500_000
    assert (mathjax / "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff").is_file()
    assert (mathjax / "input/tex/extensions/cancel.js").is_file()


def test_pages_with_diagrams_load_mermaid_from_the_site(site, pages):
    with_diagrams = [name for name, page in pages.items() if page.diagrams]
    assert {"index.html", "tutorials/graph-compilation/index.html"} <= set(with_diagrams)
    for name, page in pages.items():
        mermaid = [a for src, a in page.scripts() if _resolve(site, name, src) == site / MERMAID]
        if name not in with_diagrams:
            assert not mermaid, f"{name} has no diagram but loads Mermaid"
            continue
        assert len(mermaid) == 1, f"{name} has a diagram but does not load {MERMAID}"
        # Material for MkDocs draws diagrams at DOMContentLoaded, and fetches Mermaid from a CDN
        # unless the global `mermaid` exists by then: the script must not be `async`.
        assert "async" not in mermaid[0], name
    assert 'globalThis["mermaid"]' in (site / MERMAID).read_text(encoding="utf-8")[-2000:]
