"""`make gpu-check` (benchmarks/gpu_check.sh) refuses, in one line that says what to do, where
torch sees no GPU; the GPU path itself is measured on a GPU machine (README "One GPU")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_without_a_gpu_the_script_stops_before_training_and_says_how_to_try_it(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "torch sees no CUDA GPU here" in done.stdout and "TRAINER=cpu" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.txt"]  # no run was started
