"""difflab-sample's other modes: DDIM inversion, latent interpolation, the forward process,
and the denoising trajectory as a GIF. Each writes one image file into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import imageio.v3 as iio
import numpy as np
import torch
from hydra.utils import instantiate
from torchvision.utils import make_grid

from difflab.data import real_images
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.interpolation import slerp
from difflab.diffusion.process import q_sample
from difflab.diffusion.samplers import DDIMSampler, Sampler
from difflab.diffusion.samplers.ddim import ddim_invert
from difflab.training.callbacks import save_grid, to_unit


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] as uint8 [N, H, W, C], the layout of every difflab .npz."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def deterministic_ddim(sampler: Sampler) -> DDIMSampler:
    """The DDIM (eta = 0) twin of the chosen sampler: inversion and interpolation need an ODE."""
    if isinstance(sampler, DDIMSampler):
        return DDIMSampler(steps=sampler.steps, eta=0.0, spacing=sampler.spacing,
                           clip_denoised=sampler.clip_denoised)
    return DDIMSampler(steps=50, eta=0.0)


def load_real(run_config: dict[str, Any], n: int) -> torch.Tensor:
    """The first n validation images of the run's own dataset (train split if no val)."""
    datamodule = instantiate(run_config["data"])
    split = "val" if run_config["data"].get("val_fraction", 0) > 0 else "train"
    return real_images(datamodule, n, split=split)


def inversion(denoiser: Denoiser, schedule: torch.nn.Module, sampler: Sampler, run_config: dict,
              n: int, out: Path) -> dict[str, float]:
    """Rows: real image | its DDIM-inverted noise | the reconstruction from that noise."""
    ddim = deterministic_ddim(sampler)
    x0 = load_real(run_config, n).to(schedule.device)
    noise = ddim_invert(denoiser, schedule, x0, ddim.steps, spacing=ddim.spacing)
    recon = ddim.sample(denoiser, schedule, x_T=noise)
    rows = torch.stack([x0, noise.clamp(-1, 1), recon], dim=1).flatten(0, 1)
    save_grid(rows, out / "inversion.png", nrow=3)
    return {"reconstruction_mse": float((recon - x0).pow(2).mean()), "steps": ddim.steps}


def repeat_rows(cond: torch.Tensor | dict | None, rows: int, columns: int,
                device: torch.device | str) -> torch.Tensor | dict | None:
    """The conditions of the first `rows` images (class labels, or a dict of condition tensors
    such as a text model's prompts), each repeated `columns` times, on `device`."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {key: value[:rows].repeat_interleave(columns, dim=0).to(device) if torch.is_tensor(value) else value
                for key, value in cond.items()}
    return cond[:rows].repeat_interleave(columns).to(device)


def interpolation(denoiser: Denoiser, schedule: torch.nn.Module, sampler: Sampler, shape: tuple,
                  rows: int, columns: int, generator: torch.Generator, out: Path,
                  cond: torch.Tensor | dict | None = None,
                  decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> None:
    """Each row: DDIM (eta = 0) samples along a slerp between two noises, under that row's
    condition (class label or prompt) where the model has one."""
    ddim = deterministic_ddim(sampler)
    a = torch.randn((rows, *shape), generator=generator, device=schedule.device)
    b = torch.randn((rows, *shape), generator=generator, device=schedule.device)
    weights = torch.linspace(0, 1, columns)
    latents = torch.stack([slerp(a, b, float(w)) for w in weights], dim=1).flatten(0, 1)
    labels = repeat_rows(cond, rows, columns, schedule.device)
    images = decode(ddim.sample(denoiser, schedule, x_T=latents, cond=labels))
    save_grid(images, out / "interpolation.png", nrow=columns)


def forward_process(schedule: torch.nn.Module, run_config: dict, rows: int, columns: int,
                    generator: torch.Generator, out: Path) -> None:
    """Each row: one real image noised by q(x_t | x_0) at `columns` timesteps from 0 to T-1."""
    x0 = load_real(run_config, rows).to(schedule.device)
    ts = torch.linspace(0, schedule.num_timesteps - 1, columns).round().long().to(schedule.device)
    noise = torch.randn(x0.shape, generator=generator, device=schedule.device)
    frames = [q_sample(schedule, x0, t.repeat(rows), noise) for t in ts]
    save_grid(torch.stack(frames, dim=1).flatten(0, 1), out / "forward.png", nrow=columns)


def trajectory_gif(trajectory: list[torch.Tensor], nrow: int, path: Path, frames: int = 40) -> None:
    """The denoising trajectory (x_t after every step) as an animated GIF of grids."""
    pick = np.unique(np.linspace(0, len(trajectory) - 1, min(frames, len(trajectory))).round().astype(int))
    grids = [make_grid(to_unit(trajectory[i]), nrow=nrow, padding=2, pad_value=1.0) for i in pick]
    arrays = [(g.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for g in grids]
    if arrays[0].shape[-1] == 1:
        arrays = [a[..., 0] for a in arrays]
    iio.imwrite(path, np.stack(arrays), extension=".gif", duration=80, loop=0)
