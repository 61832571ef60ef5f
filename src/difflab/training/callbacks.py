"""Callbacks: sample grids from the EMA weights, and an EMA-weights export for sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid, save_image

from difflab.metrics.report import replacing
from difflab.training.ema import ema_module

EMA_FORMAT = "difflab.ema/1"


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to [0, 1] (clamped), float32 on the CPU."""
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> torch.Tensor:
    """Save [-1, 1] images as one PNG grid; return the grid tensor [C, H, W] in [0, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(to_unit(images), nrow=nrow, padding=2, pad_value=1.0)
    save_image(grid, path)
    return grid


def log_image(trainer: "pl.Trainer", key: str, grid: torch.Tensor) -> None:
    """Send a [C, H, W] image in [0, 1] to every logger that takes images."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(logger, "log_image"):  # WandbLogger (and others with the same API)
            logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=trainer.global_step)
        elif hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image(key, grid, global_step=trainer.global_step)


class EveryNEpochs(Callback):
    """Base for work done every `every_n_epochs` epochs and once more at the end of fit if
    the last epoch-end did not already do it (max_time, max_steps, a non-multiple epoch
    count). Subclasses implement `run(trainer, pl_module, tag)`, tag being `epoch_XXXX`
    (the epoch just finished, from 0) or `final`; never twice for the same step."""

    def __init__(self, every_n_epochs: int) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"{type(self).__name__} every_n_epochs={every_n_epochs} must be >= 1.")
        self.every_n_epochs = every_n_epochs
        self._done_step: Optional[int] = None

    def run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        raise NotImplementedError

    def _maybe_run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        if trainer.sanity_checking or trainer.global_step == 0 or self._done_step == trainer.global_step:
            return
        self._done_step = trainer.global_step
        self.run(trainer, pl_module, tag)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._maybe_run(trainer, pl_module, f"epoch_{trainer.current_epoch:04d}")

    def on_train_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._maybe_run(trainer, pl_module, "final")


class SampleGrid(EveryNEpochs):
    """Sample a grid with the EMA weights from the same fixed noise (seeded generator) every
    `every_n_epochs` epochs, save it as `<dirpath>/epoch_XXXX.png` (or `final.png`, see
    `EveryNEpochs`) and send it to the loggers. Conditional networks get one class per row."""

    def __init__(self, every_n_epochs: int = 10, num_samples: int = 64, nrow: int = 8, seed: int = 1234,
                 dirpath: str = "samples") -> None:
        super().__init__(every_n_epochs)
        if num_samples < 1 or nrow < 1:
            raise ValueError("SampleGrid needs num_samples and nrow >= 1.")
        self.num_samples = num_samples
        self.nrow = nrow
        self.seed = seed
        self.dirpath = Path(dirpath)
        self.paths: list[Path] = []

    def labels(self, module: pl.LightningModule) -> Optional[torch.Tensor]:
        """For a class-conditional network, one class per grid row (0, 1, ..., wrapping)."""
        num_classes = getattr(module, "label_classes", None)
        if num_classes is None:
            return None
        return (torch.arange(self.num_samples, device=module.device) // self.nrow) % num_classes

    def restoration_grid(self, trainer: "pl.Trainer", module: pl.LightningModule, generator: torch.Generator,
                         path: Path) -> torch.Tensor:
        """A trained restoration model: rows of held-out images, seen | restored | truth."""
        split = "val" if len(trainer.datamodule.split("val").images) else "train"
        truth = trainer.datamodule.split(split).images[: max(1, self.num_samples // 3)].to(module.device)
        cond = module.task.inputs(truth, torch.Generator().manual_seed(self.seed))
        restored = module.sample(len(truth), generator=generator, cond=cond)
        seen = module.task.seen(cond)
        return save_grid(torch.stack([seen, restored, truth], dim=1).flatten(0, 1), path, nrow=3)

    def run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        module = ema_module(trainer, pl_module)
        generator = torch.Generator(module.device).manual_seed(self.seed)
        path = self.dirpath / f"{tag}.png"
        if getattr(getattr(module, "task", None), "kind", None) in ("superres", "inpaint"):
            grid = self.restoration_grid(trainer, module, generator, path)
        else:
            images = module.sample(self.num_samples, generator=generator, cond=self.labels(module))
            grid = save_grid(images, path, nrow=self.nrow)
        self.paths.append(path)
        log_image(trainer, "samples", grid)


def ema_payload(module: pl.LightningModule, trainer: Optional["pl.Trainer"] = None) -> dict[str, Any]:
    """What `ema.pt` holds: the network's EMA weights and the run config that rebuilds it
    (and, for a latent model, the frozen first stage with its scale factor)."""
    payload = {
        "format": EMA_FORMAT,
        "run_config": dict(module.hparams.get("run_config") or {}),
        "state_dict": {k: v.detach().cpu() for k, v in module.net.state_dict().items()},
        "epoch": trainer.current_epoch if trainer else None,
        "global_step": trainer.global_step if trainer else None,
    }
    first_stage = getattr(module, "first_stage", None)
    if first_stage is not None:
        payload["first_stage"] = {k: v.detach().cpu() for k, v in first_stage.state_dict().items()}
    return payload


class ExportEMA(EveryNEpochs):
    """Write the EMA network weights (and the config that rebuilds the network) to `path`
    every `every_n_epochs` epochs and at the end of training; rank 0 only; atomic rename,
    so an interrupted write never leaves a broken file."""

    def __init__(self, path: str = "checkpoints/ema.pt", every_n_epochs: int = 10) -> None:
        super().__init__(every_n_epochs)
        self.path = Path(path)

    def payload(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> dict[str, Any]:
        return ema_payload(ema_module(trainer, pl_module), trainer)

    def run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        with replacing(self.path, " with resume=auto") as tmp:
            torch.save(self.payload(trainer, pl_module), tmp)


def interruption(exception: BaseException) -> Optional[str]:
    """"SIGTERM" or "SIGINT" if ``exception`` is how Lightning reports that signal, else None."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(exception, SIGTERMException):
        return "SIGTERM"
    if isinstance(exception, KeyboardInterrupt):
        return "SIGINT"
    return None


class LastCheckpoint(EveryNEpochs):
    """Keep `<dirpath>/last.ckpt` current: every `every_n_epochs` epochs and at the end of
    fit, whatever ended it (max_epochs, max_steps, max_time).

    Lightning's ModelCheckpoint refreshes `last` only together with a top-k save, so a
    run stopped by `max_time` kept a checkpoint several epochs old. The file is written
    beside the old one and renamed over it, so an interrupted save never loses the last
    good checkpoint. It holds everything a resume needs (weights, EMA, optimizer, loops,
    RNG states).
    """

    def __init__(self, dirpath: str = "checkpoints", every_n_epochs: int = 5) -> None:
        super().__init__(every_n_epochs)
        self.dirpath = Path(dirpath)
        self.interrupted: Optional[str] = None  # "SIGTERM" / "SIGINT" once a signal stopped the run
        self._held = False  # a SIGTERM that came during validation, held until it ends

    @property
    def path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_validation_batch_end(self, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> None:
        """A SIGTERM during validation lets the validation finish, and the run stops at the step
        boundary after it: Lightning would stop after this batch, and a resumed run skips the
        rest of that validation (its val/loss was never logged). Validation is seconds next to
        a cluster's grace period."""
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):
            connector.received_sigterm, self._held = False, True

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if self._held:
            trainer._signal_connector.received_sigterm, self._held = True, False

    def on_exception(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, exception: BaseException) -> None:
        """SIGTERM (preemption) or SIGINT (Ctrl-C): Lightning stops at the next step boundary; the
        state there is written as last.ckpt (atomically), so a resume goes on from that step."""
        kind = interruption(exception)
        if kind is None:
            return
        self.interrupted = kind
        if trainer.global_step > 0:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            self.run(trainer, pl_module, "interrupted")

    def run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        with replacing(self.path, " with resume=auto", rename=trainer.is_global_zero) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # full state; all ranks join, rank 0 writes
        trainer.strategy.barrier("difflab_last_checkpoint")
