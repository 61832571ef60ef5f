"""difflab-sample: images from a trained run, as a PNG grid and an .npz of samples.

    difflab-sample ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt n=64 sampler=ddim sampler.steps=50
    difflab-sample ckpt=<conditional run>/checkpoints/ema.pt class_label=7 guidance.scale=3
    difflab-sample mode=inpaint ckpt=... mask=center method=repaint   (see sample_restore)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import track

from difflab.cli import _hydra, prompts, sample_modes, sample_restore, schema
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.guidance import ClassifierFreeGuidance
from difflab.models.conditioning import condition_batch
from difflab.metrics.report import OutputWriteError
from difflab.training.callbacks import save_grid
from difflab.training.checkpoint import CheckpointError, read_checkpoint
from difflab.training.first_stage import is_latent, latent_space_from_checkpoint
from difflab.training.inference_precision import AutocastNetwork, in_sampling_setting, resolve_inference
from difflab.training.tasks import probe_conditions

log = logging.getLogger("difflab.sample")
_hydra.setup()


def build_denoiser(run_config: dict, weights: dict, device: torch.device, guidance_scale: float | None = None,
                   precision: str = "32-true", cache_dir: str | None = None, batch: int = 64
                   ) -> tuple[Denoiser, torch.nn.Module]:
    """Rebuild the network and schedule of a checkpoint (from `load_network_weights`) and
    load its weights; with a guidance scale, wrap the network in classifier-free guidance.
    `precision` is what the network samples in (`auto`: measured once per machine and cached
    under `cache_dir`, see training.inference_precision)."""
    net = instantiate(run_config["model"], _convert_="all")
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError("the checkpoint's weights do not fit the network its own config describes "
                              f"({str(error).splitlines()[0]}). The file may be damaged.") from error
    schedule = instantiate(run_config["schedule"])
    net.to(device).eval()
    schedule.to(device)
    model = run_config["model"]
    shape = (batch, model["in_channels"], model["image_size"], model["image_size"])
    decision = resolve_inference(precision, device, net, shape, cache_dir=cache_dir,
                                 channels_last="auto" if precision == "auto" else False,
                                 cond=probe_conditions(instantiate(run_config["task"]) if run_config.get("task")
                                                       else None, model.get("num_classes"), shape))
    log.info("sampling: %s", decision.summary())
    for warning in decision.warnings:
        log.warning("%s", warning)
    net = AutocastNetwork.wrap(net, decision)
    guided = net if guidance_scale is None else ClassifierFreeGuidance(
        net, model.get("num_classes"), guidance_scale, dict_conditions=bool(run_config.get("task")))
    return Denoiser(guided, schedule, run_config["objective"]["prediction"], clip_range=clip_range(run_config)), \
        schedule


def clip_range(run_config: dict) -> float | None:
    """Images are in [-1, 1]; a latent model's latents have no bounded range (no clipping)."""
    return None if is_latent(run_config) else 1.0


def load_model(path: str, device: torch.device) -> tuple[dict, dict, Callable[[torch.Tensor], torch.Tensor]]:
    """(run_config, network weights, decode) of a diffusion checkpoint; `decode` maps what
    the samplers return to images: the first stage's decoder for a latent model, else the
    identity."""
    run_config, weights, first_stage_state = read_checkpoint(path)
    space = latent_space_from_checkpoint(run_config, first_stage_state)
    if space is None:
        return run_config, weights, lambda x: x
    space.to(device)
    return run_config, weights, space.decode


def class_labels(cfg: DictConfig, num_classes: int | None, nrow: int) -> torch.Tensor | None:
    """`class_label` for every image, else one class per grid row; None if unconditional."""
    if num_classes is None:
        if cfg.class_label is not None:
            raise schema.ConfigError(f"class_label={cfg.class_label} but {cfg.ckpt} is an unconditional "
                                     "model; drop class_label (or train with model.num_classes=N).")
        return None
    if cfg.class_label is not None:
        if not 0 <= cfg.class_label < num_classes:
            raise schema.ConfigError(f"class_label={cfg.class_label} is not allowed: expected an integer "
                                     f"in [0, {num_classes - 1}] for this model.")
        return torch.full((cfg.n,), cfg.class_label, dtype=torch.long)
    return (torch.arange(cfg.n) // nrow) % num_classes


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample(cfg: DictConfig) -> dict[str, Path]:
    OmegaConf.to_object(cfg).validate()
    device = pick_device(cfg.device)
    run_config, weights, decode = load_model(cfg.ckpt, device)
    model = run_config["model"]
    nrow = cfg.nrow or max(1, round(math.sqrt(cfg.n)))
    if is_latent(run_config) and cfg.mode not in ("sample", "interpolate"):
        raise schema.ConfigError(f"mode={cfg.mode} works on pixel-space models; {cfg.ckpt} is a latent model "
                                 "(first_stage=kl): use mode=sample or mode=interpolate.")
    text = prompts.text_task(run_config)
    labels, texts, n, nrow = prompts.prompt_conditions(cfg, text, cfg.ckpt, nrow)
    if text is None:
        labels = class_labels(cfg, model.get("num_classes"), nrow)
    scale = cfg.guidance.scale if cfg.guidance.scale is not None else run_config.get("guidance", {}).get("scale")
    if scale is not None and model.get("num_classes") is None and text is None:
        if cfg.guidance.scale is not None:
            raise schema.ConfigError(f"guidance.scale={scale} needs a class-conditional model; "
                                     f"{cfg.ckpt} is unconditional. Drop guidance.scale.")
        scale = None
    denoiser, schedule = build_denoiser(run_config, weights, device, scale if labels is not None else None,
                                        precision=cfg.precision, cache_dir=cfg.paths.cache_dir,
                                        batch=min(cfg.batch_size, n))
    decode = in_sampling_setting(decode, denoiser.net)
    sampler = instantiate(cfg.sampler if cfg.sampler is not None else run_config["sampler"])
    shape = (model["in_channels"], model["image_size"], model["image_size"])
    generator = torch.Generator(device).manual_seed(cfg.seed)
    out = Path(cfg.paths.output_dir)
    if text is not None and cfg.mode not in ("sample", "interpolate"):
        raise schema.ConfigError(f"mode={cfg.mode} is not available for a text-to-image model yet; use mode=sample "
                                 "or mode=interpolate, with prompt= or prompts=[...].")
    if run_config.get("task") is not None and text is None and cfg.mode not in ("inpaint", "superres"):
        kind = run_config["task"]["_target_"].rsplit(".", 1)[-1]
        raise schema.ConfigError(f"{cfg.ckpt} is a {kind} model: it needs its condition, so mode={cfg.mode} does "
                                 "not apply. Use mode=superres method=sr3 or mode=inpaint method=palette.")
    if cfg.mode in ("inpaint", "superres"):
        return sample_restore.restore(cfg, denoiser, schedule, sampler, run_config, shape, generator, out)
    if cfg.mode != "sample":
        return run_mode(cfg, denoiser, schedule, sampler, run_config, shape, generator, labels, out, decode)
    chunks, trajectory = [], []
    batches = range(0, n, cfg.batch_size)
    for start in track(batches, description="sampling", disable=not cfg.progress or len(batches) < 2):
        size = min(cfg.batch_size, n - start)
        if isinstance(labels, dict):  # a text model's prompts, as word ids
            cond = {key: value.to(device) for key, value in condition_batch(labels, start, start + size).items()}
        else:
            cond = None if labels is None else labels[start:start + size].to(device)
        with torch.no_grad():
            result = sampler.sample(denoiser, schedule, (size, *shape), cond=cond, generator=generator,
                                    progress=cfg.progress and len(batches) == 1,
                                    return_trajectory=cfg.trajectory and start == 0)
        if cfg.trajectory and start == 0:
            result, trajectory = result
            trajectory = [decode(frame) for frame in trajectory]
        chunks.append(decode(result).cpu())
    images = torch.cat(chunks)
    grid_path, npz_path = out / "samples.png", out / "samples.npz"
    save_grid(images, grid_path, nrow=nrow)
    uint8 = sample_modes.to_uint8(images)
    extra = {"prompts": np.array(texts)} if texts else {} if labels is None else {"labels": labels.numpy()}
    np.savez_compressed(npz_path, images=uint8, **extra)
    written = {"grid": grid_path, "npz": npz_path}
    if trajectory:
        written["trajectory"] = out / "trajectory.gif"
        sample_modes.trajectory_gif(trajectory, nrow, written["trajectory"])
    for name, path in written.items():
        print(f"{name}: {path}")
    return written


@torch.no_grad()
def run_mode(cfg: DictConfig, denoiser: Denoiser, schedule: torch.nn.Module, sampler, run_config: dict,
             shape: tuple, generator: torch.Generator, labels, out: Path,
             decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict[str, Path]:
    """mode=inversion | interpolate | forward: one strip image each (see sample_modes)."""
    rows = min(cfg.n, 16)
    if isinstance(labels, dict):  # a text model's prompts (prompt=, prompts=[...]): a row for each entry
        rows = min(rows, min(len(value) for value in labels.values() if torch.is_tensor(value)))
    if cfg.mode == "inversion":
        stats = sample_modes.inversion(denoiser, schedule, sampler, run_config, rows, out)
        print(f"DDIM inversion with {stats['steps']} steps: reconstruction MSE {stats['reconstruction_mse']:.5f}")
        path = out / "inversion.png"
    elif cfg.mode == "interpolate":
        sample_modes.interpolation(denoiser, schedule, sampler, shape, rows, cfg.columns, generator, out, labels,
                                   decode)
        path = out / "interpolation.png"
    else:
        sample_modes.forward_process(schedule, run_config, rows, cfg.columns, generator, out)
        path = out / "forward.png"
    print(f"{cfg.mode}: {path}")
    return {cfg.mode: path}


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="sample")
def main(cfg: DictConfig) -> None:
    with _hydra.exit_on_user_error("difflab-sample", (schema.ConfigError, CheckpointError, FileNotFoundError,
                                                      ValueError, OutputWriteError)):
        sample(cfg)


main = _hydra.entry(main, "sample", "difflab-sample")

if __name__ == "__main__":
    main()
