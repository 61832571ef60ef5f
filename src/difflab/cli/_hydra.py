"""What every difflab entry point shares: where the configs are, the schemas, resolvers."""

from __future__ import annotations

import os
import secrets
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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


def launch_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """A name that every process of one multi-process launch computes alike, or None.

    `DIFFLAB_RUN_ID` if set; a SLURM step of several tasks: `slurm-<job>[_<array task>]-<step>`;
    torchrun: `torchrun-<rdzv id>` (multi-node torchrun defaults `--rdzv-id` to "none": pass
    one, or set DIFFLAB_RUN_ID). Lightning's own DDP launcher needs none of this: it hands
    rank 0's run directory to the processes it starts.
    """
    env = os.environ if env is None else env
    if env.get("DIFFLAB_RUN_ID"):
        return env["DIFFLAB_RUN_ID"]
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        array = f"_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_TASK_ID") else ""
        return f"slurm-{env['SLURM_JOB_ID']}{array}-{env.get('SLURM_STEP_ID', '0')}"
    run = env.get("TORCHELASTIC_RUN_ID")
    if run and run != "none" and int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return f"torchrun-{run}"
    return None


def run_name(env: Optional[Mapping[str, str]] = None) -> str:
    """A run directory's name: `<date>_<time>_<random>` (two runs started in the same second
    differ), or the launch id when several processes of one launch must share the directory."""
    return launch_id(env) or f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{_RUN_UID}"


def setup() -> None:
    """Register schemas and resolvers once per process (idempotent)."""
    schema.register()
    if not OmegaConf.has_resolver("difflab.run_name"):
        OmegaConf.register_new_resolver("difflab.run_name", lambda: run_name(), use_cache=True)


def quote(value: Any) -> str:
    """A Hydra override value that survives any path or string: single-quoted, escaped."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def plain(cfg: Any) -> Any:
    """A resolved config as plain Python containers (safe to store in a checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


class CheckOutputDir(Callback):
    """Hydra callback: before a run (or sweep) starts, its directory must be creatable and writable.
    Otherwise one line says which directory and what to do; Hydra's own attempt would end in a
    traceback. Nothing is written anywhere else."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")

    @staticmethod
    def _check(path: Path, key: str) -> None:
        probe = path / f".difflab-write-probe-{os.getpid()}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            sys.exit(f"difflab: cannot write the run directory {path} ({error.strerror or error}): point {key} "
                     "(or paths.log_dir) at a writable folder, or free disk space")
