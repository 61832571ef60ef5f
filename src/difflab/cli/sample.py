"""difflab-sample: images from a trained run, as a PNG grid and an .npz of samples.

    difflab-sample ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt n=64 sampler=ddim sampler.steps=50
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import track

from difflab.cli import _hydra, schema
from difflab.diffusion.denoiser import Denoiser
from difflab.training.callbacks import save_grid
from difflab.training.checkpoint import CheckpointError, load_network_weights

log = logging.getLogger("difflab.sample")
_hydra.setup()


def load_denoiser(ckpt: str, device: torch.device) -> tuple[Denoiser, torch.nn.Module, dict]:
    """Rebuild the network and schedule a checkpoint was trained with and load its weights."""
    run_config, weights = load_network_weights(ckpt)
    net = instantiate(run_config["model"], _convert_="all")
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{ckpt}: the weights do not fit the network its own config describes "
                              f"({str(error).splitlines()[0]}). The file may be damaged.") from error
    schedule = instantiate(run_config["schedule"])
    net.to(device).eval()
    schedule.to(device)
    return Denoiser(net, schedule, run_config["objective"]["prediction"]), schedule, run_config


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample(cfg: DictConfig) -> dict[str, Path]:
    OmegaConf.to_object(cfg).validate()
    device = pick_device(cfg.device)
    denoiser, schedule, run_config = load_denoiser(cfg.ckpt, device)
    sampler = instantiate(cfg.sampler if cfg.sampler is not None else run_config["sampler"])
    model = run_config["model"]
    shape = (model["in_channels"], model["image_size"], model["image_size"])
    generator = torch.Generator(device).manual_seed(cfg.seed)
    chunks = []
    batches = range(0, cfg.n, cfg.batch_size)
    for start in track(batches, description="sampling", disable=not cfg.progress or len(batches) < 2):
        size = min(cfg.batch_size, cfg.n - start)
        with torch.no_grad():
            chunks.append(sampler.sample(denoiser, schedule, (size, *shape), generator=generator,
                                         progress=cfg.progress and len(batches) == 1).cpu())
    images = torch.cat(chunks)
    out = Path(cfg.paths.output_dir)
    nrow = cfg.nrow or max(1, round(math.sqrt(cfg.n)))
    grid_path, npz_path = out / "samples.png", out / "samples.npz"
    save_grid(images, grid_path, nrow=nrow)
    uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(npz_path, images=uint8)
    log.info("wrote %s and %s", grid_path, npz_path)
    print(f"grid: {grid_path}\nsamples: {npz_path} ({len(uint8)} images, uint8 NHWC)")
    return {"grid": grid_path, "npz": npz_path}


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        sample(cfg)
    except (schema.ConfigError, CheckpointError, FileNotFoundError) as error:
        log.error("%s", error)
        sys.exit(f"difflab-sample: {error}")


if __name__ == "__main__":
    main()
