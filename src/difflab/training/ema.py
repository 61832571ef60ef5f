"""EMA of the weights, on top of Lightning's own weight-averaging callback.

Lightning's `EMAWeightAveraging` keeps the averaged copy, swaps it in for validation,
saves it as the checkpoint's `state_dict` (raw weights under `current_model_state`) and
restores both on resume. We add two things a diffusion run wants:
- a warm-up of the decay, min(decay, (1 + n) / (10 + n)) after n updates, so the EMA of a
  short run is not dominated by the random initial weights;
- `std`: a power-function EMA instead (EDM2; ``posthoc_ema``): ``beta_t = (1 - 1/t)^(gamma + 1)``
  with gamma set by the relative std, so its length is a fixed fraction of the run however
  long the run is (``decay`` and ``warmup`` are then unused);
- `use_buffers=False`: only parameters are averaged; buffers (the noise schedule) are not.
- only trainable parameters are updated, with one fused lerp over lists built once: frozen
  ones (a latent model's first stage) keep the copy taken at the start, which is their value,
  and the per-step cost of regrouping every tensor (Lightning's AveragedModel path) is gone.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging

from difflab.training.posthoc_ema import power_beta, std_to_gamma


class EMA(WeightAveraging):
    """Exponential moving average of the LightningModule's parameters."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, update_every_n_steps: int = 1,
                 device: Optional[str] = None, std: Optional[float] = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1).")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=self._lerp)
        self.std = std
        self.gamma = None if std is None else std_to_gamma(std)
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps
        # Updates so far, counted on the host so that the decay never waits on a device.
        self._updates = 0
        self._pairs: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._swapped = False  # True during validation: the live module holds the EMA weights

    def current_decay(self) -> float:
        """Decay of the update in progress: n = updates before it (the first one copies)."""
        n = max(self._updates - 1, 0)
        if self.gamma is not None:
            return power_beta(self.gamma, n + 1)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        # ema <- ema + (1 - decay) * (current - ema), one fused op per device/dtype group.
        torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay())

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._pairs, self._buffers = None, []  # a new averaged copy: pair its tensors again
        self._swapped = False

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        super()._swap_models(pl_module)
        self._swapped = not self._swapped

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._swapped and "current_model_state" in checkpoint:
            # Saved mid-validation (a signal stopped it there): the live module holds the EMA and
            # the copy the raw weights, so Lightning's two entries come out the wrong way round
            # and a resumed run would train on from the EMA.
            checkpoint["state_dict"], checkpoint["current_model_state"] = (checkpoint["current_model_state"],
                                                                           checkpoint["state_dict"])

    def on_exception(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._swapped:  # stopped mid-validation: the live module gets its raw weights back
            self._swap_models(pl_module)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step_idx = trainer.global_step - 1  # zero-based, as Lightning's WeightAveraging counts
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    def _update(self, pl_module: pl.LightningModule) -> None:
        average = self._average_model
        assert average is not None
        if self._pairs is None:  # the same tensors every step: Lightning swaps values, not objects
            pairs = [(a.detach(), c.detach()) for a, c in zip(average.module.parameters(), pl_module.parameters())
                     if c.requires_grad]
            self._pairs = ([a for a, _ in pairs], [c for _, c in pairs])
            self._buffers = list(zip(average.module.buffers(), pl_module.buffers()))
        averaged, current = self._pairs
        if self._updates <= 1:  # the first update copies everything, frozen parameters included (host count)
            for a, c in zip(average.module.parameters(), pl_module.parameters()):
                a.detach().copy_(c.detach().to(a.device))
        elif averaged:
            same_device = averaged[0].device == current[0].device
            self._lerp(averaged, current if same_device else [c.to(averaged[0].device) for c in current], None)
        for a, c in self._buffers:  # buffers are copied, never averaged (AveragedModel's use_buffers=False)
            a.detach().copy_(c.detach().to(a.device))
        average.n_averaged += 1

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        update = step_idx is not None and step_idx % self.update_every_n_steps == 0
        self._updates += int(update)
        return update

    def on_train_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        """Keep the live module's raw weights at the end of fit (Lightning would copy the EMA
        in): a checkpoint saved afterwards must still hold raw and EMA weights apart, or a
        resumed run would continue from the EMA. Read the EMA from `ema_module()`."""

    @property
    def averaged_module(self) -> Optional[pl.LightningModule]:
        """The EMA copy of the LightningModule (None before fit set it up).

        Holds the EMA weights except during validation, when Lightning swaps them into the
        live module; callbacks read it from training-epoch or train-end hooks.
        """
        return None if self._average_model is None else self._average_model.module

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updates": self._updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._updates = int(state_dict.get("updates", 0))


def ema_module(trainer: "pl.Trainer", pl_module: pl.LightningModule) -> pl.LightningModule:
    """The module holding the EMA weights if an EMA callback runs, else the live module."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA) and callback.averaged_module is not None:
            return callback.averaged_module
    return pl_module
