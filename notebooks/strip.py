"""Strip outputs and execution counts from notebooks, in place.

    python notebooks/strip.py                 # every notebook in notebooks/
    python notebooks/strip.py path.ipynb ...  # the given ones
    python notebooks/strip.py --check         # list unstripped notebooks, exit 1 if any

Cell sources and notebook metadata stay as they are; per-cell execution metadata
(timings) is dropped too, so a re-run notebook diffs only where its code changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def is_stripped(nb: nbformat.NotebookNode) -> bool:
    return all(
        not cell.get("outputs") and cell.get("execution_count") is None and "execution" not in cell.get("metadata", {})
        for cell in nb.cells
        if cell.cell_type == "code"
    )


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"] or sorted(HERE.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if is_stripped(nb):
            continue
        dirty.append(path)
        if not check:
            nbformat.write(strip(nb), path)
    for path in dirty:
        print(f"{'not stripped' if check else 'stripped'}: {path}")
    return 1 if check and dirty else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
