"""The on-disk cache of domain classifiers and reference features: keyed files, atomic
writes, and a damaged or foreign file recomputed instead of trusted."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from difflab.metrics.report import replacing

log = logging.getLogger("difflab.metrics")


def dataset_key(datamodule: Any) -> dict[str, Any]:
    """What identifies a dataset's images and its train/val split."""
    return {
        "dataset": datamodule.name,
        "path": str(Path(datamodule.path).resolve()) if getattr(datamodule, "path", None) else None,
        "image_size": datamodule.image_size,
        "channels": datamodule.channels,
        "val_fraction": datamodule.val_fraction,
        "split_seed": datamodule.seed,
    }


def cache_name(prefix: str, key: dict[str, Any]) -> str:
    """A readable file stem with a digest of the whole key."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{prefix}-{key['dataset']}-{key['image_size']}px-{digest}"


def load(path: Path, key: dict[str, Any], what: str) -> Optional[dict[str, Any]]:
    """The payload saved under `path` for exactly this `key`, else None (recompute)."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache file is recomputed, never trusted
        log.warning("ignoring unreadable %s cache %s (%s); recomputing", what, path, error)
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        log.warning("%s cache %s was written for another key; recomputing", what, path)
        return None
    return payload


def save(path: Path, key: dict[str, Any], **payload: Any) -> None:
    """Write beside the target and rename over it: readers (other ranks, parallel jobs)
    never see a half-written file."""
    with replacing(path) as tmp:
        torch.save({"key": key, **payload}, tmp)
