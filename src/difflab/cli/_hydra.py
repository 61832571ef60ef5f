"""What every difflab entry point shares: where the configs are, the schemas, resolvers."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from difflab.cli import schema

_REPO_CONF = Path(__file__).resolve().parents[3] / "conf"


def config_dir() -> str:
    """The conf/ folder: $DIFFLAB_CONFIG_DIR, else the one beside src/ in this checkout."""
    path = Path(os.environ.get("DIFFLAB_CONFIG_DIR", _REPO_CONF))
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"difflab's configs are not at {path}. Run from a checkout of difflab "
            "(pip install -e .) or set DIFFLAB_CONFIG_DIR to its conf/ folder."
        )
    return str(path)


_RUN_UID = secrets.token_hex(3)


def setup() -> None:
    """Register schemas and resolvers once per process (idempotent)."""
    schema.register()
    if not OmegaConf.has_resolver("difflab.uid"):
        # One random suffix per process: two runs started in the same second differ.
        OmegaConf.register_new_resolver("difflab.uid", lambda: _RUN_UID, use_cache=True)


def plain(cfg: Any) -> Any:
    """A resolved config as plain Python containers (safe to store in a checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
