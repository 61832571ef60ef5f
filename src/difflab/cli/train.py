"""difflab-train: compose the config with Hydra, build every piece, fit with Lightning.

    difflab-train                                   # the default experiment (mnist5k)
    difflab-train schedule=cosine sampler=ddim trainer.max_epochs=3
    difflab-train experiment=digits_tiny
    python -m difflab.cli.train -m schedule=linear,cosine,sigmoid
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from difflab.cli import _ddp, _hydra, schema
from difflab.cli.collect import RESULT_FILE  # every run's outcome, read from each multirun job
from difflab.data import DatasetUnavailableError
from difflab.metrics import report
from difflab.training.checkpoint import CheckpointError, check_resume_compatible
from difflab.training import tracking
from difflab.training.module import DiffusionModule

log = logging.getLogger("difflab.train")
_hydra.setup()


def _instantiate_all(nodes: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` node of a dict-valued group; null entries switch one off.

    An entry left without `_target_` is a callback switched off (e.g. by `debug=fast`) whose
    knobs an experiment still sets: skipped, with a warning naming it.
    """
    built = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            log.warning("skipping %s: it only sets %s and has no _target_ (switched off by another "
                        "config group?)", name, ", ".join(map(str, node.keys())))
            continue
        built.append(instantiate(node))
    return built


def build(cfg: DictConfig) -> tuple[DiffusionModule, pl.LightningDataModule, pl.Trainer]:
    """Everything a run needs, from a composed config; nothing is trained here."""
    schema.validate(cfg)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    tracking.prepare_resume(cfg)  # a resumed run continues its W&B run

    datamodule = instantiate(cfg.data)
    # The network's input shape comes from the data unless the config pins it.
    OmegaConf.update(cfg, "model.in_channels", cfg.model.in_channels or datamodule.channels)
    OmegaConf.update(cfg, "model.image_size", cfg.model.image_size or datamodule.image_size)
    net = instantiate(cfg.model, _convert_="all")
    module = DiffusionModule(
        net, instantiate(cfg.schedule), instantiate(cfg.sampler),
        **_hydra.plain(cfg.objective), **_hydra.plain(cfg.optim), channels_last=cfg.channels_last, compile=cfg.compile,
        p_uncond=cfg.p_uncond, guidance_scale=cfg.guidance.scale,
        run_config=_hydra.plain(cfg),
    )
    if HydraConfig.initialized():
        _ddp.install()  # processes Lightning starts for DDP rerun this job, not the command line
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.callbacks) + tracking.callbacks(cfg),
                          logger=_instantiate_all(cfg.logger) or False)
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the composed experiment; return the final logged metrics (for sweepers)."""
    module, datamodule, trainer = build(cfg)
    try:
        output_dir = cfg.paths.output_dir
        OmegaConf.save(cfg, f"{output_dir}/config.yaml", resolve=True)
        log.info("run directory: %s", output_dir)
        if cfg.ckpt_path:
            check_resume_compatible(cfg.ckpt_path, module.hparams.run_config)
        if cfg.train:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    finally:
        tracking.finish(trainer)  # one W&B run per job, also in a multirun's single process


@rank_zero_only
def write_result(output_dir: str, status: str, seconds: float, metrics: dict[str, float],
                 error: Optional[str] = None) -> None:
    """`<run>/result.json`: status (ok | failed | interrupted), the error, the final logged
    metrics, the command-line overrides and the wall time. Written atomically by rank 0."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"status": status, "error": error, "seconds": round(seconds, 1), "overrides": overrides,
              "metrics": metrics}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    report.write_text(Path(output_dir) / RESULT_FILE, json.dumps(record, indent=2, allow_nan=True) + "\n")


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return `optimized_metric` from the run's final metrics (what a sweeper optimises)."""
    start = time.perf_counter()
    output_dir = cfg.paths.output_dir
    try:
        with _ddp.job_scope():  # the next job of a multirun starts from a clean DDP state
            metrics = train(cfg)
    except BaseException as error:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        write_result(output_dir, status, time.perf_counter() - start, {}, f"{type(error).__name__}: {error}")
        if not isinstance(error, (schema.ConfigError, DatasetUnavailableError, CheckpointError, FileNotFoundError)):
            raise
        log.error("%s", error)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job failed, runs the others, and reports it at the end
        sys.exit(f"difflab-train: {error}")
    write_result(output_dir, "ok", time.perf_counter() - start, metrics)
    name = cfg.get("optimized_metric")
    if not name or not cfg.train:  # train=false only builds: there is nothing to report
        return None
    if name not in metrics:
        message = (f"optimized_metric={name!r} was not logged by this run; available metrics: "
                   f"{', '.join(sorted(metrics)) or '(none)'}")
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            log.warning("%s", message)  # a single run has nothing to optimise: its outputs stand
            return None
        # A sweep must not silently optimise None: stop and say what the run did log.
        log.error("%s", message)
        sys.exit(f"difflab-train: {message}")
    return float(metrics[name])


if __name__ == "__main__":
    main()
