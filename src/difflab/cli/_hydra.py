"""What every difflab entry point shares: where the configs are, the schemas, resolvers."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import secrets
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

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


def _new_run_uid() -> None:
    global _RUN_UID
    _RUN_UID = secrets.token_hex(3)


# A forked process (a fork-based launcher or pool) names its runs apart from its parent's.
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_run_uid)


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


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def explain(error: BaseException) -> Optional[str]:
    """A one-paragraph message for what Hydra and OmegaConf raise on a mistyped command line (an
    option a group lacks, a key a schema lacks, a value of the wrong type, a required value not
    given, a constructor's refusal), or None for anything else."""
    from hydra.errors import (ConfigCompositionException, InstantiationException, MissingConfigException,
                              OverrideParseException)
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

    if isinstance(error, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", str(error))
        options = [o for o in (error.options or []) if not o.endswith("schema")]  # schemas are not choices
        if found and options:
            group, option = found.groups()
            close = difflib.get_close_matches(option, options, n=1)
            hint = f" (did you mean {group}={close[0]}?)" if close else ""
            return (f"{group}={option} is not an option of the {group} group{hint}: choose one of "
                    f"{', '.join(options)} (the files in conf/{group}/)")
        return _first_line(error)
    if isinstance(error, OverrideParseException):
        return (f"an override could not be parsed ({_first_line(error)}): write key=value, and quote values "
                "with brackets, commas or spaces")
    cause = error.__cause__
    if isinstance(error, (ConfigCompositionException, InstantiationException)) and cause is not None:
        inner = explain(cause)
        if inner is not None or isinstance(error, ConfigCompositionException):
            return inner or _first_line(error)
        return str(cause) if isinstance(cause, (ValueError, FileNotFoundError)) else None
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and getattr(error, "full_key", None):
        key = str(error.full_key)
        parent, _, name = key.rpartition(".")
        fields = [f.name for f in dataclasses.fields(error.object_type)] if dataclasses.is_dataclass(
            getattr(error, "object_type", None)) else []
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        where = f"of {parent}" if parent else "at the top level"
        return (f"{key} is not a key {where}{hint}: the keys are in the group's YAML files and "
                "src/difflab/cli/schema.py; add a new key with +key=value only where a group allows it")
    if isinstance(error, MissingMandatoryValue) and getattr(error, "full_key", None):
        return f"{error.full_key} has no value and this run needs one: pass {error.full_key}=... on the command line"
    if isinstance(error, ValidationError) and getattr(error, "full_key", None):
        return f"{error.full_key}: {_first_line(error)}; see the key's comment in its YAML file for what it takes"
    return None


def user_message(error: BaseException, user_errors: tuple[type[BaseException], ...]) -> Optional[str]:
    """What to tell the user for `error`: its text if it is one of `user_errors`, `explain`'s
    paragraph for a Hydra / OmegaConf / constructor refusal, else None (a bug: let it raise)."""
    return str(error) if isinstance(error, user_errors) else explain(error)


@contextmanager
def exit_on_user_error(prog: str, user_errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """A CLI body: a user's mistake (`user_message`) ends the program with one line, exit status 1;
    anything else raises as it is."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - user_message decides
        message = user_message(error, user_errors)
        if message is None:
            raise
        logging.getLogger(f"difflab.{prog.removeprefix('difflab-')}").error("%s", message)
        sys.exit(f"{prog}: {message}")


def check_overrides(config_name: str, prog: str, argv: list[str]) -> None:
    """Compose the command line's config once before Hydra does, so a mistyped option, key or value
    is one line of difflab's (exit status 1) rather than Hydra's report. Command lines with flags
    (-m, --cfg, --help, ...) go to Hydra as they are."""
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra import compose, initialize_config_dir

    setup()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            compose(config_name=config_name, overrides=argv)
    except Exception as error:  # noqa: BLE001 - explain() picks out the user's mistakes
        message = explain(error)
        if message is not None:
            sys.exit(f"{prog}: {message}")


def entry(hydra_main: Callable[..., Any], config_name: str, prog: str) -> Callable[..., Any]:
    """The console script for a `@hydra.main` function: its overrides checked first
    (`check_overrides`). Called with a config (tests, other code), it is the function itself."""
    @functools.wraps(hydra_main)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            check_overrides(config_name, prog, sys.argv[1:])
        return hydra_main(*args, **kwargs)
    return run
