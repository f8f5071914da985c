"""Run a notebook of the docs and store its outputs in it:
`python docs/hooks/run_notebook.py docs/tutorials/graph-compilation.md`.

The docs show the stored outputs (`mkdocs-jupyter` with `execute: false`), and
tests/test_notebook.py checks that a fresh run prints the same.
"""

import pathlib
import sys

import nbclient
import nbformat


def run(path: str | pathlib.Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Execute the notebook at `path` in a fresh `python3` kernel, from its own folder.

    **Arguments:**

    - `path`: the `.ipynb` file.
    - `timeout`: seconds allowed for each cell.

    **Returns:**

    The executed notebook (the file is left unchanged).
    """
    path = pathlib.Path(path)
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no timestamps in the stored file
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return notebook


if __name__ == "__main__":
    for name in sys.argv[1:]:
        nbformat.write(run(name), name)
