"""difflab-evaluate: sample-quality metrics of a trained run over samplers x steps x guidance.

    difflab-evaluate ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt
    difflab-evaluate ckpt=<run>/checkpoints/ema.pt samplers=[ddim,heun] steps=[10,20] n=1000
    difflab-evaluate ckpt=<conditional run>/checkpoints/ema.pt samplers=[ddim] steps=[50] guidance_scales=[0,1,3]
    difflab-evaluate task=inpaint ckpt=... mask=center n=100 samplers=[ddpm] steps=[50]   (see evaluate_restore)

Writes `results.csv`, `results.md`, `metrics_vs_nfe.png`, `metrics_vs_guidance.png` (conditional
runs, two or more scales) and one sample grid per cell under `samples/` in the run directory.
Every cell uses the same noise (seed), the EMA weights and the cached reference features.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from difflab.cli import _hydra, evaluate_restore, prompts, schema
from difflab.cli.sample import build_denoiser, clip_range, load_model, pick_device
from difflab.data import DatasetUnavailableError
from difflab.diffusion.denoiser import CallCounter, Denoiser
from difflab.diffusion.guidance import ClassifierFreeGuidance
from difflab.metrics import report
from difflab.metrics.report import OutputWriteError
from difflab.metrics.domain import DomainClassifierConfig
from difflab.metrics.evaluate import SampleEvaluator, balanced_labels
from difflab.metrics.features import ExtractorUnavailableError
from difflab.training.callbacks import save_grid
from difflab.training.checkpoint import CheckpointError
from difflab.training.first_stage import image_shape_of, is_latent
from difflab.training.inference_precision import in_sampling_setting

log = logging.getLogger("difflab.evaluate")
_hydra.setup()


def sampler_config(name: str, steps: int, args: Optional[dict] = None) -> DictConfig:
    """`conf/sampler/<name>.yaml` with `steps` and the keys of `args` set, checked by its schema."""
    extra = [f"sampler.{key}={value}" for key, value in (args or {}).items()]
    try:
        cfg = hydra.compose(config_name="sample",
                            overrides=[f"sampler={name}", f"sampler.steps={steps}", *extra, "ckpt=-"])
    except HydraException as error:
        explained = _hydra.explain(error) or str(error).splitlines()[0]
        raise schema.ConfigError(f"samplers: {explained}") from error
    return cfg.sampler


def grid_cells(cfg: DictConfig, conditional: bool) -> list[dict[str, Any]]:
    scales: list[Optional[float]] = [float(s) for s in cfg.guidance_scales] if conditional else [None]
    return [{"sampler": name, "steps": int(steps), "guidance_scale": scale}
            for scale in (scales or [None]) for name in cfg.samplers for steps in cfg.steps]


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    OmegaConf.to_object(cfg).validate()
    device = pick_device(cfg.device)
    run_config, weights, decode = load_model(cfg.ckpt, device)
    if is_latent(run_config) and cfg.task != "sample":
        raise schema.ConfigError(f"task={cfg.task} scores restoration in pixel space; {cfg.ckpt} is a latent model "
                                 "(first_stage=kl): use task=sample.")
    text = prompts.text_task(run_config)
    if run_config.get("task") is not None and text is None and cfg.task == "sample":
        raise schema.ConfigError(f"{cfg.ckpt} is a trained restoration model: it needs its condition. Score it with "
                                 "task=superres methods=[sr3] or task=inpaint methods=[palette].")
    base, schedule = build_denoiser(run_config, weights, device, precision=cfg.precision,
                                    cache_dir=cfg.paths.cache_dir, batch=min(cfg.batch_size, cfg.n))
    decode = in_sampling_setting(decode, base.net)
    net, num_classes = base.net, run_config["model"].get("num_classes")
    if text is not None:  # labels become captions from the `prompt_templates` templates
        num_classes = text.num_classes
    model = run_config["model"]
    shape = (model["in_channels"], model["image_size"], model["image_size"])
    cells = grid_cells(cfg, num_classes is not None and cfg.task == "sample")
    args = OmegaConf.to_container(cfg.sampler_args)
    nodes = {(c["sampler"], c["steps"]): sampler_config(c["sampler"], c["steps"], args) for c in cells}
    for node in nodes.values():  # knobs in range; discrete samplers take at most T steps
        schema.check_sampler(node, schedule.num_timesteps)
    samplers = {key: instantiate(node) for key, node in nodes.items()}

    datamodule = instantiate(run_config["data"])
    image_shape = image_shape_of(run_config)
    if (datamodule.channels, datamodule.image_size) != image_shape[:2]:
        raise CheckpointError(f"the run's data gives {datamodule.channels}x{datamodule.image_size} images but "
                              f"the model makes {image_shape[0]}x{image_shape[1]}")
    m = cfg.metrics
    evaluator = SampleEvaluator(
        datamodule, m.extractor, cfg.paths.cache_dir, inception_weights=m.inception_weights, ref_split=m.ref_split,
        ref_n=m.ref_n, device=device, domain=DomainClassifierConfig(steps=m.domain_steps),
        min_domain_accuracy=m.min_domain_accuracy, kid_subsets=m.kid_subsets, kid_subset_size=m.kid_subset_size,
        pr_k=m.pr_k, seed=cfg.seed)
    log.info("reference: %d %s images of %s, extractor %s", evaluator.reference.num, m.ref_split,
             datamodule.name, evaluator.extractor.name)

    if cfg.task != "sample":
        return evaluate_restore.evaluate_restoration(cfg, base, schedule, samplers, run_config, datamodule,
                                                     evaluator, device)
    out = Path(cfg.paths.output_dir)
    counter = CallCounter(net)
    labels = None if num_classes is None else balanced_labels(cfg.n, num_classes)
    rows = [real_baseline(evaluator, datamodule, cfg.n, m.ref_split)] if cfg.real_baseline else []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not cfg.progress) as progress:
        overall = progress.add_task("grid cells", total=len(cells))
        for cell in cells:
            scale = cell["guidance_scale"]
            guided = net if scale is None else ClassifierFreeGuidance(net, num_classes, scale,
                                                                       dict_conditions=text is not None)
            denoiser = Denoiser(guided, schedule, run_config["objective"]["prediction"], clip_range(run_config))
            sampler = samplers[(cell["sampler"], cell["steps"])]
            label = f"{cell['sampler']} {cell['steps']} steps" + ("" if scale is None else f" w={scale:g}")
            images_task = progress.add_task(label, total=cfg.n)

            def draw(size: int, cond: Optional[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
                if cond is not None:
                    cond = cond.to(device) if text is None else text.conditions_for(cond.to(device),
                                                                                    cfg.prompt_templates, captions)
                return decode(sampler.sample(denoiser, schedule, (size, *shape), generator=generator, cond=cond))

            captions = torch.Generator().manual_seed(cfg.seed)  # text models: which template each image gets
            counter.calls, start = 0, time.perf_counter()
            generated = evaluator.generate(draw, cfg.n, batch_size=cfg.batch_size, labels=labels,
                                           generator=torch.Generator(device).manual_seed(cfg.seed),
                                           keep_images=cfg.grid_images,
                                           progress=lambda k: progress.advance(images_task, k))
            seconds = time.perf_counter() - start
            batches = -(-cfg.n // cfg.batch_size)
            row = {**cell, "nfe": counter.calls // batches, "n": cfg.n,
                   **evaluator.score(generated.features, generated.labels),
                   "seconds": round(seconds, 2), "images_per_second": round(cfg.n / seconds, 2)}
            rows.append(row)
            if cfg.grid_images:
                tag = f"{cell['sampler']}_{cell['steps']}" + ("" if scale is None else f"_w{scale:g}")
                save_grid(generated.images, out / "samples" / f"{tag}.png", nrow=num_classes or 8)
            progress.remove_task(images_task)
            progress.advance(overall)
            log.info("%s: %s", label, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    write_outputs(rows, out, cfg, evaluator)
    return rows


def real_baseline(evaluator: SampleEvaluator, datamodule: Any, n: int, ref_split: str) -> dict[str, Any]:
    """The scores of held-out real images (the other split) at the same n: the best a
    generator can expect at this sample size (FID is biased upwards at small n)."""
    split = "val" if ref_split == "train" else "train"
    data = datamodule.split(split)
    n = min(n, len(data.images))
    if n < 4:
        raise ValueError(f"real_baseline needs >= 4 images in the {split} split (it has {n}); "
                         "set real_baseline=false")
    scores = evaluator.score(evaluator.features(data.images[:n]), data.labels[:n])
    return {"sampler": f"real ({split})", "steps": None, "nfe": 0, "guidance_scale": None, "n": n, **scores}


def write_outputs(rows: list[dict[str, Any]], out: Path, cfg: DictConfig, evaluator: SampleEvaluator) -> None:
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": report.write_csv(rows, out / "results.csv")}
    header = (f"Checkpoint `{cfg.ckpt}`; {cfg.n} samples per cell against {evaluator.reference.num} "
              f"{cfg.metrics.ref_split} images; extractor `{evaluator.extractor.name}`.\n\n")
    table = report.markdown_table(rows)
    (out / "results.md").write_text(header + table)
    written["markdown"] = out / "results.md"
    metrics = ("fid", "kid", "precision", "recall", "class_accuracy", "class_coverage")
    sampled = [r for r in rows if r["steps"] is not None]
    baseline = next((r for r in rows if r["steps"] is None), None)
    nfe_plot = report.plot_metrics(sampled, out / "metrics_vs_nfe.png", "nfe", metrics,
                                   group_by=("sampler", "guidance_scale"), log_x=True, baseline=baseline)
    guidance_plot = report.plot_metrics([r for r in sampled if r["guidance_scale"] is not None],
                                        out / "metrics_vs_guidance.png", "guidance_scale",
                                        ("fid", "class_accuracy", "is"), group_by=("sampler", "steps"),
                                        baseline=baseline)
    for name, path in (("plot_nfe", nfe_plot), ("plot_guidance", guidance_plot)):
        if path is not None:
            written[name] = path
    print(table)
    for name, path in written.items():
        print(f"{name}: {path}")


# What a user can mend (a setting, a file, the data): one line on stderr, no traceback.
USER_ERRORS = (schema.ConfigError, CheckpointError, ExtractorUnavailableError, DatasetUnavailableError,
               FileNotFoundError, ValueError, OutputWriteError)


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    with _hydra.exit_on_user_error("difflab-evaluate", USER_ERRORS):
        evaluate(cfg)


main = _hydra.entry(main, "eval", "difflab-evaluate")

if __name__ == "__main__":
    main()
