"""difflab-export: a trained model as a file that loads without running code.

    difflab-export ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt
    difflab-export ckpt=<run>/checkpoints/ema.pt out=model.safetensors

Writes the EMA weights and the config that rebuilds the network and schedule
(``difflab.training.export``); ``difflab-sample ckpt=<file>.safetensors`` and
``difflab-evaluate ckpt=<file>.safetensors`` take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from difflab.cli import _hydra, schema
from difflab.metrics.report import OutputWriteError
from difflab.training.checkpoint import CheckpointError
from difflab.training.export import export_safetensors

_hydra.setup()

FORMATS = ("safetensors",)


@dataclass
class ExportConfig:
    ckpt: str = MISSING
    format: str = "safetensors"
    out: Optional[str] = None
    task_name: str = "export"
    paths: schema.PathsConfig = MISSING

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise schema.ConfigError(f"format={self.format!r} is not allowed: expected {' or '.join(FORMATS)}.")


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    with _hydra.exit_on_user_error("difflab-export", (schema.ConfigError, CheckpointError, OutputWriteError)):
        OmegaConf.to_object(cfg).validate()
        path = export_safetensors(cfg.ckpt, cfg.out)
    print(f"safetensors: {path}")


main = _hydra.entry(main, "export", "difflab-export")

if __name__ == "__main__":
    main()
