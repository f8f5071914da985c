"""An MkDocs hook that shows each notebook `docs/x.ipynb` as the page `x.md`, with the outputs stored
in it: its Markdown cells as they are, its code cells as Python blocks, and each cell's outputs
below it. The notebook itself is served beside the page, to download.

The page goes through the site's own Markdown, so cross-references, maths and diagrams work as on
every other page, served from the site itself. A rich output is shown by the first of its forms that
a page can hold: Markdown (a graph's Mermaid diagram), an SVG picture (a file beside the page), or
text. The notebook is not run here: `docs/hooks/run_notebook.py` runs it and stores its outputs, and
tests/test_notebook.py checks that a fresh run gives the same.
"""

import posixpath

import nbformat
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files


def _text_block(text: str) -> str:
    text = text.rstrip().lstrip("\n")
    return f"```text\n{text}\n```"


def _output(output: nbformat.NotebookNode, picture: str, files: list[tuple[str, str]]) -> str:
    if output.output_type == "stream":
        return _text_block(output.text)
    if output.output_type == "error":
        raise PluginError(f"`{picture}`: a cell of the notebook stored an error: {output.ename}.")
    data = output.get("data", {})
    if "text/markdown" in data:
        return data["text/markdown"].rstrip()
    if "image/svg+xml" in data:
        files.append((picture, data["image/svg+xml"]))
        return f"![]({posixpath.basename(picture)})"
    if "text/plain" in data:
        return _text_block(data["text/plain"])
    raise PluginError(f"`{picture}`: an output with no Markdown, SVG or text form: {list(data)}.")


def notebook_to_markdown(notebook: nbformat.NotebookNode, stem: str) -> tuple[str, list[tuple[str, str]]]:
    """The page of a notebook.

    **Arguments:**

    - `notebook`: the notebook, with its stored outputs.
    - `stem`: its path in the docs without `.ipynb`, to name its pictures.

    **Returns:**

    The page's Markdown, and the pictures it shows as `(path, SVG)` pairs.
    """
    name = posixpath.basename(stem)
    blocks = [f"[Download this page as a notebook]({name}.ipynb){{ .md-button }}"]
    pictures: list[tuple[str, str]] = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            blocks.append(cell.source)
        elif cell.cell_type == "code":
            blocks.append(f"```python\n{cell.source.rstrip()}\n```")
            outputs: list[nbformat.NotebookNode] = []
            for output in cell.outputs:  # one text block for what a cell prints
                if outputs and output.output_type == outputs[-1].output_type == "stream":
                    outputs[-1] = nbformat.from_dict({**outputs[-1], "text": outputs[-1].text + output.text})
                else:
                    outputs.append(output)
            for number, output in enumerate(outputs):
                blocks.append(_output(output, f"{stem}-{index}-{number}.svg", pictures))
    # The title first, then the download button.
    if blocks[1].startswith("# "):
        title, _, rest = blocks[1].partition("\n")
        blocks[:2] = [title, blocks[0], rest.strip("\n")]
    return "\n\n".join(block for block in blocks if block) + "\n", pictures


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for file in list(files):
        if not file.src_uri.endswith(".ipynb"):
            continue
        stem = file.src_uri.removesuffix(".ipynb")
        if files.get_file_from_path(f"{stem}.md") is not None:
            raise PluginError(f"`{file.src_uri}` and `{stem}.md` would be the same page.")
        notebook = nbformat.read(file.abs_src_path, as_version=4)
        page, pictures = notebook_to_markdown(notebook, stem)
        files.append(File.generated(config, f"{stem}.md", content=page))
        for path, svg in pictures:
            files.append(File.generated(config, path, content=svg))
    return files
