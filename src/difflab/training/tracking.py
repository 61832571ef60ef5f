"""Weights & Biases tracking: one W&B run per training run, carried over a resume.

* `WandbTracking` (a callback) sends the resolved run config as the W&B run config, and keeps
  the W&B run id with the checkpoints: in every checkpoint (`wandb_run_id`) and in
  `wandb_id.txt` beside them.
* `prepare_resume(cfg)` points the WandbLogger nodes of `cfg.logger` at that id when
  `ckpt_path` is set, so a resumed run continues the same W&B run (a checkpoint without
  one, from a run with another logger, starts a fresh W&B run).
* `finish(trainer)` ends the W&B run at the end of `train()`, so the next job of a multirun
  (Hydra's basic launcher runs them in one process) gets its own run.

Offline (`WANDB_MODE=offline`) everything goes to `<save_dir>/wandb/offline-run-<time>-<id>/`,
uploadable later with `wandb sync`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ID_KEY = "wandb_run_id"
ID_FILE = "wandb_id.txt"


def wandb_nodes(cfg: DictConfig) -> list[str]:
    """Names of the `cfg.logger` entries that build a WandbLogger."""
    return [name for name, node in (cfg.get("logger") or {}).items()
            if node is not None and str(node.get("_target_", "")).endswith("WandbLogger")]


def wandb_loggers(trainer: Optional[pl.Trainer]) -> list[Any]:
    """The trainer's WandbLoggers (none without wandb installed)."""
    if trainer is None:
        return []
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def saved_run_id(ckpt_path: str | Path) -> Optional[str]:
    """The W&B run id kept with a checkpoint: `wandb_id.txt` beside it, else the
    checkpoint's `wandb_run_id` entry; None when neither has one."""
    path = Path(ckpt_path)
    side = path.parent / ID_FILE
    if side.is_file():
        run_id = side.read_text().strip()
        if run_id:
            return run_id
    if not path.is_file():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # never run code from a file
    run_id = checkpoint.get(ID_KEY) if isinstance(checkpoint, dict) else None
    return str(run_id) if run_id else None


def prepare_resume(cfg: DictConfig) -> Optional[str]:
    """On `ckpt_path=...`, give each WandbLogger node the saved run id (`id`, `resume=allow`)
    before it is instantiated; return that id (None: nothing to continue, a fresh run)."""
    nodes = wandb_nodes(cfg)
    if not cfg.get("ckpt_path") or not nodes:
        return None
    run_id = saved_run_id(cfg.ckpt_path)
    if run_id is None:
        log.info("no W&B run id with %s: starting a new W&B run", cfg.ckpt_path)
        return None
    for name in nodes:
        OmegaConf.update(cfg, f"logger.{name}.id", run_id, force_add=True)
        OmegaConf.update(cfg, f"logger.{name}.resume", "allow", force_add=True)
    log.info("resuming W&B run %s", run_id)
    return run_id


def callbacks(cfg: DictConfig) -> list[Callback]:
    """The tracking callback when `cfg.logger` has a WandbLogger, else nothing."""
    if not wandb_nodes(cfg):
        return []
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return [WandbTracking(config=config, dirpath=Path(cfg.paths.output_dir) / "checkpoints")]


class WandbTracking(Callback):
    """Send `config` as the W&B run config at the start of fit; keep the W&B run id in every
    checkpoint and in `<dirpath>/wandb_id.txt` (rank 0)."""

    def __init__(self, config: Optional[dict[str, Any]] = None, dirpath: str | Path = "checkpoints") -> None:
        self.config = config or {}
        self.dirpath = Path(dirpath)

    @staticmethod
    def run_id(trainer: pl.Trainer) -> Optional[str]:
        for logger in wandb_loggers(trainer):
            run_id = getattr(logger.experiment, "id", None)
            if run_id:
                return str(run_id)
        return None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in wandb_loggers(trainer):
            logger.experiment.config.update(self.config, allow_val_change=True)
        run_id = self.run_id(trainer)
        if run_id:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / ID_FILE).write_text(run_id + "\n")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            run_id = self.run_id(trainer)
            if run_id:
                checkpoint[ID_KEY] = run_id


def finish(trainer: Optional[pl.Trainer]) -> None:
    """End the W&B run of the trainer's WandbLoggers, if one was started (exit code 1 when
    an exception is propagating), so the next run in this process starts a new one."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import sys

    import wandb

    failed = sys.exc_info()[0] is not None
    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
    for logger in loggers:
        logger._experiment = None  # a later use starts (or resumes) a run instead of a finished one
