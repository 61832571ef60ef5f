"""Safe artefacts: a trained model as a safetensors file that rebuilds itself.

    difflab-export ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt format=safetensors

The file holds the EMA network weights (``net.*``), a latent model's frozen first stage
(``first_stage.*``), and in its metadata the run config that rebuilds the network and schedule
(JSON), so difflab-sample and difflab-evaluate take it like an ``ema.pt``. Safetensors files
hold tensors and strings only: reading one runs no code (``training.checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from safetensors.torch import save_file

from difflab.metrics.report import replacing
from difflab.training.checkpoint import SAFETENSORS_FORMAT, read_checkpoint

__all__ = ["export_safetensors"]


def export_safetensors(ckpt: str | Path, out: Optional[str | Path] = None) -> Path:
    """Write ``ckpt``'s (a last.ckpt or ema.pt) EMA weights and run config to ``out``
    (default: beside it, ``<name>.safetensors``); written to a temporary name and renamed, so
    an interrupted export never leaves a broken file. Returns the path written."""
    ckpt = Path(ckpt)
    run_config, weights, first_stage = read_checkpoint(ckpt)
    out = Path(out) if out is not None else ckpt.with_suffix(".safetensors")
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    tensors.update({f"first_stage.{k}": v.detach().cpu().contiguous() for k, v in first_stage.items()})
    metadata: dict[str, Any] = {"format": SAFETENSORS_FORMAT, "run_config": json.dumps(run_config),
                                "source": ckpt.name}
    with replacing(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out
