"""`precision: auto` for sampling: difflab-sample, difflab-evaluate and the FID callback.

The same rule as training (`precision`), measured on what sampling does: a forward pass of
the network in eval mode without gradients, at its input shape. On the CPU bf16 autocast is
chosen only where it is at least `BF16_MIN_GAIN` times fp32; on CUDA bf16 (or fp16) autocast
by rule. The probe is cached per machine like the training one (kind "infer"). Samplers keep
their state in float32 whatever is chosen: only the network runs in bf16, and the `Denoiser`
casts its output back.

    decision = resolve_inference("auto", "cpu", net, (256, 1, 28, 28), cache_dir=".cache")
    net = AutocastNetwork.wrap(net, decision)

The probe runs at the sampler's batch (up to `INFER_PROBE_BATCH`), not at training's small
probe batch: a small network's gain from bf16 grows with the batch (the 4x7x7 latent U-Net on
Intel-AMX: bf16 1.2x fp32 at 16 images, 2.5x at 250), and samplers run hundreds at once. A
latent model's decoder runs in the same setting as its network (`in_sampling_setting`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from difflab.training.precision import Decision, autocast_dtype, resolve, time_candidate


# One eval-mode forward without gradients per timed step: what a sampler step costs.
time_forward = functools.partial(time_candidate, backward=False)
# Images per probe step for sampling (the batch, where smaller): near the samplers' batches
# (difflab-evaluate 250, difflab-sample 256) while a probe of three settings stays ~2-3 s.
INFER_PROBE_BATCH = 128


def resolve_inference(precision: Any, device: str | torch.device, net: nn.Module, shape: Sequence[int], *,
                      channels_last: Any = "auto", cache_dir: Optional[str] = None, cond: Any = None,
                      timer: Callable[..., tuple[float, float]] = time_forward,
                      bf16_check: Optional[Callable[[], float]] = None) -> Decision:
    """The precision and layout to sample `net` in on `device` (see the module)."""
    accelerator = "cuda" if torch.device(device).type == "cuda" else "cpu"
    return resolve(precision, accelerator, channels_last, net, shape, cache_dir=cache_dir, cond=cond, timer=timer,
                   kind="infer", bf16_check=bf16_check, probe_batch=INFER_PROBE_BATCH)


class AutocastNetwork(nn.Module):
    """`net(x, t, cond)` run under autocast (and with channels_last inputs) as decided.

    Attributes the rest of difflab reads from a network (`num_classes`, `conditioner`,
    `image_size`, `in_channels`) are handed through."""

    def __init__(self, net: nn.Module, dtype: Optional[torch.dtype], channels_last: bool) -> None:
        super().__init__()
        self.net, self.dtype, self.channels_last = net, dtype, channels_last
        if channels_last:
            net.to(memory_format=torch.channels_last)

    @classmethod
    def wrap(cls, net: nn.Module, decision: Decision) -> nn.Module:
        dtype = autocast_dtype(decision.precision)
        if dtype is None and not decision.channels_last:
            return net
        return cls(net, dtype, decision.channels_last)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def setting(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.autocast]:
        """`x` in this network's layout, and the autocast to run on it in."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        device_type = x.device.type if x.device.type in ("cuda", "cpu") else "cpu"
        return x, torch.autocast(device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def forward(self, x: torch.Tensor, t: Any, cond: Any = None) -> torch.Tensor:
        x, autocast = self.setting(x)
        with autocast:
            return self.net(x, t, cond)


def in_sampling_setting(fn: Callable[[torch.Tensor], torch.Tensor], net: nn.Module
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` (a latent model's decoder) run in the precision and layout that `net` samples in:
    the AutocastNetwork inside `net` (or inside the guidance around it), if there is one. The
    decoder is convolutions like the network; in fp32 contiguous it took 1.09 s for 500 digits
    on Intel-AMX, against 0.30 s in bf16."""
    while not isinstance(net, AutocastNetwork) and isinstance(getattr(net, "net", None), nn.Module):
        net = net.net
    if not isinstance(net, AutocastNetwork):
        return fn

    def run(latents: torch.Tensor) -> torch.Tensor:
        latents, autocast = net.setting(latents)
        with autocast:
            return fn(latents).float()

    return run
