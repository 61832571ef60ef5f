"""`make latent-table` follows the default experiment: the pixel run's epochs are what its time
budget planned on this machine, or its max_epochs when it had no budget."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _table():
    spec = importlib.util.spec_from_file_location("latent_vs_pixel", REPO / "benchmarks" / "latent_vs_pixel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pixel_runs_epochs_come_from_its_plan_else_its_config(tmp_path):
    table = _table()
    (tmp_path / "config.yaml").write_text("trainer:\n  max_epochs: 40\nmodel:\n  max_epochs: 3\n")
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "plan": {"planned_epochs": 19}}))
    assert table.run_epochs(tmp_path) == 19
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok"}))
    assert table.run_epochs(tmp_path) == 40


def test_epochs_that_fit_stay_within_the_budget_and_the_default():
    table = _table()
    assert table.epochs_that_fit(100.0, start_up=10.0, epoch=20.0, most=40) == 4
    assert table.epochs_that_fit(1000.0, start_up=10.0, epoch=20.0, most=40) == 40
    assert table.epochs_that_fit(5.0, start_up=10.0, epoch=20.0) == 1


def test_a_latent_run_is_planned_to_what_the_autoencoder_and_its_overhead_leave():
    table = _table()
    run = {"seconds": 100.0, "steps": 700, "img_per_s": 10.0 * table.BATCH}  # 70 s of steps at 10 steps/s
    assert table.outside_steps(run) == 30.0
    minutes = table.latent_budget_minutes(564.0, ae_seconds=87.0, overhead=30.0)
    planned_steps_seconds = 60 * minutes * table.STEP_FRACTION  # what the run's time budget fills with steps
    assert planned_steps_seconds == pytest.approx((564.0 - 87.0 - 30.0) * (1 - table.IN_RUN_EXTRAS))


def test_no_time_left_for_the_latent_run_is_an_error_that_names_what_to_change():
    table = _table()
    with pytest.raises(SystemExit, match="no time left for latent diffusion.*autoencoder fewer epochs"):
        table.latent_budget_minutes(100.0, ae_seconds=90.0, overhead=30.0)
