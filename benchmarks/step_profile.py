"""Where a training step's time goes: its convolutions against everything else.

`make bench` reports each model's training rate as a fraction of the machine's matmul peak.
When a U-Net of 32-128 channels stays well under that peak, the question is whether the
convolution kernels themselves run slower than a large matmul (then no change outside them
can close the gap) or whether the rest of the step (normalisation, attention, activations,
the optimizer, Python) is what costs. One profiled step answers it: the share of the step's
time spent inside convolution kernels (forward and backward), and the rate those kernels
reach on the FLOPs they do. A step that did nothing but its convolutions would reach
`convolution GFLOP/s / peak` of the matmul peak at most: the ceiling for that model and layout
on this machine.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode


def _is_convolution(name: str) -> bool:
    return "conv" in name.lower()


def convolution_share(model: torch.nn.Module, fwd, x: torch.Tensor, t: torch.Tensor, bf16: bool,
                      steps: int = 3, warmup: int = 2) -> dict:
    """Profile `steps` training steps (forward, MSE to noise, backward, Adam) of `model` on the
    CPU: seconds per step, the share of it inside convolution ops, and their GFLOP/s."""
    optimiser = torch.optim.Adam(model.parameters(), 1e-4)
    target = torch.randn_like(x)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fwd(model, x, t)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    conv_flops = sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
                     if _is_convolution(str(op)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
    conv_seconds = sum(event.self_cpu_time_total for event in prof.key_averages()
                       if event.key.startswith("aten::") and _is_convolution(event.key)) / 1e6 / steps
    return {
        "step_s": seconds,
        "convolution_s": conv_seconds,
        "convolution_share": conv_seconds / seconds,
        "convolution_flop_share": conv_flops / max(counter.get_total_flops(), 1),
        "convolution_gflop_s": conv_flops / 1e9 / max(conv_seconds, 1e-12),
    }
