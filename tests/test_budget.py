"""No silent early stop: a run that ends before its planned steps says so (log, result.json,
sweep summary), warns early when it will not fit max_time, and always validates at the end."""

import csv
import json
import logging
import os
import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Timer

from difflab.training.budget import StepBudget

import warm_process

TINY = ["experiment=digits_tiny", "callbacks=minimal", "callbacks.progress_bar=null"]


def _run(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return warm_process.run([sys.executable, "-m", "difflab.cli.train", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)


def _fake_trainer(step, seconds_left):
    timer = Timer(duration={"seconds": 100})
    timer.time_remaining = lambda *a, **k: seconds_left
    return SimpleNamespace(callbacks=[timer], global_step=step, fast_dev_run=False)


def test_the_estimate_warns_at_once_when_max_time_will_not_hold(caplog):
    budget = StepBudget(cause="precision bf16-mixed runs at 0.10x the speed of 32-true")
    budget.planned = 1400
    with caplog.at_level(logging.INFO, logger="difflab.train"):
        budget._check_fits(_fake_trainer(35, seconds_left=600), rate=0.06)
    assert budget.warning is not None
    assert "will not finish inside max_time" in budget.warning
    assert "stop near step 71 of 1400" in budget.warning  # 35 + 0.06 steps/s * 600 s
    assert "Likely cause: precision bf16-mixed runs at 0.10x" in budget.warning
    assert "trainer.max_time" in budget.warning and budget.warning in caplog.text


def test_the_estimate_is_quiet_when_the_run_fits(caplog):
    budget = StepBudget()
    budget.planned = 1400
    with caplog.at_level(logging.INFO, logger="difflab.train"):
        budget._check_fits(_fake_trainer(35, seconds_left=600), rate=3.0)
    assert budget.warning is None and "need about 7 min 35 s" in caplog.text


def test_a_run_cut_by_max_time_says_so_and_still_validates(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(*TINY, "trainer.max_epochs=50", "trainer.max_time=00:00:00:02",
                "trainer.check_val_every_n_epoch=40", f"hydra.run.dir={run_dir}", f"paths.root_dir={tmp_path}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "stopped_early"
    assert result["planned_steps"] == 50 * 25 and 0 < result["steps"] < result["planned_steps"]
    assert "max_time" in result["stop_reason"]
    text = proc.stdout + proc.stderr
    assert f"training stopped early: {result['steps']} of 1250 planned steps" in text
    assert "val/loss" in result["metrics"]  # validated on the step it stopped at
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_full_run_is_ok_with_its_steps(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(*TINY, "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=5", f"hydra.run.dir={run_dir}",
                f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["steps"], result["planned_steps"]) == ("ok", 50, 50)
    assert "val/loss" in result["metrics"]  # epoch 2 is no multiple of 5, yet it validated once
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("val/loss")) == 1
    assert result["precision"]["precision"] == "32-true"  # digits_tiny asks for it
    assert result["precision"]["requested"] == {"precision": "32-true", "channels_last": "auto"}
    config = (run_dir / "config.yaml").read_text()  # the choice, not "auto", is what the run records
    assert "precision: 32-true" in config
    assert f"channels_last: {str(result['precision']['channels_last']).lower()}" in config
