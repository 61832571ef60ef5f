"""Read what a run left behind (`last.ckpt`, `ema.pt`, a difflab-export `.safetensors`) without running any
code in it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from difflab.models.autoencoder import AUTOENCODER_FORMAT, AutoencoderKL
from difflab.training.callbacks import EMA_FORMAT


SAFETENSORS_FORMAT = "difflab.safetensors/1"  # difflab-export's files (training.export)


class CheckpointError(ValueError):
    """The file is missing, unreadable, or not a difflab checkpoint."""


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(run_config, network weights, first-stage weights) of a difflab-export file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"could not read {path} as a safetensors file ({error}). Is it a file difflab-export "
                              "wrote?") from error
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file, but not one difflab-export wrote (its metadata has no "
                              f"'format': {SAFETENSORS_FORMAT!r}, so nothing says how to rebuild the network).")
    try:
        config = json.loads(metadata["run_config"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: its run config is missing or damaged ({error}).") from error
    weights = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
    first_stage = {k[len("first_stage."):]: v for k, v in tensors.items() if k.startswith("first_stage.")}
    return config, weights, first_stage


def load_network_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (run_config, network state_dict) from a difflab `.ckpt` or `ema.pt`.

    For a Lightning checkpoint the weights are its `state_dict`, which holds the EMA weights
    when the run used the EMA callback (Lightning stores the raw ones under
    `current_model_state`). Loading uses `weights_only=True`: a checkpoint is a pickle, and
    opening one must never run code.
    """
    config, weights, _ = read_checkpoint(path)
    return config, weights


def _load_failure(error: Exception) -> str:
    """What went wrong, in one line. torch's refusal of a pickled object ends with advice to load
    it with `weights_only=False`, which would run code from the file: that advice is not passed on."""
    text = str(error)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if found:
        return (f"it holds a Python object ({found.group(1)}) that a safe load refuses; "
                "difflab reads only tensors and plain data from a file, never code")
    if "Weights only load failed" in text:  # not a pickle at all: say what the unpickler met, not its advice
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return f"the unpickler met {detail.group(1).strip() if detail else 'data it cannot read'}"
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def _read_payload(path: str | Path, what: str) -> dict[str, Any]:
    """torch.load with `weights_only=True`, every failure a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass {what}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"could not read {path} as a torch checkpoint ({_load_failure(error)}). "
                              f"Is it a file difflab wrote ({what})?") from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a difflab checkpoint (it holds a {type(payload).__name__}).")
    return payload


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(run_config, network state_dict, first-stage state_dict) of a diffusion run's `.ckpt`
    or `ema.pt`; the last is empty for a pixel-space model (see `load_network_weights`)."""
    config, weights, first_stage = read_run_checkpoint(path)
    if config.get("stage") == "autoencoder":
        raise CheckpointError(f"{path} is an autoencoder run's checkpoint, not a diffusion model: use its "
                              f"autoencoder.pt as first_stage.ckpt of a diffusion run.")
    return config, weights, first_stage


def read_run_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`read_checkpoint` for the checkpoint of any difflab-train run (an autoencoder run's too)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        config, weights, first_stage = _read_safetensors(path)
    else:
        config, weights, first_stage = _read_torch_checkpoint(path)
    if not config or "model" not in config or not weights:
        raise CheckpointError(f"{path} has no run config or network weights; it was not written by difflab-train "
                              "or difflab-export.")
    return config, weights, first_stage


def _read_torch_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(run_config, network weights, first-stage weights) of a last.ckpt or an ema.pt."""
    payload = _read_payload(path, "ckpt=<run>/checkpoints/last.ckpt or ckpt=<run>/checkpoints/ema.pt")
    first_stage: dict[str, torch.Tensor] = {}
    if payload.get("format") == AUTOENCODER_FORMAT:
        raise CheckpointError(f"{path} is an autoencoder (a first stage), not a diffusion model: train a diffusion "
                              f"model on it with first_stage=kl first_stage.ckpt={path}, then sample that run.")
    if payload.get("format") == EMA_FORMAT:
        first_stage = payload.get("first_stage") or {}
        config, weights = payload.get("run_config"), payload.get("state_dict")
    elif "state_dict" in payload and isinstance(payload.get("hyper_parameters"), dict):
        config = payload["hyper_parameters"].get("run_config")
        weights = {k[len("net."):]: v for k, v in payload["state_dict"].items() if k.startswith("net.")}
        first_stage = {k[len("first_stage."):]: v for k, v in payload["state_dict"].items()
                       if k.startswith("first_stage.")}
    else:
        raise CheckpointError(f"{path} is not a difflab checkpoint: it has neither an EMA export "
                              f"('format': {EMA_FORMAT!r}) nor a Lightning 'state_dict' with difflab hyperparameters.")
    return config, weights, first_stage


def load_autoencoder(path: str | Path) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The autoencoder of an `autoencoder.pt` (experiment=mnist5k_autoencoder) and the data it
    was trained on ({name, path, image_size, channels})."""
    path = Path(path)
    payload = _read_payload(path, "first_stage.ckpt=<autoencoder run>/checkpoints/autoencoder.pt")
    if payload.get("format") != AUTOENCODER_FORMAT:
        kind = "a diffusion model's checkpoint" if payload.get("format") == EMA_FORMAT or "state_dict" in payload \
            else "not a difflab autoencoder"
        raise CheckpointError(f"first_stage.ckpt={path} is {kind}: a first stage is the autoencoder.pt written by "
                              "difflab-train experiment=mnist5k_autoencoder (in <run>/checkpoints/).")
    try:
        autoencoder = AutoencoderKL(**payload["config"])
        autoencoder.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"first_stage.ckpt={path}: its weights do not fit the autoencoder its own config "
                              f"describes ({str(error).splitlines()[0]}). The file may be damaged.") from error
    return autoencoder, dict(payload.get("data") or {})


def config_differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in config_differences(saved.get(k), current.get(k), f"{prefix}.{k}")]
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r}, now {current!r}"]


_OLD_OBJECTIVE_KEYS = ("weighting", "min_snr_gamma", "timesteps", "logsnr_mean", "logsnr_std")


def training_method(config: dict[str, Any]) -> dict[str, Any]:
    """The path, output, density and weighting of a run config, with a run from before the
    density / weighting groups read in their terms (``objective.timesteps=logsnr_normal`` was
    ``density=lognormal`` with p_mean = -mean / 2, p_std = std / 2; ``objective.weighting=min_snr``
    was ``weighting=min_snr``). The schedule's ``sigma_data`` is left out (it is measured again),
    and so are ``sigma_min`` / ``sigma_max`` on a VP schedule (they shape only flow / edm)."""
    objective = dict(config.get("objective") or {})
    old = {k: objective.pop(k) for k in _OLD_OBJECTIVE_KEYS if k in objective}
    density, weighting = config.get("density"), config.get("weighting")
    if density is None:
        timesteps = old.get("timesteps", "uniform")
        density = {"_target_": "difflab.diffusion.density.Uniform", "stratified": False}
        if timesteps == "logsnr_normal":
            density = {"_target_": "difflab.diffusion.density.LogNormal", "p_mean": -old.get("logsnr_mean", 2.0) / 2,
                       "p_std": old.get("logsnr_std", 2.4) / 2, "stratified": False}
        elif timesteps == "last":
            density = {"_target_": "difflab.diffusion.density.Last", "stratified": False}
    if weighting is None:
        weighting = {"_target_": "difflab.diffusion.weighting.Simplified"}
        if old.get("weighting") == "min_snr":
            weighting = {"_target_": "difflab.diffusion.weighting.MinSNR", "gamma": old.get("min_snr_gamma", 5.0)}
    schedule = dict(config.get("schedule") or {})
    unused = ("sigma_data",) if schedule.get("kind") in ("flow", "edm") else ("sigma_data", "sigma_min", "sigma_max")
    schedule = {k: v for k, v in schedule.items() if k not in unused}
    return {"schedule": schedule, "objective": objective, "density": dict(density), "weighting": dict(weighting)}


def is_regression(config: dict[str, Any]) -> bool:
    """Whether a run trained only the noisiest level (density=last: SR3's regression baseline)."""
    return str(training_method(config)["density"].get("_target_", "")).endswith(".Last")


def method_differences(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The model and the training-method ``keys`` (schedule, objective, density, weighting) that
    differ between two diffusion run configs, old runs read in today's terms (``training_method``)."""
    then, now = training_method(saved), training_method(current)
    return config_differences(saved.get("model"), current.get("model"), "model") + \
        [d for key in keys for d in config_differences(then[key], now[key], key)]


def check_resume_compatible(path: str | Path, run_config: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint of another network or objective, naming the keys.

    Without this, Lightning fails deep inside `load_state_dict` with a list of tensor
    shapes; with it, the message says which config keys differ and what to do.
    """
    saved, _, _ = read_run_checkpoint(path)
    stage = run_config.get("stage", "diffusion")
    differences = config_differences(saved.get("stage", "diffusion"), stage, "stage")
    if stage == "autoencoder":
        keys = ("model", "autoencoder_loss")
        differences += [d for key in keys for d in config_differences(saved.get(key), run_config.get(key), key)]
    else:
        keys = ("model", "schedule", "objective", "density", "weighting")
        differences += method_differences(saved, run_config, keys[1:])
    if stage != "autoencoder":
        # The first stage (a resume takes it from the checkpoint, so its file does not matter); a
        # checkpoint from before first_stage existed is a pixel-space one.
        stages = [{k: (config.get("first_stage") or {}).get(k) for k in ("kind", "autoencoder")}
                  for config in (saved, run_config)]
        for first in stages:
            first["kind"] = first["kind"] or "identity"
        differences += config_differences(*stages, "first_stage")
    if differences:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with another config:\n  " + "\n  ".join(differences)
            + f"\nUse the same {', '.join(keys)} options as that run (its config.yaml), "
            "or start a fresh run without ckpt_path.")
