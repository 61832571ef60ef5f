"""Structured-config schemas behind the Hydra config groups.

Each group's YAML options start from one of these dataclasses, so a mistyped key is an
error at composition ("Key 'lrr' not in 'OptimConfig'"), a wrong type is an error at
composition, and `validate()` checks value ranges right after composition, naming the
full key (`sampler.eta`). Only the CLI layer knows these exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra_zen import builds
from omegaconf import MISSING, DictConfig, OmegaConf

from difflab.diffusion import density as densities
from difflab.diffusion import weighting as weightings
from difflab.diffusion.consistency import ConsistencyTuning
from difflab.diffusion.parameterization import OUTPUTS, native_output
from difflab.diffusion.samplers import ConsistencySampler
from difflab.diffusion.restoration import METHODS as TRAINING_FREE_METHODS
from difflab.diffusion.schedule import PATHS
from difflab.models.autoencoder import AutoencoderKL
from difflab.training.autoencoder import AutoencoderModule
from difflab.training.first_stage import first_stage_spec
from difflab.training import precision
from difflab.training.tasks import TASK_METHODS

RESTORATION_METHODS = TRAINING_FREE_METHODS + tuple(TASK_METHODS.values())
STAGES = ("diffusion", "autoencoder")

# Schemas derived from the constructors they configure (design.md): every argument, typed,
# and nothing else; the constructors check their own ranges (`build_checked`).
AutoencoderSchema = builds(AutoencoderKL, populate_full_signature=True)
AutoencoderLossSchema = builds(AutoencoderModule, populate_full_signature=True, zen_partial=True,
                               zen_exclude=("net", "run_config", "channels_last", "lr", "betas", "weight_decay",
                                            "warmup_steps", "lr_schedule", "min_lr_ratio"))
FirstStageSchema = builds(first_stage_spec, populate_full_signature=True, zen_dataclass={"cls_name": "FirstStage"})
DENSITY_SCHEMAS = {name: builds(cls, populate_full_signature=True) for name, cls in densities.DENSITIES.items()}
ConsistencySamplerSchema = builds(ConsistencySampler, populate_full_signature=True)
ConsistencySchema = builds(ConsistencyTuning, populate_full_signature=True)
WEIGHTING_SCHEMAS = {name: builds(cls, populate_full_signature=True) for name, cls in weightings.WEIGHTINGS.items()}


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the key."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}.")


@dataclass
class DataConfig:
    _target_: str = "difflab.data.ImageDataModule"
    name: str = "mnist5k"
    data_dir: str = "data"
    path: Optional[str] = None
    image_size: Optional[int] = None
    channels: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    val_fraction: float = 0.1
    hflip: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    seed: int = 0
    download: bool = True
    drop_last: bool = True

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        _check(0.0 <= self.val_fraction < 1.0, f"{key}.val_fraction", self.val_fraction, "a number in [0, 1)")
        _check(self.num_workers >= 0, f"{key}.num_workers", self.num_workers, "an integer >= 0")
        _check(self.channels in (None, 1, 3), f"{key}.channels", self.channels, "null, 1 or 3")
        _check(self.image_size is None or self.image_size >= 4, f"{key}.image_size", self.image_size,
               "null (native size) or an integer >= 4")


@dataclass
class UNetConfig:
    _target_: str = "difflab.models.UNet"
    in_channels: Optional[int] = None  # null: taken from the data
    out_channels: Optional[int] = None
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 1
    attention_levels: list[int] = field(default_factory=lambda: [1])
    mid_attention: bool = True
    attention_head_dim: int = 32
    dropout: float = 0.0
    num_groups: int = 8
    num_classes: Optional[int] = None
    image_size: Optional[int] = None  # null: taken from the data
    time_embed_mult: int = 4
    gradient_checkpointing: bool = False
    conditioner: Any = None  # a difflab.models.conditioning.Conditioner node (SR3, Palette), or null
    cross_attention_levels: list[int] = field(default_factory=list)  # levels attending to condition tokens
    patch_size: int = 1  # p > 1: level 0 runs on p x p patches folded into channels (pixel unshuffle)

    def validate(self, key: str) -> None:
        _check(self.base_channels >= 1, f"{key}.base_channels", self.base_channels, "an integer >= 1")
        _check(len(self.channel_mults) >= 1 and all(m >= 1 for m in self.channel_mults),
               f"{key}.channel_mults", self.channel_mults, "a non-empty list of integers >= 1")
        _check(self.num_res_blocks >= 1, f"{key}.num_res_blocks", self.num_res_blocks, "an integer >= 1")
        _check(self.patch_size >= 1, f"{key}.patch_size", self.patch_size, "an integer >= 1")
        levels = range(len(self.channel_mults))
        for name in ("attention_levels", "cross_attention_levels"):
            _check(all(lv in levels for lv in getattr(self, name)), f"{key}.{name}", getattr(self, name),
                   f"level indices in 0..{len(self.channel_mults) - 1}")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", self.dropout, "a number in [0, 1)")


@dataclass
class ScheduleConfig:
    _target_: str = "difflab.diffusion.schedule.NoiseSchedule"
    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    sigmoid_start: float = -3.0
    sigmoid_end: float = 3.0
    sigmoid_tau: float = 1.0
    max_beta: float = 0.999
    sigma_min: float = 0.002  # flow / edm: the table's lowest VE noise level
    sigma_max: float = 80.0  # flow / edm: the table's highest
    sigma_data: Optional[float] = None  # the data's std (EDM); null: measured by difflab-train

    def validate(self, key: str) -> None:
        _check(self.kind in PATHS, f"{key}.kind", self.kind, ", ".join(PATHS))
        _check(0.0 < self.sigma_min < self.sigma_max, f"{key}.sigma_min/sigma_max", (self.sigma_min, self.sigma_max),
               "0 < sigma_min < sigma_max")
        _check(self.sigma_data is None or self.sigma_data > 0, f"{key}.sigma_data", self.sigma_data,
               "a number > 0 or null (measured from the training data)")
        _check(self.num_timesteps >= 2, f"{key}.num_timesteps", self.num_timesteps, "an integer >= 2")
        _check(0.0 < self.beta_start < self.beta_end < 1.0, f"{key}.beta_start/beta_end",
               (self.beta_start, self.beta_end), "0 < beta_start < beta_end < 1")
        _check(0.0 < self.max_beta < 1.0, f"{key}.max_beta", self.max_beta, "a number in (0, 1)")
        _check(self.sigmoid_start < self.sigmoid_end, f"{key}.sigmoid_start/sigmoid_end",
               (self.sigmoid_start, self.sigmoid_end), "sigmoid_start < sigmoid_end")
        _check(self.sigmoid_tau > 0, f"{key}.sigmoid_tau", self.sigmoid_tau, "a number > 0")


@dataclass
class ObjectiveConfig:
    prediction: str = "eps"  # or auto: the path's own output (resolve_objective)

    def validate(self, key: str) -> None:
        _check(self.prediction in (*OUTPUTS, "auto"), f"{key}.prediction", self.prediction,
               ", ".join((*OUTPUTS, "auto")))


def _check_steps(key: str, steps: Optional[int], schedule: ScheduleConfig) -> None:
    T = schedule.num_timesteps
    _check(steps is None or 1 <= steps <= T, f"{key}.steps", steps,
           f"an integer in [1, schedule.num_timesteps={T}]")


@dataclass
class DDPMSamplerConfig:
    _target_: str = "difflab.diffusion.samplers.DDPMSampler"
    steps: Optional[int] = None  # null: all T steps
    variance: str = "posterior"
    clip_denoised: bool = True
    spacing: str = "leading"

    def validate(self, key: str, schedule: ScheduleConfig) -> None:
        _check_steps(key, self.steps, schedule)
        _check(self.variance in ("posterior", "beta"), f"{key}.variance", self.variance, "posterior or beta")
        _check(self.spacing in ("leading", "trailing", "linspace"), f"{key}.spacing", self.spacing,
               "leading, trailing or linspace")


@dataclass
class DDIMSamplerConfig:
    _target_: str = "difflab.diffusion.samplers.DDIMSampler"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "leading"
    clip_denoised: bool = True

    def validate(self, key: str, schedule: ScheduleConfig) -> None:
        _check_steps(key, self.steps, schedule)
        _check(0.0 <= self.eta <= 1.0, f"{key}.eta", self.eta, "a number in [0, 1]")
        _check(self.spacing in ("leading", "trailing", "linspace"), f"{key}.spacing", self.spacing,
               "leading, trailing or linspace")


@dataclass
class KarrasSamplerConfig:
    """Euler / Heun (EDM); the sampler's constructor checks the values (see validate)."""
    _target_: str = "difflab.diffusion.samplers.HeunSampler"
    steps: int = 18
    rho: float = 7.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    clip_denoised: bool = False


@dataclass
class DPMSolverConfig:
    _target_: str = "difflab.diffusion.samplers.DPMSolverPPSampler"
    steps: int = 20
    order: int = 2
    lower_order_final: bool = True
    spacing: str = "logsnr"
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    clip_denoised: bool = False


@dataclass
class PCSamplerConfig:
    _target_: str = "difflab.diffusion.samplers.PCSampler"
    steps: int = 1000
    corrector_steps: int = 1
    snr: float = 0.16
    predictor: str = "reverse_diffusion"
    spacing: str = "leading"


@dataclass
class GuidanceConfig:
    scale: Optional[float] = None

    def validate(self, key: str) -> None:
        _check(self.scale is None or self.scale >= 0, f"{key}.scale", self.scale, "null or a number >= 0")


@dataclass
class TrainerConfig:
    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "auto"  # auto: measured per machine (difflab.training.precision)
    max_epochs: Optional[int] = None
    min_epochs: Optional[int] = None
    max_steps: int = -1
    max_time: Optional[str] = None
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: Optional[int] = 1
    val_check_interval: Optional[float] = None
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    deterministic: Any = False
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    enable_checkpointing: bool = False  # checkpoints come from callbacks.last_checkpoint
    fast_dev_run: Any = False
    overfit_batches: float = 0.0
    detect_anomaly: bool = False
    use_distributed_sampler: bool = True
    profiler: Optional[str] = None
    default_root_dir: Optional[str] = None  # null: the run directory
    plugins: Any = None  # e.g. trainer=slurm's SLURM environment (requeue signal)
    # difflab's, not Lightning's: shorten max_epochs to what fits in this many minutes here (measured)
    budget_minutes: Optional[float] = None

    def validate(self, key: str) -> None:
        _check(self.max_epochs is None or self.max_epochs >= 1, f"{key}.max_epochs", self.max_epochs,
               "null or an integer >= 1")
        _check(self.accumulate_grad_batches >= 1, f"{key}.accumulate_grad_batches",
               self.accumulate_grad_batches, "an integer >= 1")
        _check(self.gradient_clip_val is None or self.gradient_clip_val > 0, f"{key}.gradient_clip_val",
               self.gradient_clip_val, "null or a number > 0")
        _check(self.budget_minutes is None or self.budget_minutes > 0, f"{key}.budget_minutes",
               self.budget_minutes, "null (train max_epochs) or a number of minutes > 0")
        limit = _max_time_s(self.max_time)
        if self.budget_minutes is not None and limit is not None and 60 * self.budget_minutes > limit:
            raise ConfigError(f"{key}.budget_minutes={self.budget_minutes:g} is longer than {key}.max_time="
                              f"{self.max_time} ({limit / 60:g} min), the hard stop that would cut the planned run "
                              f"short: lower {key}.budget_minutes or raise {key}.max_time (null: no hard stop).")


def _max_time_s(max_time: Optional[str]) -> Optional[float]:
    """Lightning's "DD:HH:MM:SS" in seconds (None: no limit, or a form this check does not read)."""
    parts = str(max_time).split(":") if max_time is not None else []
    if len(parts) != 4 or not all(part.strip().isdigit() for part in parts):
        return None
    days, hours, minutes, seconds = map(int, parts)
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def validate(self, key: str) -> None:
        _check(self.lr > 0, f"{key}.lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.lr_schedule in ("constant", "cosine"), f"{key}.lr_schedule", self.lr_schedule,
               "constant or cosine")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{key}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: Any = MISSING  # each model option starts from its own schema (UNetConfig, AutoencoderSchema)
    first_stage: Any = None  # a FirstStageSchema node: identity | kl
    text_encoder: Any = None  # text-to-image: the text encoder node the conditioner interpolates
    schedule: ScheduleConfig = MISSING
    objective: ObjectiveConfig = MISSING
    density: Any = None  # a DENSITY_SCHEMAS node: uniform | lognormal | logit_normal | last
    weighting: Any = None  # a WEIGHTING_SCHEMAS node: simplified | min_snr | soft_min_snr | p2 | edm | uncertainty
    sampler: Any = MISSING
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    trainer: TrainerConfig = MISSING
    logger: Optional[dict[str, Any]] = None
    callbacks: Optional[dict[str, Any]] = None
    paths: PathsConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    task_name: str = "train"
    tags: list[str] = field(default_factory=list)
    seed: Optional[int] = 42
    ckpt_path: Optional[str] = None
    channels_last: Any = "auto"  # auto | true | false
    compile: bool = False
    float32_matmul_precision: str = "high"
    train: bool = True
    stage: str = "diffusion"
    autoencoder_loss: Any = None  # stage=autoencoder: an AutoencoderLossSchema node
    p_uncond: float = 0.1
    task: Any = None  # a difflab.training.tasks node that builds each batch's conditions, or null
    consistency: Any = None  # a ConsistencySchema node: consistency tuning (ECT) of init_from's model
    init_from: Optional[str] = None  # the trained model a consistency-tuning run starts from (ema.pt / last.ckpt)
    resume: Optional[str] = None  # auto: go on from the run directory's own last.ckpt if it has one
    nonfinite: str = "stop"  # a NaN / infinite training loss: stop (before the update) | skip (that update)
    optimized_metric: Optional[str] = "val/loss"


@dataclass
class RestorationKnobs:
    """The degradation and the restoration knobs shared by difflab-sample and difflab-evaluate."""

    mask: str = "center"
    mask_white: str = "hole"
    box: Optional[int] = None
    factor: int = 4
    jump_length: int = 5
    jump_n_sample: int = 5
    ilvr_until: float = 1.0
    travel_length: int = 5
    travel_repeat: int = 1
    reconstruction_weight: float = 8.0

    def validate_restoration(self) -> None:
        _check(self.jump_length >= 1, "jump_length", self.jump_length, "an integer >= 1")
        _check(self.jump_n_sample >= 1, "jump_n_sample", self.jump_n_sample, "an integer >= 1 (1: no resampling)")
        _check(0.0 <= self.ilvr_until <= 1.0, "ilvr_until", self.ilvr_until, "a number in [0, 1]")
        _check(self.travel_length >= 1, "travel_length", self.travel_length, "an integer >= 1")
        _check(self.travel_repeat >= 1, "travel_repeat", self.travel_repeat, "an integer >= 1 (1: no time-travel)")
        _check(self.reconstruction_weight > 0, "reconstruction_weight", self.reconstruction_weight, "a number > 0")
        _check(self.factor >= 1, "factor", self.factor, "an integer >= 1")
        _check(self.mask_white in ("hole", "keep"), "mask_white", self.mask_white, "hole or keep")
        _check(self.box is None or self.box >= 1, "box", self.box, "null or an integer >= 1")


@dataclass
class SampleConfig(RestorationKnobs):
    ckpt: str = MISSING
    sampler: Any = None
    paths: PathsConfig = MISSING
    n: int = 64
    nrow: Optional[int] = None
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    progress: bool = True
    task_name: str = "sample"
    class_label: Optional[int] = None
    prompt: Optional[str] = None
    prompts: Optional[list[str]] = None
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    mode: str = "sample"
    precision: str = "auto"
    trajectory: bool = False
    columns: int = 9
    input: str = "val"
    method: str = "repaint"
    samples_per_input: int = 1

    def validate(self, key: str = "") -> None:
        _check(self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.nrow is None or self.nrow >= 1, "nrow", self.nrow, "null or an integer >= 1")
        self.guidance.validate("guidance")
        _check(self.mode in ("sample", "inversion", "interpolate", "forward", "inpaint", "superres"), "mode",
               self.mode, "sample, inversion, interpolate, forward, inpaint or superres")
        _check(self.columns >= 2, "columns", self.columns, "an integer >= 2")
        _check(self.method in RESTORATION_METHODS, "method", self.method, ", ".join(RESTORATION_METHODS))
        precision.check_precision(self.precision, "precision")
        _check(self.samples_per_input >= 1, "samples_per_input", self.samples_per_input, "an integer >= 1")
        self.validate_restoration()
        if self.prompts is not None and not [p for p in self.prompts if str(p).strip()]:
            raise ConfigError("prompts=[] has no prompt: give at least one, e.g. prompts='[a seven,the digit 3]', "
                              "or leave prompts unset (one class per row, captioned from the training templates)")
        if self.prompt is not None and self.prompts:
            raise ConfigError("set prompt= (every image) or prompts=[...] (one row each), not both")
        if (self.prompt is not None or self.prompts) and self.class_label is not None:
            raise ConfigError("class_label and prompt(s) both choose what to draw: set one of them")


@dataclass
class MetricsConfig:
    extractor: str = "domain"
    inception_weights: Optional[str] = None
    ref_split: str = "train"
    ref_n: Optional[int] = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    domain_steps: int = 200
    min_domain_accuracy: Optional[float] = None

    def validate(self, key: str) -> None:
        _check(self.extractor in ("domain", "inception"), f"{key}.extractor", self.extractor, "domain or inception")
        _check(self.ref_split in ("train", "val"), f"{key}.ref_split", self.ref_split, "train or val")
        _check(self.ref_n is None or self.ref_n >= 2, f"{key}.ref_n", self.ref_n, "null or an integer >= 2")
        _check(self.kid_subsets >= 1, f"{key}.kid_subsets", self.kid_subsets, "an integer >= 1")
        _check(self.kid_subset_size >= 2, f"{key}.kid_subset_size", self.kid_subset_size, "an integer >= 2")
        _check(self.pr_k >= 1, f"{key}.pr_k", self.pr_k, "an integer >= 1")
        _check(self.domain_steps >= 1, f"{key}.domain_steps", self.domain_steps, "an integer >= 1")


@dataclass
class EvalConfig(RestorationKnobs):
    ckpt: str = MISSING
    paths: PathsConfig = MISSING
    task_name: str = "evaluate"
    n: int = 500
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    samplers: list[str] = field(default_factory=lambda: ["ddim", "dpmpp"])
    sampler_args: dict[str, Any] = field(default_factory=dict)
    steps: list[int] = field(default_factory=lambda: [10, 25, 50])
    guidance_scales: list[float] = field(default_factory=lambda: [0.0, 1.0, 3.0])
    prompt_templates: str = "train"
    grid_images: int = 64
    real_baseline: bool = True
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    task: str = "sample"
    precision: str = "auto"
    trained_ckpts: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["replacement", "repaint", "ddnm"])
    baselines: bool = True
    label_ceiling: bool = True
    diversity_inputs: int = 8
    diversity_samples: int = 4

    def validate(self, key: str = "") -> None:
        _check(self.n >= 4, "n", self.n, "an integer >= 4")
        _check(self.task in ("sample", "inpaint", "superres"), "task", self.task, "sample, inpaint or superres")
        precision.check_precision(self.precision, "precision")
        _check(len(self.methods) >= 1 and all(m in RESTORATION_METHODS for m in self.methods), "methods",
               self.methods, "a non-empty list of " + ", ".join(RESTORATION_METHODS))
        _check(self.diversity_inputs >= 0, "diversity_inputs", self.diversity_inputs, "an integer >= 0")
        _check(self.diversity_samples >= 0, "diversity_samples", self.diversity_samples, "an integer >= 0")
        self.validate_restoration()
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(len(self.samplers) >= 1, "samplers", self.samplers, "a non-empty list of conf/sampler/ names")
        _check(len(self.steps) >= 1 and all(s >= 1 for s in self.steps), "steps", self.steps,
               "a non-empty list of integers >= 1")
        _check(all(g >= 0 for g in self.guidance_scales), "guidance_scales", self.guidance_scales,
               "a list of numbers >= 0")
        _check(self.prompt_templates in ("train", "held_out"), "prompt_templates", self.prompt_templates,
               "train or held_out")
        _check(self.grid_images >= 0, "grid_images", self.grid_images, "an integer >= 0")
        self.metrics.validate("metrics")


@dataclass
class AblateEvalConfig:
    n: int = 500
    batch_size: int = 250
    sampler: str = "ddim"
    steps: int = 25
    seed: int = 0
    grid_images: int = 64
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self, key: str) -> None:
        _check(self.n >= 4, f"{key}.n", self.n, "an integer >= 4")
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.steps >= 1, f"{key}.steps", self.steps, "an integer >= 1")
        _check(self.grid_images >= 0, f"{key}.grid_images", self.grid_images, "an integer >= 0")
        self.metrics.validate(f"{key}.metrics")


@dataclass
class EmaSweepConfig(EvalConfig):
    """difflab-ema-sweep: the evaluation grid of difflab-evaluate, once per reconstructed EMA length."""

    ckpt: str = "-"  # set per EMA length by the sweep
    task_name: str = "ema_sweep"
    ckpt_dir: str = MISSING
    stds: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.08, 0.1, 0.15, 0.2])
    step: Optional[int] = None
    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    steps: list[int] = field(default_factory=lambda: [25])
    guidance_scales: list[float] = field(default_factory=lambda: [1.0])
    real_baseline: bool = False

    def validate(self, key: str = "") -> None:
        super().validate(key)
        _check(len(self.stds) >= 1 and all(0 < s < 12 ** -0.5 for s in self.stds), "stds", self.stds,
               "a non-empty list of EMA lengths (relative stds) in (0, 0.2887)")
        _check(self.step is None or self.step >= 1, "step", self.step, "null (the last snapshot) or an integer >= 1")


@dataclass
class AblateConfig:
    paths: PathsConfig = MISSING
    task_name: str = "ablate"
    variants: dict[str, list[str]] = field(default_factory=dict)
    only: Optional[list[str]] = None
    base: list[str] = field(default_factory=list)
    budget: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    device: str = "auto"
    resume: Optional[str] = None
    eval: AblateEvalConfig = field(default_factory=AblateEvalConfig)

    def validate(self, key: str = "") -> None:
        _check(len(self.variants) >= 1, "variants", self.variants, "at least one name: [train overrides]")
        for name in self.variants:
            _check(name.replace("-", "").replace("_", "").isalnum(), "variants", name,
                   "names of letters, digits, - and _ (they name directories)")
        unknown = sorted(set(self.only or []) - set(self.variants))
        _check(not unknown, "only", self.only, f"names from variants ({', '.join(self.variants)})")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
               "a non-empty list of distinct integers")
        for option in ("seed=", "hydra.run.dir=", "paths.output_dir="):
            for source, overrides in (("base", self.base), ("budget", self.budget),
                                      *((f"variants.{n}", o) for n, o in self.variants.items())):
                _check(not any(o.startswith(option) for o in overrides), source, overrides,
                       f"no {option}... (difflab-ablate sets it for every run)")
        self.eval.validate("eval")


def register() -> None:
    """Put the schemas where the YAML options' defaults lists find them."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="ablate_schema", node=AblateConfig)
    cs.store(name="ema_sweep_schema", node=EmaSweepConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="model", name="unet_schema", node=UNetConfig)
    cs.store(group="model", name="autoencoder_schema", node=AutoencoderSchema)
    cs.store(group="autoencoder_loss", name="schema", node=AutoencoderLossSchema)
    cs.store(group="first_stage", name="schema", node=FirstStageSchema)
    cs.store(group="schedule", name="schema", node=ScheduleConfig)
    cs.store(group="objective", name="schema", node=ObjectiveConfig)
    for name, node in DENSITY_SCHEMAS.items():
        cs.store(group="density", name=f"{name}_schema", node=node)
    for name, node in WEIGHTING_SCHEMAS.items():
        cs.store(group="weighting", name=f"{name}_schema", node=node)
    cs.store(group="sampler", name="ddpm_schema", node=DDPMSamplerConfig)
    cs.store(group="sampler", name="ddim_schema", node=DDIMSamplerConfig)
    cs.store(group="sampler", name="karras_schema", node=KarrasSamplerConfig)
    cs.store(group="sampler", name="dpmpp_schema", node=DPMSolverConfig)
    cs.store(group="sampler", name="pc_schema", node=PCSamplerConfig)
    cs.store(group="sampler", name="consistency_schema", node=ConsistencySamplerSchema)
    cs.store(group="consistency", name="schema", node=ConsistencySchema)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="guidance", name="schema", node=GuidanceConfig)
    cs.store(group="paths", name="schema", node=PathsConfig)


def resolve_objective(cfg: DictConfig) -> None:
    """``objective=auto`` becomes the path's own output (velocity on flow, edm on edm, v on the
    VP schedules: ``native_output``), written into `cfg` so config.yaml and checkpoints hold it."""
    if cfg.objective.prediction == "auto":
        OmegaConf.update(cfg, "objective.prediction", native_output(cfg.schedule.kind))


def validate(cfg: DictConfig) -> None:
    """Check value ranges of every schema-backed node; raise ConfigError naming the key."""
    def obj(node: Any) -> Any:
        return OmegaConf.to_object(node) if isinstance(node, DictConfig) else node

    schedule = obj(cfg.schedule)
    for key in ("data", "model", "schedule", "objective", "trainer", "optim", "guidance"):
        node = obj(cfg[key])
        if hasattr(node, "validate"):
            node.validate(key)
    _check(0.0 <= cfg.p_uncond < 1.0, "p_uncond", cfg.p_uncond, "a number in [0, 1)")
    _check(cfg.get("nonfinite", "stop") in ("stop", "skip"), "nonfinite", cfg.get("nonfinite"), "stop or skip")
    _check(cfg.get("resume") in (None, "auto"), "resume", cfg.get("resume"), "null or auto")
    if cfg.objective.prediction == "velocity" and schedule.kind != "flow":
        raise ConfigError(f"objective=velocity is the rectified-flow field and needs schedule=flow, not "
                          f"schedule={schedule.kind}: use objective=auto (v on this path), or v, eps, x0, edm.")
    for key in ("density", "weighting", "consistency"):  # their constructors check their own ranges
        if cfg.get(key) is not None:
            build_checked(key, cfg[key])
    _check(cfg.get("stage", "diffusion") in STAGES, "stage", cfg.get("stage"), " or ".join(STAGES))
    model_is_unet = isinstance(obj(cfg.model), UNetConfig)
    if (cfg.get("stage", "diffusion") == "diffusion") != model_is_unet:
        raise ConfigError(f"stage={cfg.stage} does not train model={cfg.model._target_}: a diffusion run trains a "
                          "U-Net (model=unet_*), an autoencoder run model=autoencoder_kl "
                          "(use experiment=mnist5k_autoencoder for the latter).")
    try:
        precision.check_precision(cfg.trainer.precision)
        precision.check_layout(cfg.channels_last)
    except precision.PrecisionError as error:
        raise ConfigError(str(error)) from None
    if cfg.guidance.scale is not None and cfg.model.get("num_classes") is None and not cfg.model.get("conditioner"):
        raise ConfigError("guidance.scale is set but the model is unconditional: set model.num_classes "
                          "(and train with p_uncond > 0), or use guidance=none.")
    sampler = obj(cfg.sampler)
    if hasattr(sampler, "validate"):
        sampler.validate("sampler", schedule)
    check_sampler(cfg.sampler, schedule.num_timesteps)


def build_checked(key: str, node: Any, **kwargs: Any) -> Any:
    """Instantiate `node` (and call the partial it makes with `kwargs`); a constructor's own
    ValueError or TypeError becomes a ConfigError naming `key`."""
    from hydra.utils import instantiate  # the CLI layer owns Hydra

    try:
        built = instantiate(node, _convert_="all")
        return built(**kwargs) if kwargs else built  # a `_partial_` node gets the objects it lacks
    except Exception as error:  # noqa: BLE001 - Hydra wraps the constructor's ValueError
        cause = error.__cause__ or error
        if not isinstance(cause, (ValueError, TypeError)):
            raise
        raise ConfigError(f"{key}: {cause}") from error


def check_sampler(node: Any, num_timesteps: int) -> None:
    """Build the sampler once: its constructor checks its own knobs (and names them); the
    step count of a discrete-time sampler must also fit the schedule's T."""
    sampler = build_checked("sampler", node)
    steps = getattr(sampler, "steps", None)
    discrete = hasattr(sampler, "spacing") and getattr(sampler, "spacing") in ("leading", "trailing", "linspace")
    if discrete and steps is not None and not 1 <= steps <= num_timesteps:
        raise ConfigError(f"sampler.steps={steps} is not allowed: expected an integer in "
                          f"[1, schedule.num_timesteps={num_timesteps}].")
