"""Weights & Biases tracking, offline: what a run logs (config, losses, grids, eval metrics),
the run id kept with the checkpoints for a resume, and one W&B run per training in a process."""

import struct
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from difflab.cli import _hydra
from difflab.training import tracking

pytest.importorskip("wandb")
pytestmark = pytest.mark.usefixtures("one_thread", "wandb_offline")

_hydra.setup()
CONF = Path(_hydra.config_dir())
TRAIN_ARGS = ("experiment=digits_tiny", "trainer.max_epochs=1", "callbacks.fid.num_samples=32",
              "callbacks.fid.batch_size=32", "callbacks.progress_bar=null", "logger=wandb")


@pytest.fixture(scope="module")
def wandb_offline(tmp_path_factory):
    """Never the network, and nothing written outside the test's temporary directories."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            patch.setenv(key, str(home / key.lower()))
        for key in ("WANDB_RUN_ID", "WANDB_RESUME", "PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            patch.delenv(key, raising=False)
        yield


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def _train(root, name, *extra):
    """Train in process (as test_evaluate.py does); the run directory and returned metrics."""
    import wandb

    from difflab.cli.train import train

    run = root / name
    run.mkdir()
    cfg = _compose([*TRAIN_ARGS, *extra, f"paths.output_dir={run}", f"paths.root_dir={root}"])
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            patch.delenv(key, raising=False)
        metrics = train(cfg)
    assert wandb.run is None  # finished: the next training starts its own W&B run
    return run, metrics


def _offline_run(run: Path) -> Path:
    """The single `offline-run-<time>-<id>` directory W&B wrote under the run directory."""
    found = sorted((run / "wandb").glob("offline-run-*"))
    assert len(found) == 1, found
    return found[0]


def _run_id(run: Path) -> str:
    return _offline_run(run).name.rsplit("-", 1)[1]


def _records(path: Path):
    """The protobuf records of a `.wandb` file (W&B 0.31 writes no wandb-summary.json or
    config.yaml offline): a 7-byte header `:W&B` + magic + version, then LevelDB-log style
    32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _logged(run: Path, wait: float = 20.0) -> tuple[set[str], set[str], str]:
    """(history keys, config keys, run id) of a run's offline W&B log.

    W&B's service process may still be writing the file when `finish()` has returned (a
    half-written record, or none yet): read again until it parses with history in it."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait
    while True:
        try:
            found = _parse_log(run)
            if found[0] or time.monotonic() > deadline:
                return found
        except DecodeError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _parse_log(run: Path) -> tuple[set[str], set[str], str]:
    history, config, run_id = set(), set(), None
    (path,) = _offline_run(run).glob("run-*.wandb")
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "config":
            config.update(item.key or "/".join(item.nested_key) for item in record.config.update)
        elif kind == "run":
            run_id = record.run.run_id
    return history, config, run_id


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A 1-epoch digits run logged to W&B offline, with a 32-sample FID at the end."""
    return _train(tmp_path_factory.mktemp("wandb"), "first")


def test_offline_run_holds_config_losses_grids_and_eval_metrics(first):
    run, metrics = first
    history, config, run_id = _logged(run)
    assert {"train/loss_step", "train/loss_epoch", "val/loss", "eval/fid", "eval/kid"} <= history
    assert "samples/filenames" in history  # the sample grid, as an image
    assert {"model", "data", "schedule", "sampler", "trainer"} <= config  # the resolved run config
    images = list((_offline_run(run) / "files" / "media" / "images").glob("samples_*.png"))
    assert images, "no sample grid under files/media/images"
    assert run_id == _run_id(run)
    assert (run / "checkpoints" / tracking.ID_FILE).read_text().strip() == run_id
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint[tracking.ID_KEY] == run_id
    assert metrics["eval/fid"] > 0


def test_sequential_trainings_get_their_own_runs(first, tmp_path):
    second, _ = _train(tmp_path, "second")  # as a multirun's next job, in the same process
    assert _run_id(second) != _run_id(first[0])


def test_resume_continues_the_same_wandb_run(first, tmp_path):
    run, _ = first
    resumed, _ = _train(tmp_path, "resumed", f"ckpt_path={run}/checkpoints/last.ckpt", "trainer.max_epochs=2")
    assert _run_id(resumed) == _run_id(run)
    history, _, run_id = _logged(resumed)
    assert run_id == _run_id(run) and "val/loss" in history
    assert (resumed / "checkpoints" / tracking.ID_FILE).read_text().strip() == run_id


def test_prepare_resume_uses_the_saved_id_or_none(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)  # a checkpoint of a run with another logger
    cfg = _compose([*TRAIN_ARGS, f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}"])
    assert tracking.prepare_resume(cfg) is None and "id" not in cfg.logger.wandb  # a fresh W&B run
    torch.save({tracking.ID_KEY: "abc123"}, ckpt)
    assert tracking.prepare_resume(cfg) == "abc123"
    assert cfg.logger.wandb.id == "abc123" and cfg.logger.wandb.resume == "allow"
    (tmp_path / tracking.ID_FILE).write_text("fromfile\n")  # the file beside the checkpoint wins
    assert tracking.saved_run_id(ckpt) == "fromfile"
    other = _compose([*TRAIN_ARGS[:-1], "logger=csv", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}"])
    assert tracking.prepare_resume(other) is None and tracking.callbacks(other) == []
