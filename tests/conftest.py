"""Shared test set-up: one torch thread per xdist worker (2 workers on 2 cores)."""

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors over many steps: intra-op threads only add contention on 2 shared cores.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def difflab_cache(tmp_path_factory):
    """Domain classifiers and reference features go to a per-session cache, never the repo's
    `.cache`; subprocess runs inherit it through DIFFLAB_CACHE."""
    path = tmp_path_factory.getbasetemp() / "difflab-cache"
    previous = os.environ.get("DIFFLAB_CACHE")
    os.environ["DIFFLAB_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("DIFFLAB_CACHE", None)
    else:
        os.environ["DIFFLAB_CACHE"] = previous
