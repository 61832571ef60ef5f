"""FID (and KID, IS, precision/recall, class coverage) during training, on the EMA weights.

Every `every_n_epochs` epochs (and at the end of fit) each rank draws its share of
`num_samples` images with the module's configured sampler (and guidance scale), from its
own noise; features are gathered from all ranks and every rank computes the same scores
against the cached reference features. Rank 0 sends them to the loggers; they are also
left in `trainer.callback_metrics` (for sweeps and checkpoint monitors) and `history`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from difflab.metrics.domain import DomainClassifierConfig
from difflab.metrics.evaluate import SampleEvaluator, balanced_labels
from difflab.metrics.features import Features
from difflab.training.callbacks import EveryNEpochs
from difflab.training.ema import ema_module
from difflab.training.inference_precision import resolve_inference
from difflab.training.precision import autocast_dtype, check_precision

log = logging.getLogger("difflab.train")


class FID(EveryNEpochs):
    """Sample-quality metrics every `every_n_epochs` epochs, logged as `<prefix>fid`, ...

    `extractor`: `domain` (offline classifier trained on the dataset, cached under
    `cache_dir`) or `inception` (torch-fidelity, `inception_weights` file). Reference
    features: the whole `ref_split` split, computed once and cached. `precision`: what the
    network samples in (`auto`: measured, see `inference_precision`; rank 0 decides for all).
    """

    def __init__(self, every_n_epochs: int = 10, num_samples: int = 256, batch_size: int = 256, seed: int = 4321,
                 extractor: str = "domain", cache_dir: str = ".cache", inception_weights: Optional[str] = None,
                 ref_split: str = "train", kid_subset_size: int = 1000, prefix: str = "eval/",
                 domain_steps: int = DomainClassifierConfig.steps, precision: str = "auto") -> None:
        super().__init__(every_n_epochs)
        if num_samples < 4 or batch_size < 1:
            raise ValueError(f"FID needs num_samples >= 4 (got {num_samples}) and batch_size >= 1")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.options = {"extractor": extractor, "cache_dir": cache_dir, "inception_weights": inception_weights,
                        "ref_split": ref_split, "kid_subset_size": kid_subset_size,
                        "domain": DomainClassifierConfig(steps=domain_steps)}
        self.prefix = prefix
        self.precision = check_precision(precision, "callbacks.fid.precision")
        self.sampling_precision: Optional[str] = None  # decided at the first evaluation
        self.evaluator: Optional[SampleEvaluator] = None
        self.history: list[dict[str, Any]] = []

    def _build(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> SampleEvaluator:
        # Rank 0 trains / computes and caches the extractor and reference first; the others
        # then load them from the cache instead of racing to write the same files.
        evaluator = None
        if trainer.is_global_zero:
            evaluator = SampleEvaluator(trainer.datamodule, device=pl_module.device, **self.options)
        trainer.strategy.barrier("difflab_fid_setup")
        return evaluator or SampleEvaluator(trainer.datamodule, device=pl_module.device, **self.options)

    def shard(self, world_size: int, rank: int) -> range:
        """The global sample indices this rank draws: equal shares (the last padded), so
        `all_gather` sees equal shapes; the padding is dropped after gathering."""
        per_rank = math.ceil(self.num_samples / world_size)
        return range(rank * per_rank, (rank + 1) * per_rank)

    @torch.no_grad()
    def run(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, tag: str) -> None:
        if trainer.fast_dev_run:
            return
        if self.evaluator is None:
            self.evaluator = self._build(trainer, pl_module)
        module = ema_module(trainer, pl_module)
        indices = self.shard(trainer.world_size, trainer.global_rank)
        num_classes = getattr(module, "label_classes", None)  # class labels, or captions of them (text)
        labels = None if num_classes is None else balanced_labels(len(indices), num_classes, indices.start)
        generator = torch.Generator(module.device).manual_seed(self.seed + 1_000_003 * trainer.global_rank)

        dtype = self._sampling_dtype(trainer, module, labels)

        def sample(n: int, cond: Optional[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
            # Autocast reaches the network's convolutions and matmuls; the sampler's own
            # element-wise updates stay in float32.
            with torch.autocast(module.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return module.sample(n, generator=gen, cond=None if cond is None else cond.to(module.device))

        local = self.evaluator.generate(sample, len(indices), batch_size=self.batch_size, labels=labels,
                                        generator=generator, keep_images=0).features
        fake = Features(*(self._gather(pl_module, t) for t in local))
        all_labels = None if labels is None else balanced_labels(self.num_samples, num_classes)
        scores = self.evaluator.score(fake, all_labels)
        metrics = {f"{self.prefix}{name}": value for name, value in scores.items()}
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        self.history.append({"tag": tag, "epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info("%s: %s", tag, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _sampling_dtype(self, trainer: "pl.Trainer", module: pl.LightningModule,
                        labels: Optional[torch.Tensor]) -> Optional[torch.dtype]:
        if self.sampling_precision is None:
            chosen = None
            if trainer.is_global_zero:
                shape = (min(self.batch_size, self.num_samples), *module.image_shape)
                cond = None if labels is None else labels[: shape[0]]
                if cond is not None and hasattr(getattr(module, "task", None), "conditions_for"):
                    cond = module.task.conditions_for(cond)  # a text model reads captions
                decision = resolve_inference(self.precision, module.device, module.net, shape,
                                             channels_last=bool(module.hparams.get("channels_last", False)),
                                             cache_dir=self.options["cache_dir"], cond=cond)
                chosen = decision.precision
                log.info("FID sampling: %s", decision.summary())
            self.sampling_precision = trainer.strategy.broadcast(chosen, src=0)
        return autocast_dtype(self.sampling_precision)

    def _gather(self, pl_module: pl.LightningModule, local: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if local is None:
            return None
        gathered = pl_module.all_gather(local.to(pl_module.device))
        if gathered.dim() == local.dim() + 1:  # [world, per_rank, D] -> rank-major samples
            gathered = gathered.reshape(-1, *local.shape[1:])
        return gathered[: self.num_samples].float().cpu()

