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
