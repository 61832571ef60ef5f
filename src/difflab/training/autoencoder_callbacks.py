"""Callbacks of an autoencoder run: reconstruction grids, reconstruction metrics on the
held-out images, and the `autoencoder.pt` export that a latent diffusion run loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from difflab.metrics.domain import DomainClassifierConfig
from difflab.metrics.evaluate import SampleEvaluator
from difflab.metrics.restoration import psnr, ssim
from difflab.models.autoencoder import AUTOENCODER_FORMAT
from difflab.training.callbacks import EveryNEpochs, ExportEMA, log_image, save_grid

log = logging.getLogger("difflab.train")


def _held_out(trainer: "pl.Trainer") -> Any:
    """The validation split, or the training split when the run has none."""
    datamodule = trainer.datamodule
    return datamodule.split("val") if len(datamodule.split("val").images) else datamodule.split("train")


def autoencoder_payload(module: pl.LightningModule, trainer: Optional["pl.Trainer"] = None) -> dict[str, Any]:
    """What `autoencoder.pt` holds: the weights, the constructor arguments that rebuild the
    network, the data it was trained on, and the run config."""
    run_config = dict(module.hparams.get("run_config") or {})
    data = run_config.get("data") or {}
    return {
        "format": AUTOENCODER_FORMAT,
        "config": module.net.config(),
        "state_dict": {k: v.detach().cpu() for k, v in module.net.state_dict().items()},
        "data": {"name": data.get("name"), "path": data.get("path"), "image_size": module.net.image_size,
                 "channels": module.net.in_channels},
        "run_config": run_config,
        "global_step": trainer.global_step if trainer else None,
    }


class ExportAutoencoder(ExportEMA):
    """Write `autoencoder.pt` (atomically, rank 0) every `every_n_epochs` and at the end."""

    def __init__(self, path: str = "checkpoints/autoencoder.pt", every_n_epochs: int = 5) -> None:
        super().__init__(path, every_n_epochs)

    def payload(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> dict[str, Any]:
        return autoencoder_payload(pl_module, trainer)


class ReconstructionGrid(EveryNEpochs):
    """Held-out images and their reconstructions (posterior mean) as pairs of rows:
    `<dirpath>/recon_epoch_XXXX.png` (or `recon_final.png`)."""

    def __init__(self, every_n_epochs: int = 5, num_images: int = 32, nrow: int = 8,
                 dirpath: str = "samples") -> None:
        super().__init__(every_n_epochs)
        if num_images < 1 or nrow < 1:
            raise ValueError("ReconstructionGrid needs num_images and nrow >= 1.")
        self.num_images, self.nrow, self.dirpath = num_images, nrow, Path(dirpath)
        self.paths: list[Path] = []

    def run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        images = _held_out(trainer).images[: self.num_images]
        recon = pl_module.reconstruct(images).cpu()
        rows = [part for start in range(0, len(images), self.nrow)
                for part in (images[start:start + self.nrow], recon[start:start + self.nrow])]
        path = self.dirpath / f"recon_{tag}.png"
        grid = save_grid(torch.cat(rows), path, nrow=self.nrow)
        self.paths.append(path)
        log_image(trainer, "reconstructions", grid)


class ReconstructionMetrics(EveryNEpochs):
    """Scores the reconstructions of every held-out image at the end of training (and every
    `every_n_epochs`): `eval/psnr`, `eval/ssim`, `eval/class_accuracy` (the offline domain
    classifier gives the reconstruction the image's label), `eval/fid` (domain FID of the
    reconstructions against the training images) and `eval/fid_real`, the same FID for the
    held-out images themselves: the floor at this n."""

    def __init__(self, every_n_epochs: int = 1000, cache_dir: str = ".cache",
                 domain_steps: int = DomainClassifierConfig.steps, prefix: str = "eval/") -> None:
        super().__init__(every_n_epochs)
        self.cache_dir, self.prefix = cache_dir, prefix
        self.domain = DomainClassifierConfig(steps=domain_steps)
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        held_out = _held_out(trainer)
        images, labels = held_out.images, held_out.labels
        recon = torch.cat([pl_module.reconstruct(images[i:i + 250]).cpu() for i in range(0, len(images), 250)])
        evaluator = SampleEvaluator(trainer.datamodule, "domain", self.cache_dir, domain=self.domain)
        scores = evaluator.score(evaluator.features(recon), labels)
        real = evaluator.score(evaluator.features(images))
        metrics = {"psnr": psnr(recon, images), "ssim": ssim(recon, images), "fid": scores["fid"],
                   "class_accuracy": scores["class_accuracy"], "fid_real": real["fid"]}
        metrics = {f"{self.prefix}{name}": float(value) for name, value in metrics.items()}
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"tag": tag, "step": trainer.global_step, **metrics})
        log.info("%s reconstructions of %d held-out images: %s", tag, len(images),
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
