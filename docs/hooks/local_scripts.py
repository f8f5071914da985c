"""An MkDocs hook that serves the site's maths and diagram scripts from the site itself, so that
its pages typeset their maths and draw their Mermaid diagrams without network access.

- MathJax 3 comes from the `django-static-mathjax` package (in the `docs` extra), whose files are
  added to the site under `javascripts/vendor/mathjax/`; `mkdocs.yml` loads
  `javascripts/vendor/mathjax/tex-mml-chtml.js`, and MathJax finds its fonts and extensions
  beside it.
- Mermaid is `docs/javascripts/vendor/mermaid.tiny.js`: the file `dist/mermaid.tiny.js` of the npm
  package `@mermaid-js/tiny` 11.17.2, unchanged (MIT licence beside it). Material for MkDocs draws
  each `pre.mermaid` with the global `mermaid` when one exists, and loads Mermaid from a CDN
  otherwise, so every page with a diagram loads this file first (deferred: it runs before
  `DOMContentLoaded`, when Material draws). To update it, take the same file from a newer
  `npm pack @mermaid-js/tiny@VERSION`.
"""

import importlib.util
import pathlib
import re

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from mkdocs.utils import get_relative_url


MATHJAX_DIR = "javascripts/vendor/mathjax"
# The combined component the site loads, and what it loads on demand: TeX extensions, the
# CommonHTML fonts, and the accessibility menu's parts.
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output/chtml", "a11y", "ui", "sre")
MERMAID = "javascripts/vendor/mermaid.tiny.js"

_HAS_DIAGRAM = re.compile(r"<pre[^>]*\bclass=\"[^\"]*\bmermaid\b")


def _mathjax_root() -> pathlib.Path:
    spec = importlib.util.find_spec("mathjax")
    roots = [] if spec is None else list(spec.submodule_search_locations or [])
    for root in roots:
        es5 = pathlib.Path(root) / "static" / "mathjax" / "es5"
        if (es5 / "tex-mml-chtml.js").is_file():
            return es5
    raise PluginError(
        "The docs serve MathJax from the `django-static-mathjax` package (MathJax 3), which is not "
        f"installed here (found `mathjax` at {roots or 'nowhere'}). Install the docs' requirements "
        "with `pip install -e '.[docs]'`."
    )


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = _mathjax_root()
    for part in MATHJAX_PARTS:
        path = root / part
        sources = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for source in sources:
            uri = f"{MATHJAX_DIR}/{source.relative_to(root).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


def on_post_page(output: str, page: Page, config: MkDocsConfig) -> str:
    if not _HAS_DIAGRAM.search(output):
        return output
    src = get_relative_url(MERMAID, page.url)
    head_end = output.find("</head>")
    if head_end < 0:
        raise PluginError(f"Page `{page.file.src_uri}` has a Mermaid diagram but no `</head>`.")
    return f'{output[:head_end]}<script src="{src}" defer></script>\n{output[head_end:]}'
