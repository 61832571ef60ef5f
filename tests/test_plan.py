"""A run planned to its time budget: the plan's arithmetic, the run it makes (step for step the
run of `trainer.max_epochs=<planned>`), its record in result.json and the checkpoint, and the
settings that cannot work."""

import json
import os
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from difflab.cli import _hydra, schema, train
from difflab.training import plan as plan_module
from difflab.training.lr import LRShape, lr_factor
from difflab.training.plan import STEP_FRACTION, TimeBudget, plan_epochs

import warm_process

pytestmark = pytest.mark.usefixtures("one_thread")
# 25 steps of 64 per epoch; the decision (step 35) falls inside a 40-step warm-up.
TINY = ["experiment=digits_tiny", "callbacks=minimal", "optim.warmup_steps=40", "trainer.check_val_every_n_epoch=2"]


def _cfg(tmp_path, name, *overrides):
    _hydra.setup()
    with initialize_config_dir(config_dir=str(_hydra.config_dir()), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.output_dir={tmp_path / name}",
                                           f"paths.root_dir={tmp_path}", *overrides])


def _fit(cfg):
    os.makedirs(cfg.paths.output_dir, exist_ok=True)
    metrics, outcome = train.train_run(cfg)
    return outcome, torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)


def test_the_plan_fills_the_budget_left_with_whole_epochs():
    # 100 s left at 10 steps/s trains 850 more steps: (35 + 850) // 100 = 8 whole epochs.
    assert plan_epochs(110, 10, 10.0, 35, 100, configured=40, current_epoch=0) == int((35 + 1000 * STEP_FRACTION) // 100)
    assert plan_epochs(10_000, 10, 10.0, 35, 100, configured=40, current_epoch=0) == 40  # fits: unchanged
    assert plan_epochs(20, 30, 10.0, 235, 100, configured=40, current_epoch=2) == 3  # never before the epoch under way


def test_the_lr_shape_is_lr_factor_and_its_length_is_kept_by_the_scheduler():
    shape = LRShape(1000, warmup_steps=50, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [shape(s) for s in (0, 49, 50, 500, 999)] == [
        lr_factor(s, 1000, warmup_steps=50, lr_schedule="cosine", min_lr_ratio=0.1) for s in (0, 49, 50, 500, 999)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
    shape.total = 400  # what a time budget does
    state = scheduler.state_dict()
    fresh = torch.optim.lr_scheduler.LambdaLR(optimizer, LRShape(1000, warmup_steps=50, lr_schedule="cosine"))
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].total == 400


def test_a_budgeted_run_is_the_run_of_its_planned_epochs(tmp_path, monkeypatch):
    """The budget cuts 4 configured epochs to 2: the weights, EMA, optimizer, LR and steps are
    those of a run launched with trainer.max_epochs=2 and no budget."""
    monkeypatch.setattr(plan_module, "plan_epochs", lambda *args, **kwargs: 2)
    outcome, planned = _fit(_cfg(tmp_path, "planned", "trainer.max_epochs=4", "trainer.budget_minutes=5"))
    assert outcome["status"] == "ok" and outcome["steps"] == outcome["planned_steps"] == 50
    assert outcome["plan"]["configured_epochs"] == 4 and outcome["plan"]["planned_epochs"] == 2
    assert outcome["plan"]["decided_at_step"] == 35 and outcome["plan"]["rate_steps_per_s"] > 0
    _, plain = _fit(_cfg(tmp_path, "plain", "trainer.max_epochs=2"))
    assert planned["global_step"] == plain["global_step"] == 50
    for part in ("state_dict", "current_model_state"):  # the EMA weights and the raw ones
        for key in plain[part]:
            assert torch.equal(planned[part][key], plain[part][key]), (part, key)
    for a, b in zip(planned["optimizer_states"][0]["state"].values(), plain["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert planned["lr_schedulers"][0]["_last_lr"] == plain["lr_schedulers"][0]["_last_lr"]
    assert planned["lr_schedulers"][0]["lr_lambdas"][0]["total"] == 50
    assert planned["callbacks"]["EMA"] == plain["callbacks"]["EMA"]
    assert planned["callbacks"]["TimeBudget"]["plan"]["planned_epochs"] == 2


def test_a_resumed_run_keeps_its_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "plan_epochs", lambda *args, **kwargs: 2)
    cfg = _cfg(tmp_path, "run", "trainer.max_epochs=4", "trainer.budget_minutes=5")
    _fit(cfg)
    monkeypatch.setattr(plan_module, "plan_epochs", lambda *args, **kwargs: 4)  # a new plan would train on
    resumed = _cfg(tmp_path, "run", "trainer.max_epochs=4", "trainer.budget_minutes=5",
                   f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    outcome, state = _fit(resumed)
    assert state["global_step"] == 50 and outcome["planned_steps"] == 50


def test_a_run_that_fits_is_not_changed(tmp_path):
    outcome, state = _fit(_cfg(tmp_path, "run", "trainer.max_epochs=2", "trainer.budget_minutes=60"))
    assert outcome["plan"]["planned_epochs"] == outcome["plan"]["configured_epochs"] == 2
    assert state["global_step"] == 50 and state["lr_schedulers"][0]["lr_lambdas"][0]["total"] == 50


@pytest.mark.parametrize("overrides,message", [
    (["trainer.budget_minutes=0"], r"trainer.budget_minutes=0(\.0)? is not allowed"),
    (["trainer.budget_minutes=20", "trainer.max_time=00:00:10:00"], "longer than trainer.max_time=00:00:10:00"),
])
def test_budget_settings_that_cannot_work_name_the_setting(tmp_path, overrides, message):
    with pytest.raises(schema.ConfigError, match=message):
        schema.validate(_cfg(tmp_path, "run", *overrides))


def test_the_budget_refuses_a_non_positive_length():
    with pytest.raises(ValueError, match="budget_minutes"):
        TimeBudget(0)


def test_result_json_of_a_real_run_holds_the_plan(tmp_path):
    """The default trainer's budget on a run that fits: the plan is recorded in result.json."""
    run_dir = tmp_path / "run"
    proc = warm_process.run([sys.executable, "-m", "difflab.cli.train", *TINY, "trainer.max_epochs=2",
                             "trainer.budget_minutes=30", f"hydra.run.dir={run_dir}", f"paths.root_dir={tmp_path}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["plan"]["budget_minutes"] == 30
    assert result["plan"]["planned_epochs"] == 2
