"""Resume equals no interruption: a run stopped by a real SIGTERM at one point, then resumed
with resume=auto in its own directory, ends in the state of the same run left alone: weights,
EMA, optimizer, LR schedule, step counters, RNG states, the order of the training images and
their flips, the logged losses, the sample grids and the FID-callback scores. On CPU in float32
every one is bit-identical (no tolerance).

The points (tests/signal_at.py sends the signal from inside the run, so each is exact):
mid-epoch, between epochs, mid-validation, and while the sample grid and the FID callback
sample at an epoch's end.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import warm_process

TESTS = Path(__file__).parent
EPOCHS = 3
RUN = ["experiment=digits_tiny", f"trainer.max_epochs={EPOCHS}", "data.hflip=true", "data.eval_batch_size=40",
       "callbacks.progress_bar=null", "callbacks.last_checkpoint.every_n_epochs=1000",
       "callbacks.fid.every_n_epochs=1", "callbacks.fid.num_samples=32", "callbacks.fid.batch_size=32",
       "callbacks.fid.domain_steps=20", "sampler.steps=4", "callbacks.sample_grid.num_samples=4",
       "callbacks.sample_grid.nrow=2", "+callbacks.signal_at._target_=signal_at.SignalAt"]

# (point, epoch, index): where the signal arrives.
POINTS = {
    "mid_epoch": ("train_batch", 1, 7),        # after batch 7 of epoch 1
    "between_epochs": ("epoch_end", 0, 0),     # after epoch 0's grid and FID
    "mid_validation": ("validation", 1, 2),    # as validation batch 2 of 5 at epoch 1's end starts
    "during_grid": ("sampling", 1, 0),         # while the grid of epoch 1 samples
    "during_fid": ("sampling", 0, 1),          # while the FID callback of epoch 0 samples
}


def _train(run: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return warm_process.run([sys.executable, "-m", "difflab.cli.train", *RUN, f"hydra.run.dir={run}",
                             f"paths.root_dir={root}", f"paths.cache_dir={root / 'cache'}",
                             f"+callbacks.signal_at.order_file={run / 'order.jsonl'}", *extra],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_equal")
    run = root / "left_alone"
    done = _train(run, root)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def _metrics(run: Path) -> dict[tuple[str, str], str]:
    """Every logged value by (metric, step): the losses of each step, val/loss and the FID
    scores of each epoch."""
    with open(run / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return {(key, row["step"]): value for row in rows for key, value in row.items()
            if value != "" and key not in ("step", "epoch")}


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# Two points in the default suite (about a minute each, after the run left alone); the
# others with the slow tests (`make test-slow`).
QUICK = ("mid_epoch", "mid_validation")


@pytest.mark.parametrize("point", [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow)
                                   for name in POINTS])
def test_a_run_resumed_after_a_signal_equals_the_run_left_alone(uninterrupted, tmp_path, point):
    at, epoch, index = POINTS[point]
    run = tmp_path / point
    stopped = _train(run, uninterrupted.parent, f"+callbacks.signal_at.at={at}", f"+callbacks.signal_at.epoch={epoch}",
                     f"+callbacks.signal_at.batch={index}")
    assert stopped.returncode != 0 and "SIGTERM stopped the run" in stopped.stderr, stopped.stderr[-3000:]
    assert json.loads((run / "result.json").read_text())["status"] == "interrupted"
    stopped_at = _state(run)["global_step"]
    assert 0 < stopped_at < _state(uninterrupted)["global_step"]

    resumed = _train(run, uninterrupted.parent, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: going on from" in (run / "train.log").read_text()

    # The images of every step, flips included: the two segments of the stopped run are the
    # run left alone, with no step trained twice or skipped.
    assert (run / "order.jsonl").read_text() == (uninterrupted / "order.jsonl").read_text()
    assert _metrics(run) == _metrics(uninterrupted)
    want, got = _state(uninterrupted), _state(run)
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers", "difflab_rng"):
        _assert_same(want[key], got[key], key)
    ema = [key for key in want["callbacks"] if key.startswith("EMA")]
    assert ema, list(want["callbacks"])
    _assert_same({key: want["callbacks"][key] for key in ema}, {key: got["callbacks"][key] for key in ema}, "EMA")
    for grid in sorted((uninterrupted / "samples").glob("*.png")):
        assert (run / "samples" / grid.name).read_bytes() == grid.read_bytes(), grid.name


def test_ctrl_c_mid_validation_saves_raw_and_ema_weights_the_right_way_round(tmp_path):
    """Lightning swaps the EMA into the live module for validation; a checkpoint written while
    they are swapped (Ctrl-C raises at once, mid-validation) must still hold the raw weights as
    `current_model_state` and the EMA as `state_dict`, or a resume trains on from the EMA."""
    import lightning.pytorch as pl

    from difflab.data import ImageDataModule
    from difflab.diffusion.samplers import DDIMSampler
    from difflab.diffusion.schedule import NoiseSchedule
    from difflab.models import UNet
    from difflab.training.callbacks import LastCheckpoint
    from difflab.training.ema import EMA
    from difflab.training.module import DiffusionModule

    class CtrlCInValidation(DiffusionModule):
        def validation_step(self, batch, batch_idx):
            if not self.trainer.sanity_checking and batch_idx == 1:
                raise KeyboardInterrupt
            return super().validation_step(batch, batch_idx)

    pl.seed_everything(0, verbose=False)
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               num_groups=4, image_size=8)
    module = CtrlCInValidation(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5), warmup_steps=2,
                               run_config={"model": {"in_channels": 1, "image_size": 8}})
    ema, seen = EMA(decay=0.9), {}

    class Weights(pl.Callback):  # the raw and EMA weights after the last step, before validation
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen["raw"] = {key: value.clone() for key, value in pl_module.state_dict().items()}
            seen["ema"] = {key: value.clone() for key, value in ema.averaged_module.state_dict().items()}

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
                         limit_train_batches=4, callbacks=[ema, Weights(), LastCheckpoint(dirpath=str(tmp_path))],
                         default_root_dir=tmp_path)
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C, after the on_exception hooks
        trainer.fit(module, datamodule=ImageDataModule(name="digits", batch_size=32, eval_batch_size=16))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True, map_location="cpu")
    raw, average = seen["raw"], seen["ema"]
    assert not torch.equal(raw["net.time_mlp.0.weight"], average["net.time_mlp.0.weight"])
    for key in raw:
        assert torch.equal(saved["current_model_state"][key], raw[key]), key
        assert torch.equal(saved["state_dict"][key], average[key]), key
        assert torch.equal(module.state_dict()[key], raw[key]), key  # the live module has its own back
