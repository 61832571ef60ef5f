"""`first_stage=identity|kl`: the space a diffusion run trains in, one switch away.

`first_stage=kl first_stage.ckpt=<autoencoder run>/checkpoints/autoencoder.pt` loads the frozen
autoencoder, checks that it was trained on images of the run's shape, fits the latent scale
factor on all training images, and (with `cache_latents`) encodes both splits once so that
training reads latents instead of running the encoder on every batch. The run's network
then takes the latent shape; grids, the FID callback, difflab-sample and difflab-evaluate
decode before they save or score.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from difflab.models.autoencoder import AutoencoderKL
from difflab.models.first_stage import LatentSpace
from difflab.training.checkpoint import CheckpointError, load_autoencoder, read_checkpoint

log = logging.getLogger("difflab.train")
FIRST_STAGES = ("identity", "kl")


def first_stage_spec(kind: str = "identity", ckpt: Optional[str] = None, scale_factor: Optional[float] = None,
                     sample_posterior: bool = True, cache_latents: bool = True,
                     autoencoder: Optional[dict] = None) -> dict[str, Any]:
    """The `first_stage` config node, checked (the Hydra schema is derived from this signature).

    Args:
        kind: `identity` (pixel space) or `kl` (the latent space of an AutoencoderKL).
        ckpt: kl: the autoencoder.pt of an autoencoder run.
        scale_factor: kl: the latent scale s (null: 1/std over all training latents, written
            back into the run's config.yaml).
        sample_posterior: kl: train on posterior samples (LDM) instead of the means.
        cache_latents: kl: encode the training and validation images once, before training.
        autoencoder: filled in by the run: the autoencoder's constructor arguments, so a
            checkpoint rebuilds its first stage without the autoencoder.pt.
    """
    if kind not in FIRST_STAGES:
        raise ValueError(f"first_stage.kind={kind!r} is not one of {', '.join(FIRST_STAGES)}")
    if kind == "kl" and not ckpt and autoencoder is None:
        raise ValueError("first_stage=kl needs first_stage.ckpt=<autoencoder run>/checkpoints/autoencoder.pt "
                         "(train one with difflab-train experiment=mnist5k_autoencoder)")
    if scale_factor is not None and not scale_factor > 0:
        raise ValueError(f"first_stage.scale_factor={scale_factor} must be > 0 (or null: fitted on the data)")
    return {"kind": kind, "ckpt": ckpt, "scale_factor": scale_factor, "sample_posterior": sample_posterior,
            "cache_latents": cache_latents, "autoencoder": autoencoder}


def build_latent_space(spec: dict[str, Any], datamodule: Any, resume: Optional[str] = None) -> Optional[LatentSpace]:
    """The run's first stage (None for pixel space), scale fitted on all training images. A
    run resumed from the checkpoint `resume` takes that checkpoint's own first stage and scale
    (whatever the autoencoder.pt on disk holds now)."""
    if spec.get("kind", "identity") == "identity":
        return None
    if resume is not None:
        saved_config, _, state = read_checkpoint(resume)
        if is_latent(saved_config):  # (a pixel checkpoint is refused by the resume check, naming the key)
            space = latent_space_from_checkpoint(saved_config, state)
            log.info("first stage: the autoencoder and scale factor %.4f of %s", float(space.scale_factor), resume)
            return space
    autoencoder, data = load_autoencoder(spec["ckpt"])
    ours = (datamodule.channels, datamodule.image_size)
    theirs = (autoencoder.in_channels, autoencoder.image_size)
    if ours != theirs:
        raise CheckpointError(
            f"first_stage.ckpt={spec['ckpt']} was trained on {theirs[0]}x{theirs[1]}x{theirs[1]} images "
            f"({data.get('name')}), but this run's data ({datamodule.name}) gives {ours[0]}x{ours[1]}x{ours[1]}. "
            "Train an autoencoder on this data (experiment=mnist5k_autoencoder data=...) or match data.image_size "
            "and data.channels.")
    if data.get("name") not in (None, datamodule.name):
        log.warning("first stage %s was trained on %s; this run trains on %s", spec["ckpt"], data["name"],
                    datamodule.name)
    space = LatentSpace(autoencoder, sample_posterior=spec.get("sample_posterior", True))
    if spec.get("scale_factor") is None:
        scale = space.fit_scale(datamodule.split("train").images)
        log.info("first stage: latents %s, scale factor %.4f (1/std over %d training latents)",
                 "x".join(map(str, space.latent_shape)), scale, len(datamodule.split("train")))
    else:
        space.scale_factor.fill_(float(spec["scale_factor"]))
    return space


def cache_latents(space: LatentSpace, datamodule: Any, batch_size: int = 500) -> None:
    """Encode both splits once; the loaders then serve scaled posterior moments (see
    `LatentSpace.moments`), from which each training step draws its latents."""
    datamodule.serve(*(space.moments_of(datamodule.split(split).images, batch_size) for split in ("train", "val")))


def is_latent(run_config: dict[str, Any]) -> bool:
    """Whether a run's model works in a first stage's latent space."""
    return (run_config.get("first_stage") or {}).get("kind", "identity") != "identity"


def image_shape_of(run_config: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the images a run's model makes (after decoding, for a latent model)."""
    if is_latent(run_config):
        arguments = run_config["first_stage"].get("autoencoder") or {}
        return (arguments["in_channels"], arguments["image_size"], arguments["image_size"])
    model = run_config["model"]
    return (model["in_channels"], model["image_size"], model["image_size"])


def latent_space_from_checkpoint(run_config: dict[str, Any], state: dict[str, torch.Tensor]
                                 ) -> Optional[LatentSpace]:
    """The first stage saved in a diffusion checkpoint (None for a pixel-space model): rebuilt
    from the autoencoder arguments in the run config and the checkpoint's own weights and
    scale factor, so the autoencoder.pt is not needed any more."""
    if not is_latent(run_config):
        return None
    arguments = run_config["first_stage"].get("autoencoder")
    if not arguments or not state:
        raise CheckpointError("this latent model's checkpoint lacks its first stage (the autoencoder's arguments "
                              "or weights): it was not written by difflab-train with first_stage=kl.")
    space = LatentSpace(AutoencoderKL(**arguments))
    try:
        space.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError("the checkpoint's first-stage weights do not fit the autoencoder its config "
                              f"describes ({str(error).splitlines()[0]}). The file may be damaged.") from error
    return space.eval()
