"""Going on where a run left off: ``resume=auto`` finds the run directory's newest readable
checkpoint, and a run whose result.json says ``ok`` is not trained again (a restarted multirun)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from difflab.cli import schema
from difflab.cli.collect import RESULT_FILE
from difflab.training import requeue

log = logging.getLogger("difflab.train")


def resume_auto(cfg: DictConfig) -> None:
    """``resume=auto``: a run whose directory already holds a checkpoint (a requeued or restarted job
    with the same ``hydra.run.dir`` or ``DIFFLAB_RUN_ID``) goes on from the readable one furthest on:
    last.ckpt or a SLURM requeue's hpc_ckpt_<n>.ckpt (``requeue.newest_checkpoint``)."""
    if cfg.get("resume") != "auto" or cfg.get("ckpt_path"):
        return
    node = (cfg.get("callbacks") or {}).get("last_checkpoint") or {}
    last = Path(node.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints") / "last.ckpt"
    newest = requeue.newest_checkpoint(Path(cfg.paths.output_dir), last)
    if newest is not None:
        log.info("resume=auto: going on from %s", newest)
        OmegaConf.update(cfg, "ckpt_path", str(newest))
    else:
        log.info("resume=auto: no %s yet, starting fresh", last)


def _own_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith("resume=")]


def finished_before(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """``resume=auto`` on a run directory whose result.json says ``ok``: the job finished before (a
    restarted multirun's, or a requeued job's after its end); its record, so nothing is trained again.
    ConfigError if that run had other overrides: this job needs its own directory."""
    if cfg.get("resume") != "auto" or not cfg.get("train", True):
        return None
    path = Path(cfg.paths.output_dir) / RESULT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok":
        return None
    now = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    before = record.get("overrides") or []
    if _own_overrides(before) != _own_overrides(now):
        raise schema.ConfigError(
            f"resume=auto: {path.parent} holds a finished run of other overrides ({' '.join(before)}"
            f" | now: {' '.join(now)}): give this run its own hydra.run.dir (hydra.sweep.dir for a multirun), or "
            f"go on from that run with ckpt_path={path.parent / 'checkpoints' / 'last.ckpt'}")
    log.info("resume=auto: %s finished already (result.json: ok); not trained again", path.parent)
    return record
