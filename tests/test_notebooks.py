"""The notebooks in notebooks/ run top to bottom in a fresh kernel, and are committed stripped.

Each notebook is executed with nbclient in a temporary working directory, on a kernel that
runs this interpreter (a throw-away kernelspec, so a global "python3" kernel pointing at
another Python cannot be picked up). A raising cell fails the test with that cell's source
and traceback. Together the five take about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "difflab-notebook-test"
# What a training notebook could leave behind if it wrote into the working directory.
RUN_LEFTOVERS = ("lightning_logs", "checkpoints", "*.ckpt", "*.pt", "metrics.csv")


def test_notebooks_exist():
    names = [path.name for path in NOTEBOOKS]
    assert names == ["01_forward_process.ipynb", "02_train_and_sample.ipynb", "03_samplers_and_guidance.ipynb",
                     "04_restoration.ipynb", "05_latent_and_text.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; "
                       "run `python notebooks/strip.py` before committing")


def _leftovers(directory: Path) -> set[Path]:
    return {p for pattern in RUN_LEFTOVERS for p in directory.glob(pattern)}


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec for this interpreter, visible only to this test through JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "difflab (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


# The longest notebooks (samplers and guidance, restoration, latent + text: one to three minutes
# of 2 cores) run in `make test-slow`; the default suite runs the first two.
SLOW_NOTEBOOKS = ("03_samplers_and_guidance", "04_restoration", "05_latent_and_text")


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p
                                  for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, kernel_name: str):
    workdir = tmp_path / "run"
    workdir.mkdir()
    before = _leftovers(REPO) | _leftovers(NOTEBOOK_DIR)
    notebook_files = set(NOTEBOOK_DIR.iterdir())
    committed = path.read_bytes()
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600,
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the kernel's traceback is ANSI-coloured
        pytest.fail(f"{path.name} failed in a cell:\n{message}", pytrace=False)
    errors = [output for cell in nb.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors
    assert not (_leftovers(REPO) | _leftovers(NOTEBOOK_DIR)) - before, "the notebook wrote run files into the repo"
    assert set(NOTEBOOK_DIR.iterdir()) == notebook_files, "the notebook wrote into notebooks/"
    assert path.read_bytes() == committed, "executing must not write the outputs back into the notebook"
