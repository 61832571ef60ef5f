"""The LightningModule of the first stage: a KL autoencoder, optionally adversarial.

The loss is latent-diffusion's (Rombach et al. 2022, appendix G) without its perceptual term,
which needs downloaded LPIPS weights:

    L = sum_pixels |x - D(z)| (or squared) + kl_weight * KL(q(z|x) || N(0, I))
        + lambda * disc_weight * L_G          (from step disc_start on)

with both sums per image, averaged over the batch, and reported per pixel. ``L_G = -d(D(z))``
is the hinge generator loss of a patch discriminator ``d``, and ``lambda`` the adaptive
weight of VQGAN (Esser et al. 2021, eq. 7): the ratio of the gradient norms of the
reconstruction and the generator losses at the decoder's last layer, so that neither
swamps the other. The discriminator learns from the hinge loss
``0.5 (relu(1 - d(x)) + relu(1 + d(D(z))))``.

Optimisation is manual (Lightning 2) but takes one optimizer step per batch: the
autoencoder and the discriminator are two parameter groups of one AdamW, and each group
receives only its own loss's gradients. So ``global_step`` counts batches, as in every
other difflab run, and the precision plugin (bf16 or fp16 with its scaler) sees one step.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from difflab.metrics.restoration import psnr
from difflab.models.autoencoder import AutoencoderKL
from difflab.training.lr import LRShape

REC_LOSSES = ("l1", "l2")


class AutoencoderModule(pl.LightningModule):
    """AutoencoderKL (+ optional PatchDiscriminator) trained on images in [-1, 1].

    Args:
        net: the autoencoder.
        discriminator: a patch discriminator, or None for no adversarial loss.
        rec_loss: ``l1`` or ``l2`` reconstruction error.
        kl_weight: weight of the KL term (LDM: 1e-6; 1e-6..1e-4 keeps latents near N(0, I)).
        disc_start: optimizer step from which the adversarial losses are on.
        disc_weight: scale of the adaptively weighted generator loss.
        lr, betas, weight_decay, warmup_steps, lr_schedule, min_lr_ratio: AdamW and its
            learning-rate shape (``difflab.training.lr``), for both parameter groups.
        grad_clip: clip the global gradient norm of each step (None: no clipping).
        channels_last: run the networks and batches in channels_last.
        run_config: the resolved run configuration, stored in checkpoints.
    """

    def __init__(self, net: AutoencoderKL, discriminator: Optional[nn.Module] = None, *, rec_loss: str = "l1",
                 kl_weight: float = 1e-6, disc_start: int = 0, disc_weight: float = 0.5, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.5, 0.9), weight_decay: float = 0.0, warmup_steps: int = 0,
                 lr_schedule: str = "cosine", min_lr_ratio: float = 0.1, grad_clip: Optional[float] = 1.0,
                 channels_last: bool = False, run_config: Optional[dict] = None) -> None:
        super().__init__()
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss={rec_loss!r} is not one of {', '.join(REC_LOSSES)}")
        if kl_weight < 0 or disc_weight < 0 or disc_start < 0:
            raise ValueError("kl_weight, disc_weight and disc_start must be >= 0")
        self.save_hyperparameters(ignore=["net", "discriminator"])
        self.automatic_optimization = False
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=memory_format)
        self.discriminator = None if discriminator is None else discriminator.to(memory_format=memory_format)

    # -- losses -----------------------------------------------------------------------
    def reconstruction_error(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Per image, summed over pixels: [B]."""
        diff = recon.float() - images.float()
        error = diff.abs() if self.hparams.rec_loss == "l1" else diff.square()
        return error.flatten(1).sum(dim=1)

    def adversarial_on(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.disc_start

    def adaptive_weight(self, rec: torch.Tensor, generator_loss: torch.Tensor) -> torch.Tensor:
        """VQGAN eq. 7: ||grad rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer."""
        last = self.net.decoder.last_layer
        rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
        gen_grad = torch.autograd.grad(generator_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def _images(self, batch: Any) -> torch.Tensor:
        images = batch[0]
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        optimizer = self.optimizers()
        images = self._images(batch)
        pixels = images[0].numel()
        recon, posterior = self.net(images)
        rec = self.reconstruction_error(recon, images).mean() / pixels
        kl = posterior.kl().mean() / pixels
        loss = rec + hp.kl_weight * kl
        logs = {"train/rec": rec, "train/kl": kl}
        adversarial = self.adversarial_on()
        if adversarial:
            generator_loss = -self.discriminator(recon).float().mean()
            weight = self.adaptive_weight(rec, generator_loss) * hp.disc_weight
            loss = loss + weight * generator_loss
            logs.update({"train/g_loss": generator_loss, "train/disc_weight": weight})
        self.manual_backward(loss)
        if adversarial:
            # The generator loss also reached the discriminator; it learns only from its own loss.
            for parameter in self.discriminator.parameters():
                parameter.grad = None
            real = self.discriminator(images).float()
            fake = self.discriminator(recon.detach()).float()
            disc_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
            self.manual_backward(disc_loss)
            logs["train/d_loss"] = disc_loss
        if hp.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(images))
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = self._images(batch)
        posterior = self.net.encode(images)
        recon = self.net.decode(posterior.mean)
        pixels = images[0].numel()
        rec = self.reconstruction_error(recon, images).mean() / pixels
        kl = posterior.kl().mean() / pixels
        size = len(images)
        self.log("val/loss", rec + self.hparams.kl_weight * kl, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/rec", rec, sync_dist=True, batch_size=size)
        self.log("val/kl", kl, sync_dist=True, batch_size=size)
        self.log("val/psnr", psnr(recon.float().clamp(-1, 1), images.float()), sync_dist=True, batch_size=size)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = [{"params": list(self.net.parameters())}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters())})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRShape(
            total, warmup_steps=hp.warmup_steps, lr_schedule=hp.lr_schedule, min_lr_ratio=hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- use ----------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of `images` (eval mode), clamped to [-1, 1]."""
        was_training = self.net.training
        self.net.eval()
        try:
            return self.net.decode(self.net.encode(images.to(self.device)).mean).float().clamp(-1, 1)
        finally:
            self.net.train(was_training)


class ReconstructionProbe(nn.Module):
    """The autoencoder as the precision probe times a network: ``forward(x, t) -> x_hat``."""

    def __init__(self, net: AutoencoderKL) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: Any = None, cond: Any = None) -> torch.Tensor:
        return self.net(x)[0]
