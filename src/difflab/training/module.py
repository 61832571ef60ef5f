"""The LightningModule: a network, a noise schedule, a loss and a sampler for grids.

The module owns no diffusion math: the loss is `difflab.diffusion.losses.diffusion_loss`
and sampling is `Denoiser` + a sampler from `difflab.diffusion.samplers`. The schedule is
a submodule whose tensors are non-persistent buffers: they follow the device, are never
trained, never saved and never averaged by the EMA.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.density import Density, Uniform
from difflab.diffusion.parameterization import check_output
from difflab.diffusion.weighting import Simplified, Weighting
from difflab.diffusion.guidance import ClassifierFreeGuidance, drop_labels
from difflab.diffusion.losses import diffusion_loss
from difflab.diffusion.schedule import NoiseSchedule
from difflab.training.epoch_mean import EpochMean
from difflab.training.lr import LRShape
from difflab.training.nonfinite import NonFiniteGuard


class DiffusionModule(pl.LightningModule):
    """U-Net + schedule + objective; AdamW with linear warm-up and optional cosine decay.

    Args:
        net: a network `net(x, t, cond) -> prediction` (e.g. `difflab.models.UNet`).
        schedule: the forward-process noise schedule.
        sampler: the sampler used for sample grids (any `difflab.diffusion.samplers.Sampler`).
        prediction: what the network is trained to output: "eps", "x0", "v", "velocity" (the
            flow path) or "edm" (EDM's preconditioning); see difflab.diffusion.parameterization.
        weighting: the loss weight (a `difflab.diffusion.weighting.Weighting`; None: the
            simplified loss). A learned one (EDM2's uncertainty) is a submodule, trained too.
        density: the training noise-level density (a `difflab.diffusion.density.Density`;
            None: uniform). Validation always draws uniform levels with the simplified loss,
            so val/loss compares across densities and weightings.
        p_uncond: for a class-conditional network, the probability that a training label is
            replaced by the null class (condition dropout for classifier-free guidance).
        guidance_scale: classifier-free guidance scale used by `sample` when labels are
            given (None: no guidance, i.e. the plain conditional prediction).
        task: a restoration task (``difflab.training.tasks``) that builds the condition dict of
            each batch from its clean images (SR3, Palette); the network needs a conditioner.
        first_stage: a frozen ``LatentSpace`` (latent diffusion): batches are encoded (or read
            from the latent cache) before the loss, and samples are decoded. None: pixel space.
        latents_cached: the loaders serve the first stage's cached moments, not images.
        nonfinite: what a NaN or infinite training loss does: "stop" (before the update, naming the
            step and the last finite loss) or "skip" (that update); see difflab.training.nonfinite.
        run_config: the resolved run configuration, stored in checkpoints so that the
            network, schedule and sampler can be rebuilt from the checkpoint alone.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, sampler: Any, *, prediction: str = "eps",
                 weighting: Optional[Weighting] = None, density: Optional[Density] = None, lr: float = 1e-3,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 lr_schedule: str = "constant", min_lr_ratio: float = 0.1, channels_last: bool = True,
                 compile: bool = False, p_uncond: float = 0.1, guidance_scale: Optional[float] = None,
                 task: Any = None, first_stage: Optional[nn.Module] = None, latents_cached: bool = False,
                 nonfinite: str = "stop", run_config: Optional[dict] = None) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond={p_uncond} must be in [0, 1).")
        check_output(schedule, prediction)
        self.save_hyperparameters(ignore=["net", "schedule", "sampler", "task", "first_stage", "weighting",
                                          "density"])
        self.weighting = weighting if weighting is not None else Simplified()
        self.density = density if density is not None else Uniform()
        self.first_stage = first_stage
        if task is not None and getattr(net, "conditioner", None) is None:
            raise ValueError(f"task {task!r} builds conditions, but the network has no conditioner to read them: "
                             "set model.conditioner (see experiment=mnist5k_sr3 / mnist5k_palette)")
        self.task = task
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.schedule = schedule
        self.sampler = sampler
        self._compiled_net: Optional[nn.Module] = None
        self._rng_to_restore: Optional[dict[str, Any]] = None  # a checkpoint's RNG states, set at on_train_start
        self.epoch_loss = EpochMean()  # train/loss_epoch, resumable mid-epoch
        self.nonfinite = NonFiniteGuard(nonfinite)

    # -- training ---------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return getattr(self.net, "num_classes", None) is not None

    @property
    def label_classes(self) -> Optional[int]:
        """How many labels `sample(cond=labels)` takes: the network's classes, or a text task's
        (whose labels become captions), else None."""
        return getattr(self.net, "num_classes", None) or getattr(self.task, "num_classes", None)

    def _batch(self, batch: Any, train: bool = False, generator: Optional[torch.Generator] = None
               ) -> tuple[torch.Tensor, Any]:
        images, labels = batch
        if self.first_stage is not None:  # latent diffusion: the model's "images" are latents
            if self.hparams.latents_cached:  # cached moments: a fresh posterior sample per step
                images = self.first_stage.sample(images, generator) if train else images.chunk(2, dim=1)[0]
            else:
                images = self.first_stage.encode(images, generator) if train else \
                    self.first_stage.moments(images).chunk(2, dim=1)[0]
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.task is not None:  # conditions from the clean images (dropout is the conditioner's)
            return images, self.task.inputs(images, generator, labels=labels)
        if not self.conditional:
            return images, None
        if train:  # condition dropout teaches the same network the unconditional prediction
            labels = drop_labels(labels, self.net.num_classes, self.hparams.p_uncond)
        return images, labels

    def on_fit_start(self) -> None:
        # Compiled after the EMA callback copied the module, so the copy stays a plain module;
        # kept outside the module tree so state_dict keys do not change.
        if self.hparams.compile and self._compiled_net is None:
            object.__setattr__(self, "_compiled_net", torch.compile(self.net))

    def on_train_start(self) -> None:
        # Under DDP every rank ran `seed_everything(cfg.seed)` (and, on resume, restored rank 0's
        # RNG state from the checkpoint), so all ranks would draw the same timesteps and noise in
        # `diffusion_loss`: N processes doing the work of one for the randomness of the loss.
        # Ranks > 0 move to their own stream here. This hook runs after every checkpoint restore
        # (on_fit_start can precede it for some strategies) and just before the first step, so
        # the restored states are set here too, and rank 0 keeps its stream: a single-process
        # run resumes bit-exactly.
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        if self.trainer.global_rank > 0:
            _reseed_for_rank(self.trainer.global_rank)

    @property
    def training_net(self) -> nn.Module:
        """The network a loss calls: the compiled one while training with `compile`, else `net`."""
        return self._compiled_net if (self._compiled_net is not None and self.training) else self.net

    def loss(self, images: torch.Tensor, cond: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, train: bool = False) -> torch.Tensor:
        net = self.training_net
        # Validation: diffusion_loss's defaults (simplified loss, uniform levels), comparable across recipes.
        weighting, density = (self.weighting, self.density) if train else (None, None)
        return diffusion_loss(self.schedule, net, images, objective=self.hparams.prediction, cond=cond,
                              generator=generator, weighting=weighting, density=density)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, cond = self._batch(batch, train=True)
        loss = self.nonfinite.check(self.loss(images, cond, train=True), self.global_step)
        if loss is None:  # nonfinite=skip: no backward, no optimizer step for this batch
            return None
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self.epoch_loss.add(loss, images.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        self.epoch_loss.reset()  # not called when a run resumes mid-epoch: the restored sum goes on

    def on_train_epoch_end(self) -> None:
        mean = self.epoch_loss.mean()
        if mean is not None:
            self.log("train/loss_epoch", mean, prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, cond = self._batch(batch, generator=torch.Generator().manual_seed(20_000 + batch_idx))
        # The same timesteps and noise every validation, so val losses compare across epochs.
        generator = torch.Generator(self.device).manual_seed(10_000 + batch_idx)
        loss = self.loss(images, cond, generator=generator)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # A learned weighting (EDM2's uncertainty) trains with the network, at the same rate.
        params = [*self.net.parameters(), *self.weighting.parameters()]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRShape(
            total, warmup_steps=hp.warmup_steps, lr_schedule=hp.lr_schedule, min_lr_ratio=hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- sampling ---------------------------------------------------------------------
    def denoiser(self, guidance_scale: Optional[float] = None) -> Denoiser:
        """The network as the prediction samplers ask for, guided when a scale is given."""
        net = self.net
        if guidance_scale is not None:
            net = ClassifierFreeGuidance(self.net, getattr(self.net, "num_classes", None), guidance_scale,
                                         dict_conditions=self.task is not None)
        # Latents have no bounded range: a sampler's clip_denoised does nothing there.
        return Denoiser(net, self.schedule, self.hparams.prediction,
                        clip_range=None if self.first_stage is not None else 1.0)

    @torch.no_grad()
    def sample(self, num_samples: int, *, generator: Optional[torch.Generator] = None,
               cond: Optional[torch.Tensor] = None, sampler: Any = None, image_shape: Optional[tuple] = None,
               return_trajectory: bool = False, progress: bool = False) -> Any:
        """Draw `num_samples` images in [-1, 1] with this module's weights (pass the EMA copy).

        For a conditional network, `cond` holds one label per image (None: unconditional);
        the module's guidance scale applies when labels are given. A latent model samples
        latents of `image_shape` (the network's input) and decodes them; its trajectory, if
        asked for, stays in latent space.
        """
        shape = (num_samples, *(image_shape or self.image_shape))
        if torch.is_tensor(cond) and hasattr(self.task, "conditions_for"):  # labels -> their captions
            cond = self.task.conditions_for(cond)
        scale = self.hparams.guidance_scale if cond is not None else None
        was_training = self.net.training
        self.net.eval()
        try:
            result = (sampler or self.sampler).sample(self.denoiser(scale), self.schedule, shape, cond=cond,
                                                      generator=generator, return_trajectory=return_trajectory,
                                                      progress=progress)
            if self.first_stage is None:
                return result
            if return_trajectory:
                return self.first_stage.decode(result[0]), result[1]
            return self.first_stage.decode(result)
        finally:
            self.net.train(was_training)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The network's input shape (C, H, W): the latent shape for a latent model."""
        model_cfg = (self.hparams.run_config or {}).get("model", {})
        size = model_cfg.get("image_size") or getattr(self.net, "image_size", None)
        channels = model_cfg.get("in_channels") or getattr(self.net, "in_channels", None)
        if size is None or channels is None:
            raise ValueError("image shape unknown: build the net with image_size and in_channels.")
        return (int(channels), int(size), int(size))

    # -- resume: RNG states travel with the checkpoint --------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["difflab_epoch_loss"] = self.epoch_loss.state_dict()
        np_state = np.random.get_state()
        checkpoint["difflab_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": _tuples_to_lists(random.getstate()),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Set at on_train_start, not here: between the restore and the first step Lightning
        # builds the loaders and runs the sanity-check validation, and whatever they draw would
        # shift the resumed run's noise off the interrupted run's.
        self._rng_to_restore = checkpoint.get("difflab_rng") or None
        if "difflab_epoch_loss" in checkpoint:
            self.epoch_loss.load_state_dict(checkpoint["difflab_epoch_loss"])


def _set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_lists_to_tuples(state["python"]))


def _reseed_for_rank(rank: int) -> None:
    """Reseed torch (CPU and CUDA), numpy and python from a hash of the current torch RNG state
    and `rank`: reproducible for a given seed or checkpoint, and different on every rank. A
    resumed rank r > 0 derives its stream from the restored state (the checkpoint, written by
    rank 0, holds only rank 0's), so it does not continue the interrupted run's rank-r stream."""
    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes() + rank.to_bytes(8, "little")).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1  # 63 bits: valid for every torch seed API
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _tuples_to_lists(value: Any) -> Any:
    return [_tuples_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _lists_to_tuples(value: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value
