"""difflab-sample's prompts for a text-to-image run (experiment=mnist5k_text): what each
image is drawn from, as the condition dict the run's text encoder reads."""

from __future__ import annotations

from typing import Any, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.cli import schema
from difflab.training.tasks import TextToImage


def text_task(run_config: dict[str, Any]) -> Optional[TextToImage]:
    """The run's TextToImage task (its captions and tokenizer), or None for other runs."""
    task = run_config.get("task")
    if not task or not str(task.get("_target_", "")).endswith("TextToImage"):
        return None
    return instantiate(task)


def prompt_conditions(cfg: DictConfig, task: Optional[TextToImage], ckpt: str, nrow: int
                      ) -> tuple[Optional[dict[str, torch.Tensor]], Optional[list[str]], int, int]:
    """(condition dict, the prompt of each image, n, nrow) for a text-to-image run.

    `prompt=`: every image from it; `prompts=[...]`: one row of `nrow` images per prompt;
    `class_label=K` or neither: captions of class K, or one class per row, from the training
    templates. Other runs: (None, None, n, nrow), and prompts are refused."""
    if task is None:
        if cfg.prompt is not None or cfg.prompts:
            raise schema.ConfigError(f"prompt= and prompts= need a text-to-image model (experiment=mnist5k_text); "
                                     f"{ckpt} was not trained on captions.")
        return None, None, cfg.n, nrow
    n = cfg.n
    if cfg.prompts:
        texts = [p for p in cfg.prompts for _ in range(nrow)]
        n = len(texts)
    elif cfg.prompt is not None:
        texts = [cfg.prompt] * n
    else:
        if cfg.class_label is not None and not 0 <= cfg.class_label < task.num_classes:
            raise schema.ConfigError(f"class_label={cfg.class_label} is not allowed: expected an integer in "
                                     f"[0, {task.num_classes - 1}] for this model.")
        labels = torch.full((n,), cfg.class_label) if cfg.class_label is not None else \
            (torch.arange(n) // nrow) % task.num_classes
        texts = task.captions.sample(labels, "train", torch.Generator().manual_seed(cfg.seed))
    return task.from_prompts(texts, warn=True), texts, n, nrow
