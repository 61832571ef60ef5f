"""Preemption: SIGTERM (and Ctrl-C) during training write last.ckpt at that step and end the run
as `interrupted`; the same command with resume=auto goes on from it in the same directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import warm_process

RUN = ["experiment=digits_tiny", "trainer.max_epochs=1000", "callbacks.fid=null", "callbacks.sample_grid=null",
       "callbacks.progress_bar=null", "callbacks.last_checkpoint.every_n_epochs=1000"]


def _start(args, cwd):
    return warm_process.Popen([sys.executable, "-m", "difflab.cli.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"),
                                       pytest.param(signal.SIGINT, "SIGINT", marks=pytest.mark.slow)])
def test_a_signal_checkpoints_and_resume_auto_goes_on(tmp_path, sig, name):
    run = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={run}", f"paths.root_dir={tmp_path}"]
    proc = _start(args, tmp_path)
    log = run / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.is_file() and "steps/s" in log.read_text()):
        time.sleep(0.2)  # the step-rate line comes after the first steps: training is under way
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and f"{name} stopped the run" in stderr and "Traceback" not in stderr, stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted"
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert step > 0 and f"step {step}" in stderr

    # The same command, resume=auto, a few more steps: it goes on from that step in the same directory.
    done = warm_process.run([sys.executable, "-m", "difflab.cli.train", *args, "resume=auto",
                             f"trainer.max_steps={step + 3}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume=auto: going on from" in (run / "train.log").read_text()
    result = json.loads((run / "result.json").read_text())
    assert result["status"] in ("ok", "stopped_early") and result["steps"] == step + 3


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path):
    run = tmp_path / "fresh"
    proc = warm_process.run([sys.executable, "-m", "difflab.cli.train", "experiment=digits_tiny", "trainer.max_epochs=1",
                             "callbacks.fid=null", "callbacks.progress_bar=null", "resume=auto",
                             f"hydra.run.dir={run}", f"paths.root_dir={tmp_path}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume=auto: no" in (run / "train.log").read_text()


def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_goes_on(tmp_path):
    # SLURM as a requeued job sees it: the requeue signal (sbatch --signal=SIGUSR1@90), then
    # SIGTERM; `scontrol` is a stand-in on PATH that records what it was asked to do.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "difflab", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    run = tmp_path / "run"
    args = [*RUN, "trainer=slurm", "trainer.accelerator=cpu", "trainer.benchmark=null", f"hydra.run.dir={run}",
            f"paths.root_dir={tmp_path}"]
    proc = warm_process.Popen([sys.executable, "-m", "difflab.cli.train", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.is_file() and "steps/s" in log.read_text()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "scontrol.args").is_file():
        time.sleep(0.2)
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    hpc = run / "hpc_ckpt_1.ckpt"  # in the run directory, not the cwd
    assert hpc.is_file() and not list(tmp_path.glob("hpc_ckpt_*"))
    proc.send_signal(signal.SIGTERM)  # SLURM stops the requeued job
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGTERM stopped the run" in stderr, stderr[-3000:]
    assert json.loads((run / "result.json").read_text())["status"] == "interrupted"
    steps = {path.name: torch.load(path, weights_only=True, map_location="cpu")["global_step"]
             for path in (hpc, run / "checkpoints" / "last.ckpt")}
    assert 0 < steps["hpc_ckpt_1.ckpt"] <= steps["last.ckpt"]

    # The requeued job: the same command and run directory, resume=auto.
    step = steps["last.ckpt"]
    done = warm_process.run([sys.executable, "-m", "difflab.cli.train", *args, "resume=auto",
                             f"trainer.max_steps={step + 3}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resume=auto: going on from {run / 'checkpoints' / 'last.ckpt'}" in log.read_text()
    assert json.loads((run / "result.json").read_text())["steps"] == step + 3
