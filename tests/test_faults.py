"""Faults: damaged checkpoints are refused by name; caches written by parallel jobs are never
seen half-written."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from difflab.metrics import cache
from difflab.training.callbacks import EMA_FORMAT
from difflab.training.checkpoint import CheckpointError, read_checkpoint

import warm_process


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, damage):
    good = tmp_path / "ema.pt"
    torch.save({"format": EMA_FORMAT, "run_config": {"model": {}}, "state_dict": {"w": torch.randn(1000)}}, good)
    data = good.read_bytes()
    bad = tmp_path / f"{damage}-ema.pt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10,
                     "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"could not read {bad}"):
        read_checkpoint(bad)


def _writer(path: str, rounds: int, seed: int) -> None:
    key = {"dataset": "x", "image_size": 8}
    for i in range(rounds):
        cache.save(Path(path), key, features=torch.full((50_000,), float(seed * 1000 + i)))


def test_parallel_writers_leave_one_readable_cache(tmp_path):
    # Two jobs of a sweep building the same cache at once, a third reading it meanwhile.
    path = tmp_path / "features.pt"
    key = {"dataset": "x", "image_size": 8}
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(path), 10, seed)) for seed in (1, 2)]
    for process in writers:
        process.start()
    while any(process.is_alive() for process in writers):
        existed = path.exists()
        payload = cache.load(path, key, "test")
        assert payload is not None or not existed  # once there, it always reads (None: unreadable)
        if payload is not None:  # never half-written: a whole tensor of one writer's one value
            values = payload["features"]
            assert values.numel() == 50_000 and bool((values == values[0]).all())
    for process in writers:
        process.join()
        assert process.exitcode == 0
    final = cache.load(path, key, "test")["features"]
    assert float(final[0]) in (1009.0, 2009.0) and not list(tmp_path.glob("*.tmp*"))


def test_resume_auto_takes_the_readable_checkpoint_furthest_on(tmp_path, caplog):
    from difflab.training.requeue import newest_checkpoint

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    assert newest_checkpoint(tmp_path, last) is None  # nothing yet: start fresh
    torch.save({"global_step": 5, "state_dict": {}}, last)
    torch.save({"global_step": 9, "state_dict": {}}, tmp_path / "hpc_ckpt_1.ckpt")
    assert newest_checkpoint(tmp_path, last) == tmp_path / "hpc_ckpt_1.ckpt"
    data = (tmp_path / "hpc_ckpt_1.ckpt").read_bytes()
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(data[: len(data) // 2])  # killed while writing
    assert newest_checkpoint(tmp_path, last) == tmp_path / "hpc_ckpt_1.ckpt"
    assert "hpc_ckpt_2.ckpt is unreadable" in caplog.text
    for path in (last, tmp_path / "hpc_ckpt_1.ckpt"):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of .* can be read"):  # never silently start over them
        newest_checkpoint(tmp_path, last)


def test_a_pickled_object_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": multiprocessing.get_context("spawn").Event}, path)  # a global a safe load refuses
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert f"could not read {path}" in message and "never code" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_full_disk_keeps_the_previous_file_and_says_what_to_do(tmp_path):
    from difflab.metrics.report import OutputWriteError, replacing

    path = tmp_path / "checkpoints" / "last.ckpt"
    with replacing(path) as tmp:
        torch.save({"global_step": 7}, tmp)

    def fill_the_disk(target):
        target.write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputWriteError) as caught:
        with replacing(path, " with resume=auto") as tmp:
            fill_the_disk(tmp)
    message = str(caught.value)
    assert f"could not write {path} (No space left on device)" in message and "resume=auto" in message
    assert f"{path} is the previous one, untouched" in message
    assert torch.load(path, weights_only=True)["global_step"] == 7  # the last good checkpoint stands
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_an_unwritable_run_directory_is_one_line_before_anything_starts(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = warm_process.run([sys.executable, "-m", "difflab.cli.train", "experiment=digits_tiny",
                             f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"cannot write the run directory {blocker / 'run'} (Not a directory): point hydra.run.dir" in proc.stderr
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
