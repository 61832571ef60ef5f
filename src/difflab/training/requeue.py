"""Going on after a preemption: SLURM's requeue signal, and the newest checkpoint a run directory holds.

Under SLURM, Lightning's ``SLURMEnvironment`` answers the requeue signal (``sbatch
--signal=SIGUSR1@90``) by writing ``hpc_ckpt_<n>.ckpt`` into the trainer's ``default_root_dir``
(difflab sets it to the run directory) and calling ``scontrol requeue``; SLURM then stops the job
with SIGTERM, which makes difflab write ``checkpoints/last.ckpt``. The requeued job, started with
the same run directory and ``resume=auto``, goes on from whichever readable one is furthest on.
"""

from __future__ import annotations

import logging
import signal as signals
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from difflab.training.checkpoint import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["newest_checkpoint", "slurm_environment"]


def slurm_environment(auto_requeue: bool = True, signal: str = "SIGUSR1") -> SLURMEnvironment:
    """Lightning's SLURM environment with the requeue signal named as in ``sbatch --signal``."""
    name = signal.upper() if signal.upper().startswith("SIG") else f"SIG{signal.upper()}"
    if not isinstance(getattr(signals, name, None), signals.Signals):
        raise ValueError(f"trainer.plugins: unknown requeue signal {signal!r}: use the name sbatch --signal "
                         "sends, e.g. SIGUSR1 (the default) or SIGUSR2")
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=getattr(signals, name))


def _step(path: Path) -> Optional[int]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(payload["global_step"])
    except Exception:  # noqa: BLE001 - truncated by a kill mid-write, or not a Lightning checkpoint
        return None


def newest_checkpoint(run_dir: Path, last: Path) -> Optional[Path]:
    """The readable checkpoint of the run furthest on: ``last`` or an ``hpc_ckpt_<n>.ckpt`` of the
    run directory (a requeue signal's), or None where there is none. Unreadable files are named in
    the log and passed over; if every one is unreadable, CheckpointError."""
    candidates = [path for path in (last, *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))) if path.is_file()]
    steps = {}
    for path in candidates:
        step = _step(path)
        if step is None:
            log.warning("resume=auto: %s is unreadable (cut short by a kill?), passed over", path)
        else:
            steps[path] = step
    if not candidates:
        return None
    if not steps:  # starting fresh would overwrite them: the user decides
        raise CheckpointError(f"resume=auto: none of {', '.join(str(path) for path in candidates)} can be read; "
                              "pass ckpt_path=<a good checkpoint>, or move them away to start this run afresh")
    # The furthest step wins; at a tie the newer file (last.ckpt is written after a requeue's hpc file).
    return max(steps, key=lambda path: (steps[path], path.stat().st_mtime_ns))
