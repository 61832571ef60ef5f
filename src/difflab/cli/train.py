"""difflab-train: compose the config with Hydra, build every piece, fit with Lightning.

    difflab-train                                   # the default experiment (mnist5k)
    difflab-train schedule=cosine sampler=ddim trainer.max_epochs=3
    difflab-train experiment=digits_tiny
    python -m difflab.cli.train -m schedule=linear,cosine,sigmoid
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from difflab.cli import _ddp, _hydra, resume, schema
from difflab.cli.collect import RESULT_FILE  # every run's outcome, read from each multirun job
from difflab.data import BadImageError, DatasetUnavailableError
from difflab.metrics import report
from difflab.metrics.report import OutputWriteError
from difflab.training.checkpoint import CheckpointError, check_resume_compatible
from difflab.training import precision, tracking
from difflab.training.budget import StepBudget, ValidateAtEnd
from difflab.training.plan import TimeBudget
from difflab.training.callbacks import LastCheckpoint, interruption
from difflab.models.first_stage import LatentSpace
from difflab.models.text import TextExtraMissing, check_vocabulary
from difflab.training.autoencoder import AutoencoderModule, ReconstructionProbe
from difflab.training.first_stage import build_latent_space, cache_latents
from difflab.training.consistency import ConsistencyModule, load_initial_weights
from difflab.training.module import DiffusionModule
from difflab.training.nonfinite import NonFiniteLossError
from difflab.training.tasks import probe_conditions

log = logging.getLogger("difflab.train")
_hydra.setup()


def _instantiate_all(nodes: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` node of a dict-valued group; null entries switch one off.

    An entry left without `_target_` is a callback switched off (e.g. by `debug=fast`) whose
    knobs an experiment still sets: skipped, with a warning naming it.
    """
    built = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            log.warning("skipping %s: it only sets %s and has no _target_ (switched off by another "
                        "config group?)", name, ", ".join(map(str, node.keys())))
            continue
        built.append(instantiate(node))
    return built


_DECISION_ENV = "DIFFLAB_PRECISION_DECISION"  # rank 0's choice, inherited by the ranks Lightning starts


def resolve_precision(cfg: DictConfig, net: torch.nn.Module, datamodule: Any, task: Any = None) -> precision.Decision:
    """Resolve `trainer.precision` and `channels_last` (`auto`: measured, see
    difflab.training.precision) and write the choice into `cfg`, so config.yaml holds it.

    Every rank of a multi-process run must train alike: rank 0 decides (before it starts
    the other ranks, which inherit the decision), and ranks started by torchrun or SLURM
    read rank 0's cached probe."""
    shape = (cfg.data.batch_size, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)  # what the net takes
    cond = probe_conditions(task, getattr(net, "num_classes", None), shape)  # what the run will feed
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    inherited = json.loads(os.environ.get(_DECISION_ENV, "{}")) if rank > 0 else {}
    if inherited.get("output_dir") == str(cfg.paths.output_dir):
        decision = precision.Decision(**inherited["decision"])
    else:
        if rank > 0:
            _wait_for_probe_cache(cfg, net, shape)
        decision = precision.resolve(cfg.trainer.precision, cfg.trainer.accelerator, cfg.channels_last, net,
                                     shape, cache_dir=cfg.paths.cache_dir, cond=cond)
        os.environ[_DECISION_ENV] = json.dumps({"output_dir": str(cfg.paths.output_dir),
                                                "decision": decision.record()})
    OmegaConf.update(cfg, "trainer.precision", decision.precision)
    OmegaConf.update(cfg, "channels_last", decision.channels_last)
    if rank == 0:
        log.info("%s", decision.summary())
        for warning in decision.warnings:
            log.warning("%s", warning)
    return decision


def _wait_for_probe_cache(cfg: DictConfig, net: torch.nn.Module, shape: tuple, seconds: float = 120.0) -> None:
    """A rank > 0 started beside rank 0 (torchrun, srun) waits for rank 0's probe result."""
    if "auto" not in (str(cfg.trainer.precision), str(cfg.channels_last)):
        return
    path = precision.cache_path(cfg.paths.cache_dir, net, shape)
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)


def budget_hint(decision: precision.Decision) -> Optional[str]:
    """Why a run may be slow, for StepBudget's warnings."""
    gain = decision.ratio("bf16-mixed")
    if decision.precision.startswith("bf16") and gain is not None and gain < 1.0:
        return (f"precision {decision.precision} runs at {gain:.2f}x the speed of 32-true on this CPU "
                "(set trainer.precision=auto or 32-true)")
    if decision.device == "cpu":
        return (f"this CPU ({decision.machine.get('cpu') or precision.cpu_model()}) trains at the measured rate "
                f"in {decision.precision}; the defaults fit 15 minutes on a 2-core AVX2 CPU in float32")
    return None


def first_stage(cfg: DictConfig, datamodule: Any) -> Optional[LatentSpace]:
    """`first_stage=kl`: the frozen autoencoder, its fitted scale and (cache_latents) the
    encoded splits; the fitted scale and the autoencoder's arguments go into config.yaml."""
    spec = schema.build_checked("first_stage", cfg.first_stage)
    if spec["kind"] == "identity":
        return None
    task_kind = str((cfg.get("task") or {}).get("_target_", "")).rsplit(".", 1)[-1]
    if task_kind in ("SuperResolution", "Inpainting"):
        raise schema.ConfigError(f"task={task_kind} (trained restoration) works in pixel space: use "
                                 "first_stage=identity with it.")
    space = build_latent_space(spec, datamodule, resume=cfg.get("ckpt_path"))
    OmegaConf.update(cfg, "first_stage.scale_factor", float(space.scale_factor))
    OmegaConf.update(cfg, "first_stage.autoencoder", space.autoencoder.config(), merge=False)
    if spec["cache_latents"]:
        if datamodule.hflip:
            log.info("first stage: no latent cache with data.hflip=true (a flipped latent is not the latent of "
                     "the flipped image); encoding every batch")
        else:
            cache_latents(space, datamodule)
    return space


def _diffusion_module(cfg: DictConfig, datamodule: Any, space: Optional[LatentSpace] = None
                      ) -> tuple[DiffusionModule, precision.Decision]:
    net = instantiate(cfg.model, _convert_="all")
    if cfg.get("task") is not None and "class_names" in cfg.task and not cfg.task.class_names:
        OmegaConf.update(cfg, "task.class_names", list(datamodule.class_names))  # a text task's vocabulary
    task = instantiate(cfg.task) if cfg.get("task") is not None else None
    tokenizer = getattr(task, "tokenizer", None)
    for embedder in getattr(getattr(net, "conditioner", None), "embedders", []):
        if tokenizer is not None and embedder.input_key == task.input_key:
            try:
                check_vocabulary(embedder, tokenizer.vocab_size)
                if hasattr(embedder, "bind_vocabulary"):  # frozen pretrained vectors for the captions' words
                    embedder.bind_vocabulary(tokenizer.words)
            except (ValueError, TextExtraMissing) as error:
                raise schema.ConfigError(str(error)) from None
    decision = resolve_precision(cfg, net, datamodule, task)
    if cfg.schedule.get("sigma_data") is None:  # EDM's sigma_data, measured once and written to config.yaml
        OmegaConf.update(cfg, "schedule.sigma_data", _sigma_data(datamodule, space))
    if cfg.get("init_from"):  # fine-tuning (consistency tuning) starts from a trained model's weights
        load_initial_weights(cfg.init_from, net, _hydra.plain(cfg))
    elif cfg.get("consistency") is not None and not cfg.get("ckpt_path"):
        raise schema.ConfigError("consistency tuning turns a trained model into a few-step sampler: set "
                                 "init_from=<run>/checkpoints/ema.pt (a difflab-train run of the same model, schedule "
                                 "and objective)")
    tuning = {"tuning": schema.build_checked("consistency", cfg.consistency)} if cfg.get("consistency") else {}
    module = (ConsistencyModule if tuning else DiffusionModule)(
        net, instantiate(cfg.schedule), instantiate(cfg.sampler), **tuning,
        **_hydra.plain(cfg.objective), **_hydra.plain(cfg.optim),
        density=schema.build_checked("density", cfg.density) if cfg.get("density") else None,
        weighting=schema.build_checked("weighting", cfg.weighting) if cfg.get("weighting") else None, channels_last=cfg.channels_last, compile=cfg.compile,
        p_uncond=cfg.p_uncond, guidance_scale=cfg.guidance.scale,
        task=task, first_stage=space, latents_cached=bool(space is not None and datamodule.serves_other_inputs),
        nonfinite=cfg.nonfinite, run_config=_hydra.plain(cfg),
    )
    return module, decision


def _sigma_data(datamodule: Any, space: Optional[LatentSpace]) -> float:
    """The std of what the diffusion model learns: the training images, or 1 for a first stage's
    latents (its scale factor makes them std 1, `LatentSpace.fit_scale`)."""
    if space is not None:
        return 1.0
    std = float(datamodule.split("train").images.float().std())
    log.info("schedule.sigma_data = %.4f (the std of the %d training images)", std, len(datamodule.split("train")))
    return round(std, 4)


def _autoencoder_module(cfg: DictConfig, datamodule: Any) -> tuple[AutoencoderModule, precision.Decision]:
    """stage=autoencoder: the first stage of latent diffusion (experiment=mnist5k_autoencoder)."""
    net = schema.build_checked("model", cfg.model)
    decision = resolve_precision(cfg, ReconstructionProbe(net), datamodule)
    module = schema.build_checked("autoencoder_loss", cfg.autoencoder_loss, net=net, **_hydra.plain(cfg.optim),
                                  channels_last=cfg.channels_last, run_config=_hydra.plain(cfg))
    return module, decision


def build(cfg: DictConfig) -> tuple[pl.LightningModule, pl.LightningDataModule, pl.Trainer]:
    """Everything a run needs, from a composed config; nothing is trained here."""
    schema.resolve_objective(cfg)
    schema.validate(cfg)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    tracking.prepare_resume(cfg)  # a resumed run continues its W&B run

    datamodule = instantiate(cfg.data)
    space = first_stage(cfg, datamodule) if cfg.stage == "diffusion" else None
    # The network's input shape comes from the data (or the first stage's latents) unless the config pins it.
    channels, size = (space.latent_shape[0], space.latent_shape[1]) if space else (datamodule.channels,
                                                                                   datamodule.image_size)
    OmegaConf.update(cfg, "model.in_channels", cfg.model.in_channels or channels)
    OmegaConf.update(cfg, "model.image_size", cfg.model.image_size or size)
    if space is not None and (cfg.model.in_channels, cfg.model.image_size) != (channels, size):
        raise schema.ConfigError(f"model.in_channels={cfg.model.in_channels} / model.image_size={cfg.model.image_size} "
                                 f"do not fit the first stage's {channels}x{size}x{size} latents: leave them null.")
    if cfg.stage == "autoencoder":
        module, decision = _autoencoder_module(cfg, datamodule)
    else:
        module, decision = _diffusion_module(cfg, datamodule, space)
    if HydraConfig.initialized():
        _ddp.install()  # processes Lightning starts for DDP rerun this job, not the command line
    if tracking.wandb_nodes(cfg):
        try:
            import wandb  # noqa: F401 - Lightning's WandbLogger would fail only once training runs
        except ImportError as error:
            raise schema.ConfigError(f"logger=wandb needs the wandb package ({error}): pip install -e '.[wandb]', "
                                     "or log with logger=csv or logger=tensorboard") from None
    # The time budget plans first, so StepBudget's estimate on the same step sees the planned length.
    run_callbacks = ([TimeBudget(cfg.trainer.budget_minutes)] if cfg.trainer.get("budget_minutes") else []) + [
        StepBudget(cause=budget_hint(decision), record={"precision": decision.record()}), ValidateAtEnd()]
    lightning_args = OmegaConf.masked_copy(cfg.trainer, [key for key in cfg.trainer if key != "budget_minutes"])
    # default_root_dir: the run directory, where a SLURM requeue signal's hpc_ckpt_<n>.ckpt belongs (not the cwd)
    trainer = instantiate(lightning_args, callbacks=_instantiate_all(cfg.callbacks) + tracking.callbacks(cfg) + run_callbacks,
                          logger=_instantiate_all(cfg.logger) or False,
                          default_root_dir=cfg.trainer.get("default_root_dir") or cfg.paths.output_dir)
    if cfg.get("nonfinite") == "skip" and trainer.world_size > 1:
        # A step skipped on one rank only would leave the others waiting in the gradient all-reduce.
        raise schema.ConfigError("nonfinite=skip works on one device: with several, use nonfinite=stop and resume "
                                 "from last.ckpt.")
    if getattr(module, "discriminator", None) is not None and trainer.world_size > 1:
        # Two backward passes per step, the discriminator idle before disc_start: not what DDP's reducer expects.
        raise schema.ConfigError("autoencoder_loss=kl_gan (a discriminator) trains on one device for now: use "
                                 "trainer=cpu or trainer=gpu, or autoencoder_loss=kl with several devices.")
    return module, datamodule, trainer


def train_run(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the composed experiment; return the final logged metrics and the run's outcome
    (status ok | stopped_early, steps, planned_steps, the precision decision)."""
    resume.resume_auto(cfg)
    module, datamodule, trainer = build(cfg)
    budget = next(cb for cb in trainer.callbacks if isinstance(cb, StepBudget))
    try:
        output_dir = cfg.paths.output_dir
        OmegaConf.save(cfg, f"{output_dir}/config.yaml", resolve=True)
        log.info("run directory: %s", output_dir)
        if cfg.ckpt_path:
            check_resume_compatible(cfg.ckpt_path, module.hparams.run_config)
        if cfg.train:
            fit(trainer, module, datamodule, cfg.ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        plan = next((cb.plan for cb in trainer.callbacks if isinstance(cb, TimeBudget) and cb.plan), None)
        return metrics, {"status": "ok", **budget.record, **budget.outcome, **({"plan": plan} if plan else {})}
    finally:
        tracking.finish(trainer)  # one W&B run per job, also in a multirun's single process


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run; its state is in last.ckpt (the message says how to go on)."""


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any, ckpt_path: Optional[str]) -> None:
    """trainer.fit, with a signal's stop (Lightning turns Ctrl-C into SystemExit) as RunInterrupted."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as error:
        last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
        kind = interruption(error) or (last.interrupted if last is not None else None)
        if kind is None:
            raise
        saved = (f"its state at step {trainer.global_step} is in {last.path}; resume with "
                 f"ckpt_path={last.path}, or rerun the same command with resume=auto and the same run directory"
                 if last is not None and last.path.is_file() else "no checkpoint was written")
        raise RunInterrupted(f"{kind} stopped the run: {saved}") from None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the composed experiment; return the final logged metrics (for sweepers)."""
    return train_run(cfg)[0]


@rank_zero_only
def write_result(output_dir: str, status: str, seconds: float, metrics: dict[str, float],
                 error: Optional[str] = None, outcome: Optional[dict[str, Any]] = None) -> None:
    """`<run>/result.json`: status (ok | stopped_early | failed | interrupted), the error, the
    final logged metrics, the command-line overrides, the wall time, and (for a run that
    trained) steps, planned_steps and the precision decision. Written atomically by rank 0."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"status": status, "error": error, "seconds": round(seconds, 1), "overrides": overrides,
              "metrics": metrics, **{k: v for k, v in (outcome or {}).items() if k != "status"}}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    report.write_text(Path(output_dir) / RESULT_FILE, json.dumps(record, indent=2, allow_nan=True) + "\n")


# What a user can mend (a setting, a file, the data, the disk): one line on stderr, no traceback.
USER_ERRORS = (schema.ConfigError, DatasetUnavailableError, BadImageError, CheckpointError, FileNotFoundError,
               precision.PrecisionError, NonFiniteLossError, RunInterrupted, OutputWriteError)


def _stop(message: str) -> None:
    """End this job on a user's mistake: one line and exit status 1; in a multirun the error goes
    on to Hydra, which marks this job failed, runs the others, and reports it at the end."""
    log.error("%s", message)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise
    sys.exit(f"difflab-train: {message}")


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return `optimized_metric` from the run's final metrics (what a sweeper optimises)."""
    start = time.perf_counter()
    output_dir = cfg.paths.output_dir
    try:
        finished = resume.finished_before(cfg)
    except schema.ConfigError as error:  # the directory holds another run: leave its result.json as it is
        _stop(str(error))
    if finished is not None:
        metrics = finished.get("metrics") or {}
        name = cfg.get("optimized_metric")
        return float(metrics[name]) if name and name in metrics else None
    try:
        with _ddp.job_scope():  # the next job of a multirun starts from a clean DDP state
            metrics, outcome = train_run(cfg)
    except BaseException as error:
        status = "interrupted" if isinstance(error, (KeyboardInterrupt, RunInterrupted)) else "failed"
        write_result(output_dir, status, time.perf_counter() - start, {}, f"{type(error).__name__}: {error}")
        message = _hydra.user_message(error, USER_ERRORS)
        if message is None:
            raise
        _stop(message)
    name = cfg.get("optimized_metric")
    if name and cfg.train and name not in metrics:  # train=false only builds: there is nothing to report
        message = (f"optimized_metric={name!r} was not logged by this run; available metrics: "
                   f"{', '.join(sorted(metrics)) or '(none)'}")
        if _sweeper_optimises():
            # An optimising sweeper must not be handed None: this job fails (its outputs stay),
            # and Hydra goes on with the other jobs where the sweeper allows it.
            write_result(output_dir, "failed", time.perf_counter() - start, metrics, message, outcome)
            log.error("%s", message)
            raise MissingMetricError(message)
        log.warning("%s", message)  # nothing optimises it: the run's outputs stand
    write_result(output_dir, outcome["status"], time.perf_counter() - start, metrics, outcome=outcome)
    if not name or not cfg.train or name not in metrics:
        return None
    return float(metrics[name])


class MissingMetricError(RuntimeError):
    """The metric an optimising sweeper asks for (optimized_metric) was never logged."""


def _sweeper_optimises() -> bool:
    """True in a multirun whose sweeper optimises the returned value (Optuna, Nevergrad, Ax)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    target = str(HydraConfig.get().sweeper.get("_target_", ""))
    return not target.endswith("BasicSweeper")


main = _hydra.entry(main, "train", "difflab-train")

if __name__ == "__main__":
    main()
