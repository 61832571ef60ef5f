"""difflab-sample mode=inpaint | superres: training-free restoration with a trained run.

    difflab-sample mode=inpaint ckpt=<run>/checkpoints/ema.pt mask=center method=repaint sampler=ddpm sampler.steps=50
    difflab-sample mode=superres ckpt=... factor=4 method=ddnm input=val
    difflab-sample mode=superres ckpt=... factor=4 input=path/to/lowres_or_fullres.png
    difflab-sample mode=superres ckpt=<experiment=mnist5k_sr3 run>/checkpoints/ema.pt method=sr3
    difflab-sample mode=inpaint ckpt=<experiment=mnist5k_palette run>/checkpoints/ema.pt method=palette

Writes ``restoration.png``, one row per input: degraded | restored (``samples_per_input``
of them) | truth (when known), and ``restoration.npz`` with every image as uint8 plus the
keep mask or factor. The degraded column shows what the method sees: the hole at 0 (mid
grey) or the low-res image upsampled by nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.cli import sample_modes, schema
from difflab.data.sources import read_image, uint8_to_unit_range
from difflab.diffusion.degradation import DegradationError, Downsample, Inpaint, Operator, build_operator
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.guidance import null_labels
from difflab.diffusion.restoration import Restoration
from difflab.diffusion.samplers import Sampler
from difflab.metrics.restoration import psnr
from difflab.training.callbacks import save_grid
from difflab.training.checkpoint import is_regression
from difflab.training.tasks import TASK_METHODS, TrainedRestoration

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_native(path: Path, channels: int) -> torch.Tensor:
    """One image file at its own size as [C, H, W] in [-1, 1] (the data sources' decoder)."""
    pixels = torch.from_numpy(read_image(path, None, channels).copy()).permute(2, 0, 1)
    return uint8_to_unit_range(pixels[None])[0]


def load_inputs(cfg: DictConfig, run_config: dict[str, Any], shape: tuple[int, int, int],
                operator: Operator) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(truth or None, measurement y) for `input=val` or an image file / folder of files.

    A super-resolution file may be the full-size image (degraded here, so its truth is
    known) or already the low-res one (size / factor: it is the measurement itself).
    """
    channels, size = shape[0], shape[1]
    if cfg.input == "val":
        truth = sample_modes.load_real(run_config, cfg.n)
        return truth, operator.A(truth)
    path = Path(cfg.input)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:cfg.n]
        if not files:
            raise DegradationError(f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    elif path.is_file():
        files = [path]
    else:
        raise DegradationError(f"input={cfg.input!r} is neither 'val' nor an existing image file or folder.")
    images = [read_native(f, channels) for f in files]
    low = isinstance(operator, Downsample) and operator.factor > 1
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) > 1:
        raise DegradationError(f"the input images have different sizes {sorted(sizes)}; give images of one size.")
    (h, w), = sizes
    if (h, w) == (size, size):
        truth = torch.stack(images)
        return truth, operator.A(truth)
    if low and (h, w) == (size // operator.factor, size // operator.factor):
        return None, torch.stack(images)
    expected = f"{size}x{size}" + (f" (or {size // operator.factor}x{size // operator.factor} low-res)" if low else "")
    raise DegradationError(f"the input images are {h}x{w} but this model makes {size}x{size} images: give "
                           f"{expected} images.")


def restoration_for(method: str, run_config: dict, knobs: dict, mode: str):
    """The restoration a method name asks for on a checkpoint's run config (`knobs`: the
    Restoration settings). Trained methods need a checkpoint of their task, training-free ones
    an unconditional checkpoint; anything else is a ValueError that says which to use."""
    task_cfg = run_config.get("task")
    if method in TASK_METHODS.values():
        kind = next(k for k, m in TASK_METHODS.items() if m == method)
        if kind != mode:
            raise ValueError(f"method={method} is for {kind}; {mode} with a trained model is "
                             f"method={TASK_METHODS[mode]}.")
        if task_cfg is None:
            raise ValueError(f"method={method} needs a model trained for {kind} (experiment=mnist5k_"
                             f"{method}); this checkpoint is an unconditional model: use a training-free method "
                             "(replacement, repaint, ddnm, ilvr, guided) or train one.")
        task = instantiate(task_cfg)
        if task.kind != kind:
            raise ValueError(f"method={method} is {kind}, but this checkpoint was trained for {task.kind} "
                             f"(method={TASK_METHODS[task.kind]}).")
        regression = is_regression(run_config)
        return TrainedRestoration(task, regression=regression)
    if task_cfg is not None:
        kind = instantiate(task_cfg).kind
        raise ValueError(f"this checkpoint is a model trained for {kind}: its network needs that condition, so "
                         f"use method={TASK_METHODS[kind]} (training-free methods need an unconditional model).")
    return Restoration(method, **knobs)


def restoration_knobs(cfg: DictConfig) -> dict[str, Any]:
    """The config's values of every `Restoration` setting but the method (same names)."""
    return {f.name: cfg[f.name] for f in dataclasses.fields(Restoration) if f.name != "method"}


def restoration_cond(cfg: DictConfig, num_classes: int | None, n: int) -> torch.Tensor | None:
    """Class-conditional models restore with `class_label` if given, else the null class."""
    if num_classes is None:
        if cfg.class_label is not None:
            raise schema.ConfigError(f"class_label={cfg.class_label} but {cfg.ckpt} is an unconditional model.")
        return None
    if cfg.class_label is not None:
        return torch.full((n,), cfg.class_label, dtype=torch.long)
    return null_labels(num_classes, n, "cpu")


@torch.no_grad()
def restore(cfg: DictConfig, denoiser: Denoiser, schedule: torch.nn.Module, sampler: Sampler,
            run_config: dict[str, Any], shape: tuple[int, int, int], generator: torch.Generator,
            out: Path) -> dict[str, Path]:
    kind = cfg.mode
    try:
        operator = build_operator(kind, mask=cfg.mask, factor=cfg.factor, size=shape[1], box=cfg.box,
                                  mask_white=cfg.mask_white, generator=torch.Generator().manual_seed(cfg.seed))
    except DegradationError as error:
        raise schema.ConfigError(str(error)) from None
    truth, y = load_inputs(cfg, run_config, shape, operator)
    if isinstance(operator, Downsample) and truth is None:
        operator.check_measurement(y, shape[1:])
    method = restoration_for(cfg.method, run_config, restoration_knobs(cfg), kind)
    method.path(len(sampler.timesteps_for(schedule)))  # knobs that do not fit the sampler fail before any work
    n, k = y.shape[0], cfg.samples_per_input
    repeated = y.repeat_interleave(k, dim=0)
    cond = restoration_cond(cfg, run_config["model"].get("num_classes"), n * k)
    start = time.perf_counter()
    chunks = []
    for first in range(0, n * k, cfg.batch_size):
        part = repeated[first:first + cfg.batch_size]
        part_cond = None if cond is None else cond[first:first + len(part)].to(schedule.device)
        chunks.append(method.restore(denoiser, schedule, sampler, operator, part, (len(part), *shape),
                                     cond=part_cond, generator=generator, progress=cfg.progress).cpu())
    seconds = time.perf_counter() - start
    restored = torch.cat(chunks).reshape(n, k, *shape)
    degraded = operator.A_pinv(y)
    columns = [degraded[:, None], restored] + ([truth[:, None]] if truth is not None else [])
    rows = min(n, 16)
    strip = torch.cat(columns, dim=1)[:rows]
    written = {"strip": out / "restoration.png", "npz": out / "restoration.npz"}
    save_grid(strip.flatten(0, 1), written["strip"], nrow=strip.shape[1])
    extra: dict[str, np.ndarray] = {"truth": sample_modes.to_uint8(truth)} if truth is not None else {}
    if isinstance(operator, Inpaint):
        extra["keep"] = operator.keep[0, 0].numpy()
    else:
        extra["factor"] = np.array(operator.factor)
    uint8 = sample_modes.to_uint8
    np.savez_compressed(written["npz"], degraded=uint8(degraded), measurement=uint8(y),
                        restored=uint8(restored.flatten(0, 1)), samples_per_input=np.array(k), **extra)
    flat = restored.flatten(0, 1)
    consistency = psnr(operator.A(flat), repeated)
    summary = f"{kind} with {method.method} on {type(sampler).__name__}: {n * k} restorations in {seconds:.1f} s"
    summary += ", known pixels exact" if consistency == float("inf") else f", consistency PSNR {consistency:.1f} dB"
    if truth is not None:
        summary += f", PSNR {psnr(flat, truth.repeat_interleave(k, dim=0)):.2f} dB"
    print(summary)
    for name, path in written.items():
        print(f"{name}: {path}")
    return written
