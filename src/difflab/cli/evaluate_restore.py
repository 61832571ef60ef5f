"""difflab-evaluate task=inpaint | superres: restoration methods x samplers x steps, with baselines.

    difflab-evaluate task=inpaint ckpt=<run>/checkpoints/ema.pt mask=center n=100 samplers=[ddpm,ddim] steps=[50]
    difflab-evaluate task=superres ckpt=... factor=4 methods=[ddnm,ilvr] samplers=[ddim] steps=[25,50]
    difflab-evaluate task=superres ckpt=<unconditional run> trained_ckpts=[<sr3 run>] methods=[ddnm,sr3]

Restores the first n held-out images of the run's dataset with every method on every
sampler and step count (one restoration per image, the same noise for every cell), plus the
baselines of ``metrics.restoration``, and scores each cell (see that module). Writes
``results.csv``, ``results.md``, ``restoration_vs_nfe.png`` and one strip per cell under
``strips/`` (degraded | restored | truth for 8 images).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from difflab.cli import schema
from difflab.cli.sample import build_denoiser
from difflab.cli.sample_restore import restoration_for, restoration_knobs
from difflab.diffusion.degradation import DegradationError, build_operator
from difflab.diffusion.denoiser import CallCounter, Denoiser
from difflab.metrics import report
from difflab.metrics.evaluate import SampleEvaluator
from difflab.metrics.restoration import (
    INPAINT_BASELINES,
    SUPERRES_BASELINES,
    baseline,
    diversity,
    label_ceiling,
    restoration_scores,
)
from difflab.training.callbacks import save_grid
from difflab.training.checkpoint import load_network_weights
from difflab.training.tasks import TASK_METHODS

log = logging.getLogger("difflab.evaluate")
COLUMNS = ("method", "sampler", "steps", "nfe", "n", "label_agreement", "agreement_majority", "agreement_any",
           "psnr", "ssim", "psnr_hole", "consistency_psnr", "fid", "diversity", "seconds")


def _cells(cfg: DictConfig, samplers: dict, models: list[tuple]) -> list[dict[str, Any]]:
    """One cell per method x sampler x steps. Training-free methods run on `ckpt`; a trained
    method (sr3, palette) runs on every model of `trained_ckpts` (or on `ckpt` if there are none)."""
    cells = []
    for name in cfg.methods:
        trained = name in TASK_METHODS.values()
        for model in (models[1:] if trained and len(models) > 1 else models[:1]):
            try:
                method = restoration_for(name, model[2], restoration_knobs(cfg), cfg.task)
            except ValueError as error:
                raise schema.ConfigError(str(error)) from None
            for (sampler_name, steps), sampler in samplers.items():
                try:
                    method.path(len(sampler.timesteps_for(model[1])))
                except ValueError as error:
                    raise schema.ConfigError(f"{name} on {sampler_name} with {steps} steps: {error}") from None
                cells.append({"method": method.method, "sampler": sampler_name, "steps": steps,
                              "restoration": method, "run": sampler, "model": model})
    return cells


def evaluate_restoration(cfg: DictConfig, denoiser: Denoiser, schedule: torch.nn.Module, samplers: dict,
                         run_config: dict[str, Any], datamodule: Any, evaluator: SampleEvaluator,
                         device: torch.device) -> list[dict[str, Any]]:
    models = [(denoiser, schedule, run_config)]
    for path in cfg.trained_ckpts:
        trained_config, weights = load_network_weights(path)
        models.append((*build_denoiser(trained_config, weights, device, precision=cfg.precision,
                                       cache_dir=cfg.paths.cache_dir, batch=min(cfg.batch_size, cfg.n)),
                       trained_config))
    size = datamodule.image_size
    try:
        operator = build_operator(cfg.task, mask=cfg.mask, factor=cfg.factor, size=size, box=cfg.box,
                                  mask_white=cfg.mask_white, generator=torch.Generator().manual_seed(cfg.seed))
    except DegradationError as error:
        raise schema.ConfigError(str(error)) from None
    cells = _cells(cfg, samplers, models)
    val = datamodule.split("val")
    n = min(cfg.n, len(val.images))
    truth, labels = val.images[:n], val.labels[:n]
    y = operator.A(truth)
    train_split = datamodule.split("train")
    train = train_split.images
    shape = tuple(truth.shape[1:])
    num_classes = run_config["model"].get("num_classes")
    out = Path(cfg.paths.output_dir)

    def score(name: str, restored: torch.Tensor, seconds: float, extra: dict[str, Any],
              spread: dict[str, float]) -> dict[str, Any]:
        features = evaluator.features(restored)
        agreement = float((features.logits.argmax(1) == labels).float().mean()) if features.logits is not None \
            else float("nan")
        fid = evaluator.score(features)["fid"]
        row = {**extra, "n": n, "label_agreement": agreement, **restoration_scores(restored, truth, operator, y),
               "fid": fid, **spread, "seconds": round(seconds, 2)}
        strip = torch.stack([operator.A_pinv(y[:8]), restored[:8], truth[:8]], dim=1).flatten(0, 1)
        save_grid(strip, out / "strips" / f"{name}.png", nrow=3)
        return row

    def repeated_scores(restorations: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
        """Over k restorations of each of m inputs: pixel diversity, and how often the majority
        label and any of the k labels is the true one (a posterior sampler of an ambiguous
        input draws several readings: "any" shows whether the true one is among them)."""
        logits = evaluator.features(restorations.flatten(0, 1)).logits
        out = {"diversity": diversity(restorations)}
        if logits is not None:
            labels_k = logits.argmax(1).reshape(restorations.shape[:2])
            out["agreement_majority"] = float((torch.mode(labels_k, 1).values == true).float().mean())
            out["agreement_any"] = float((labels_k == true[:, None]).any(1).float().mean())
        return out

    rows = []
    names = INPAINT_BASELINES if cfg.task == "inpaint" else SUPERRES_BASELINES
    if cfg.baselines:
        for name in names:
            start = time.perf_counter()
            restored = baseline(name, operator, y, train)
            rows.append(score(f"baseline_{name}", restored, time.perf_counter() - start,
                              {"method": f"{name} (baseline)", "sampler": None, "steps": None, "nfe": 0},
                              {"diversity": 0.0}))
    if cfg.label_ceiling and evaluator.num_classes is not None:  # a domain classifier: labels to agree with
        start = time.perf_counter()
        ceiling = label_ceiling(operator, train, train_split.labels, truth, labels, evaluator.num_classes,
                                steps=cfg.metrics.domain_steps)
        seconds = round(time.perf_counter() - start, 2)
        log.info("label ceiling of the known pixels: best guess %.3f, posterior draw %.3f (temperature %.2f)",
                 ceiling["best_guess"], ceiling["posterior"], ceiling["temperature"])
        for kind, key in (("best guess", "best_guess"), ("posterior draw", "posterior")):
            rows.append({"method": f"known pixels only: {kind} (ceiling)", "sampler": None, "steps": None,
                         "nfe": 0, "n": n, "label_agreement": ceiling[key], "seconds": seconds})
    counters = {id(model): CallCounter(model[0].net) for model in models}
    k, m = cfg.diversity_samples, min(cfg.diversity_inputs, n)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not cfg.progress) as progress:
        overall = progress.add_task("grid cells", total=len(cells))
        for cell in cells:
            method, sampler = cell["restoration"], cell["run"]
            cell_denoiser, cell_schedule, _ = cell["model"]
            counter = counters[id(cell["model"])]
            label = f"{cell['method']} {cell['sampler']} {cell['steps']} steps"
            images_task = progress.add_task(label, total=n + m * k)

            def run(measured: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
                parts = []
                for first in range(0, len(measured), cfg.batch_size):
                    part = measured[first:first + cfg.batch_size].to(device)
                    cond = None if num_classes is None or method.method in TASK_METHODS.values() else \
                        torch.full((len(part),), num_classes, dtype=torch.long, device=device)
                    parts.append(method.restore(cell_denoiser, cell_schedule, sampler, operator, part,
                                                (len(part), *shape), cond=cond, generator=generator).cpu())
                    progress.advance(images_task, len(part))
                return torch.cat(parts)

            generator = torch.Generator(device).manual_seed(cfg.seed)
            counter.calls, start = 0, time.perf_counter()
            restored = run(y, generator)
            seconds = time.perf_counter() - start
            nfe = counter.calls // -(-n // cfg.batch_size)
            spread = repeated_scores(run(y[:m].repeat_interleave(k, dim=0), generator).reshape(m, k, *shape),
                                     labels[:m]) if k >= 2 and m >= 1 else {"diversity": float("nan")}
            tag = f"{cell['method']}_{cell['sampler']}_{cell['steps']}"  # method: sr3, regression, ...
            rows.append(score(tag, restored, seconds, {"method": cell["method"], "sampler": cell["sampler"],
                                                       "steps": cell["steps"], "nfe": nfe}, spread))
            progress.remove_task(images_task)
            progress.advance(overall)
            log.info("%s: %s", label, ", ".join(f"{key}={v:.4g}" for key, v in rows[-1].items()
                                                 if isinstance(v, float)))
    for counter in counters.values():
        counter.remove()
    write(rows, out, cfg, operator, n)
    return rows


def write(rows: list[dict[str, Any]], out: Path, cfg: DictConfig, operator: Any, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": report.write_csv(rows, out / "results.csv")}
    header = (f"Checkpoint `{cfg.ckpt}`; task {cfg.task} ({operator!r}), the first {n} held-out images; "
              f"FID against the training images (domain features); diversity over {cfg.diversity_samples} "
              f"restorations of {cfg.diversity_inputs} inputs.\n\n")
    table = report.markdown_table(rows, COLUMNS)
    (out / "results.md").write_text(header + table)
    written["markdown"] = out / "results.md"
    plot = report.plot_metrics([r for r in rows if r["steps"] is not None], out / "restoration_vs_nfe.png", "nfe",
                               ("label_agreement", "psnr", "ssim", "fid"), group_by=("method", "sampler"),
                               log_x=True)
    if plot is not None:
        written["plot"] = plot
    print(table)
    for name, path in written.items():
        print(f"{name}: {path}")
