"""Consistency tuning (ECT) as a training run: a trained model's weights, ECT's loss.

    difflab-train experiment=mnist5k_ect init_from=outputs/train/runs/<run>/checkpoints/ema.pt

The run starts from ``init_from``'s weights (the EMA weights of a difflab-train run) and trains
them with ``difflab.diffusion.consistency.ConsistencyTuning``; everything else (EMA, checkpoints,
grids, FID, resume) is a diffusion run's. Validation keeps the denoising loss, so val/loss shows
how far tuning moved the model from the diffusion model it started as.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from difflab.diffusion.consistency import ConsistencyTuning
from difflab.diffusion.denoiser import Denoiser
from difflab.training.checkpoint import CheckpointError, method_differences, read_checkpoint
from difflab.training.module import DiffusionModule

log = logging.getLogger("difflab.consistency")


class ConsistencyModule(DiffusionModule):
    """A ``DiffusionModule`` whose training loss is ``tuning``'s; the stage follows the step."""

    def __init__(self, *args: Any, tuning: ConsistencyTuning, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The tuning object is rebuilt from run_config["consistency"]; kept out of the hyperparameters,
        # a checkpoint holds only tensors and plain values and loads with weights_only=True.
        for hparams in (self.hparams, getattr(self, "_hparams_initial", {})):
            hparams.pop("tuning", None)
        self.tuning = tuning

    def current_stage(self) -> int:
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        return self.tuning.stage(self.global_step, total)

    def loss(self, images: torch.Tensor, cond: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, train: bool = False) -> torch.Tensor:
        if not train:  # validation: the plain denoising loss (see the module doc)
            return super().loss(images, cond, generator, train)
        denoiser = Denoiser(self.training_net, self.schedule, self.hparams.prediction, clip_range=None)
        stage = self.current_stage()
        if self._trainer is not None:
            self.log("train/stage", float(stage), on_step=True, on_epoch=False)
        return self.tuning.loss(denoiser, images, stage, cond, generator)


def load_initial_weights(path: str | Path, net: torch.nn.Module, run_config: dict[str, Any]) -> None:
    """``init_from``: load ``path``'s network weights (EMA for a last.ckpt or an ema.pt) into ``net``,
    after checking that it is the same network on the same path with the same output as
    ``run_config`` (a tuned model samples on its schedule and objective)."""
    saved, weights, first_stage = read_checkpoint(path)
    found = method_differences(saved, run_config, ("schedule", "objective"))
    if first_stage or (saved.get("first_stage") or {}).get("kind", "identity") != "identity":
        found.append("first_stage: the checkpoint is a latent model; init_from takes pixel-space models")
    if found:
        named = (f"schedule={(saved.get('schedule') or {}).get('kind')} "
                 f"objective={(saved.get('objective') or {}).get('prediction')}")
        raise CheckpointError(f"init_from={path} does not fit this run: it was trained with another config:\n  "
                              + "\n  ".join(found)
                              + f"\nStart from it with that run's model, schedule and objective ({named}; see its "
                              "config.yaml).")
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"init_from={path}: its weights do not fit this network "
                              f"({str(error).splitlines()[0]})") from error
    log.info("starting from the weights of %s", path)

