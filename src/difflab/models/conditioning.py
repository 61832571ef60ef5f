"""Conditions for the U-Net: embedders composed by one conditioner, routed by kind.

The idea of Stability-AI's ``GeneralConditioner`` (sgm), written for difflab: each
``Embedder`` reads one entry of the condition dict by its ``input_key``, has its own
condition-dropout rate ``p_drop`` and ``trainable`` flag, and returns parts routed by kind:

- ``concat``: image-shaped [B, C, H, W], concatenated to the network input (a low-res
  image for super-resolution, mask + masked image for inpainting);
- ``vector``: [B, D], projected and added to the time embedding (a class, a pooled text
  vector, the noise level of an augmented condition);
- ``tokens``: [B, L, D] with a key-padding mask ``token_mask`` [B, L] (True on real tokens),
  attended to by the U-Net's cross-attention (text; class tokens). Token embedders must share
  D; their sequences are concatenated.

The ``Conditioner`` concatenates the parts of each kind in embedder order. Dropped
conditions (training only, per sample, probability ``p_drop``) become zeros, the
embedding an unconditional model would see; ``drop_all=True`` drops every condition
(the unconditional branch of guidance). A bool [B] tensor under the reserved key
``DROP_KEY`` drops the conditions of the rows where it is True, at sampling too: guidance
then runs its conditional and unconditional halves as one doubled batch. Nothing here knows
of diffusion.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from difflab.models.layers import sinusoidal_embedding

KINDS = ("concat", "vector", "tokens")
# The condition-dict key of a per-row drop mask (bool [B], True: that row unconditional).
# difflab.diffusion.guidance writes the same string (diffusion imports nothing from models).
DROP_KEY = "_drop"


class ConditionError(ValueError):
    """A condition dict that does not fit the conditioner (missing key, wrong shape)."""


class Embedder(nn.Module):
    """One condition. Subclasses implement ``embed(value) -> {kind: tensor}``."""

    def __init__(self, input_key: str, p_drop: float = 0.0, trainable: bool = True) -> None:
        super().__init__()
        if not 0.0 <= p_drop < 1.0:
            raise ValueError(f"p_drop={p_drop} of the {input_key!r} condition must lie in [0, 1)")
        self.input_key, self.p_drop, self.trainable = input_key, p_drop, trainable

    def embed(self, value: Any) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def sizes(self) -> dict[str, int]:
        """Channels (concat) or dims (vector, tokens) of each kind this embedder returns."""
        raise NotImplementedError


class ImageConcat(Embedder):
    """An image-shaped condition concatenated to the input, e.g. the upsampled low-res image.

    ``noise_aug``: noise-conditioning augmentation (SR3 sec. 2.4; Ho et al. 2022, "Cascaded
    diffusion models", sec. 4.1): in training the condition gets Gaussian noise of a std drawn
    uniformly from [0, noise_aug], and that std is passed on as a ``vector`` part, so the model
    learns to trust a cleaner condition more; at sampling the std is ``eval_noise`` (0 default).
    """

    def __init__(self, input_key: str, channels: int = 1, p_drop: float = 0.0, noise_aug: float = 0.0,
                 eval_noise: float = 0.0, embed_dim: int = 32) -> None:
        super().__init__(input_key, p_drop, trainable=False)
        if noise_aug < 0 or eval_noise < 0:
            raise ValueError(f"noise_aug={noise_aug} and eval_noise={eval_noise} must be >= 0")
        self.channels, self.noise_aug, self.eval_noise, self.embed_dim = channels, noise_aug, eval_noise, embed_dim

    def sizes(self) -> dict[str, int]:
        return {"concat": self.channels, **({"vector": self.embed_dim} if self.noise_aug > 0 else {})}

    def embed(self, value: Tensor) -> dict[str, Tensor]:
        if value.ndim != 4 or value.shape[1] != self.channels:
            raise ConditionError(f"condition {self.input_key!r} must be images [B, {self.channels}, H, W], got "
                                 f"shape {tuple(value.shape)}")
        if self.noise_aug <= 0:
            return {"concat": value}
        if self.training:
            std = torch.rand(value.shape[0], device=value.device) * self.noise_aug
        else:
            std = torch.full((value.shape[0],), self.eval_noise, device=value.device)
        noisy = value + std.view(-1, 1, 1, 1).to(value.dtype) * torch.randn_like(value)
        # The std as a timestep-like input in [0, 1000], embedded like the diffusion time.
        level = sinusoidal_embedding(1000.0 * std / self.noise_aug, self.embed_dim)
        return {"concat": noisy, "vector": level}


class ClassEmbedder(Embedder):
    """Class labels [B] (long) as a learned ``vector`` of ``dim`` dims."""

    def __init__(self, num_classes: int, dim: int = 64, input_key: str = "label", p_drop: float = 0.1) -> None:
        super().__init__(input_key, p_drop, trainable=True)
        self.num_classes, self.dim = num_classes, dim
        self.table = nn.Embedding(num_classes, dim)

    def sizes(self) -> dict[str, int]:
        return {"vector": self.dim}

    def embed(self, value: Tensor) -> dict[str, Tensor]:
        if value.ndim != 1 or value.dtype != torch.long:
            raise ConditionError(f"condition {self.input_key!r} must be class labels [B] (long), got "
                                 f"{value.dtype} of shape {tuple(value.shape)}")
        return {"vector": self.table(value)}


class ClassTokens(ClassEmbedder):
    """Class labels [B] as a one-token sequence of ``dim`` dims, for cross-attention: the
    check that attending to a class token conditions as well as adding a class vector."""

    def sizes(self) -> dict[str, int]:
        return {"tokens": self.dim}

    def embed(self, value: Tensor) -> dict[str, Tensor]:
        return {"tokens": super().embed(value)["vector"][:, None, :]}


class Conditioner(nn.Module):
    """Runs every embedder on its input and routes the parts by kind (see the module)."""

    def __init__(self, embedders: list[Embedder]) -> None:
        super().__init__()
        keys = [e.input_key for e in embedders]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two embedders read the same input key: {keys}")
        self.embedders = nn.ModuleList(embedders)
        for embedder in embedders:
            embedder.requires_grad_(embedder.trainable)

    @property
    def input_keys(self) -> list[str]:
        return [e.input_key for e in self.embedders]

    def sizes(self) -> dict[str, int]:
        """Total channels / dims per kind: what the network must accept."""
        total = {kind: 0 for kind in KINDS}
        token_dims = {e.sizes()["tokens"] for e in self.embedders if e.sizes().get("tokens")}
        if len(token_dims) > 1:
            raise ValueError(f"token embedders must share one width to be concatenated, got {sorted(token_dims)}")
        for embedder in self.embedders:
            for kind, size in embedder.sizes().items():
                total[kind] += size if kind != "tokens" else 0
        total["tokens"] = token_dims.pop() if token_dims else 0
        return total

    def forward(self, inputs: dict[str, Any], like: Tensor, drop_all: bool = False,
                generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """The parts for a batch shaped like the network input ``like`` [B, C, H, W]."""
        batch = like.shape[0]
        if drop_all:  # every condition dropped: zeros, without reading (or needing) the inputs
            sizes = self.sizes()
            zeros = {"concat": like.new_zeros(batch, sizes["concat"], *like.shape[2:]),
                     "vector": like.new_zeros(batch, sizes["vector"]),
                     "tokens": like.new_zeros(batch, 1, sizes["tokens"])}
            parts = {kind: zeros[kind] for kind in KINDS if sizes[kind]}
            if sizes["tokens"]:  # one zero token: the same attention output as any all-zero sequence
                parts["token_mask"] = torch.ones(batch, 1, dtype=torch.bool, device=like.device)
            return parts
        drop = self._drop_rows(inputs.get(DROP_KEY), batch, like.device)
        missing = [key for key in self.input_keys if key not in inputs]
        if missing:
            raise ConditionError(f"the condition dict lacks {missing}; this model is conditioned on "
                                 f"{self.input_keys} (got {sorted(inputs)}).")
        parts: dict[str, list[Tensor]] = {kind: [] for kind in (*KINDS, "token_mask")}
        for embedder in self.embedders:
            value = inputs[embedder.input_key]
            if value.shape[0] != batch:
                raise ConditionError(f"condition {embedder.input_key!r} has {value.shape[0]} entries for a batch of "
                                     f"{batch}")
            if embedder.sizes().get("concat") and tuple(value.shape[2:]) != tuple(like.shape[2:]):
                raise ConditionError(f"condition {embedder.input_key!r} is {tuple(value.shape[2:])} but the images "
                                     f"are {tuple(like.shape[2:])}: concatenated conditions must match them")
            out = embedder.embed(value.to(like.device))
            keep = self._keep_mask(embedder, batch, value.device, generator)
            if drop is not None:
                keep = (~drop).float() if keep is None else keep * (~drop).to(keep.device).float()
            if "tokens" in out and "token_mask" not in out:  # every token is real
                out["token_mask"] = torch.ones(out["tokens"].shape[:2], dtype=torch.bool, device=like.device)
            for kind, tensor in out.items():
                if keep is not None and kind != "token_mask":  # a dropped sequence is zeros, its mask kept
                    tensor = tensor * keep.view(-1, *([1] * (tensor.ndim - 1))).to(tensor.dtype)
                parts[kind].append(tensor)
        dims = {"concat": 1, "vector": 1, "tokens": 1, "token_mask": 1}
        return {kind: torch.cat(tensors, dim=dims[kind]) for kind, tensors in parts.items() if tensors}

    @staticmethod
    def _drop_rows(drop: Any, batch: int, device: torch.device) -> Optional[Tensor]:
        if drop is None:
            return None
        if not torch.is_tensor(drop) or drop.dtype != torch.bool or tuple(drop.shape) != (batch,):
            raise ConditionError(f"condition {DROP_KEY!r} must be a bool tensor of shape [{batch}] (True: drop "
                                 f"that row's conditions), got {getattr(drop, 'dtype', type(drop).__name__)} of "
                                 f"shape {tuple(getattr(drop, 'shape', ()))}")
        return drop.to(device)

    def _keep_mask(self, embedder: Embedder, batch: int, device: torch.device,
                   generator: Optional[torch.Generator]) -> Optional[Tensor]:
        if not (self.training and embedder.p_drop > 0):
            return None
        return (torch.rand(batch, device=device, generator=generator) >= embedder.p_drop).float()


def condition_batch(inputs: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor in a condition dict (for batching)."""
    return {key: value[start:stop] if torch.is_tensor(value) else value for key, value in inputs.items()}


def vector_projection(vector_dim: int, embed_dim: int) -> nn.Module:
    """The layer that maps the conditioner's vector part into the time embedding."""
    return nn.Sequential(nn.Linear(vector_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))


__all__ = ["DROP_KEY", "KINDS", "ClassEmbedder", "ClassTokens", "ConditionError", "Conditioner", "Embedder", "ImageConcat",
           "condition_batch", "vector_projection"]
