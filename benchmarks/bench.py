"""`make bench`: difflab's U-Net next to the peer U-Nets, in one run on one machine.

    python benchmarks/bench.py [--peer PATH] [--quick] [--compile]

The peers and the measuring protocol (batch, warm-up, iterations, Adam step, MSE to eps,
FLOP counting) come from importing the peer script (default ../shared/peer_bench.py from
the repo root), so both sides are timed by the same functions. If that script or a peer
package is missing, a note says so and difflab's numbers are still reported, timed by a
local stand-in of the same protocol.

Prints one JSON object on stdout; a human-readable table goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from difflab.models import UNet, to_channels_last

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEER = REPO_ROOT.parent / "shared" / "peer_bench.py"
CL = torch.channels_last
# The peers' shape of the problem: 28x28x1 digits, channels 32/64/128, attention in the middle.
PEER_CONFIG = dict(
    in_channels=1, base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=1,
    attention_levels=(1,), mid_attention=True, num_groups=8, image_size=28,
)


def load_peer(path: Path) -> tuple[ModuleType | None, str | None]:
    """Import the peer script from a file path; (module, None) or (None, why not)."""
    if not path.is_file():
        return None, f"peer script not found at {path}; reporting difflab only"
    spec = importlib.util.spec_from_file_location("peer_bench", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a broken peer file must not hide difflab's numbers
        return None, f"could not import {path}: {error!r}; reporting difflab only"
    return module, None


def local_protocol(batch: int = 64, shape=(1, 28, 28), iters: int = 8, warmup: int = 2):
    """Stand-in for the peer script's timing functions when it is unavailable: same
    batch, warm-up, iterations, Adam(1e-4) step and MSE-to-eps loss."""

    def inputs():
        return torch.randn(batch, *shape), torch.randint(0, 1000, (batch,))

    def timed(step):
        for i in range(protocol.WARMUP + protocol.ITERS):
            if i == protocol.WARMUP:
                start = time.perf_counter()
            step()
        return protocol.BATCH * protocol.ITERS / (time.perf_counter() - start)

    def train_rate(model, fwd, bf16=False):
        optimiser = torch.optim.Adam(model.parameters(), 1e-4)
        x, t = inputs()
        eps = torch.randn_like(x)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.mse_loss(fwd(model, x, t).float(), eps)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        return timed(step)

    @torch.no_grad()
    def eval_rate(model, fwd):
        x, t = inputs()
        return timed(lambda: fwd(model, x, t))

    def flops_per_image(model, fwd):
        x, t = inputs()
        counter = FlopCounterMode(display=False)
        with counter:
            fwd(model, x, t).sum().backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / protocol.BATCH

    protocol = SimpleNamespace(
        BATCH=batch, SHAPE=shape, ITERS=iters, WARMUP=warmup,
        train_rate=train_rate, eval_rate=eval_rate, flops_per_image=flops_per_image,
    )
    return protocol


def plain(model, x, t):
    return model(x, t)


def channels_last_input(model, x, t):
    return model(x.contiguous(memory_format=CL), t)


def under_bf16(fwd):
    """Wrap a forward so evaluation runs under bf16 autocast (eval_rate has no flag)."""

    def forward(model, x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fwd(model, x, t)

    return forward


def fresh_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(**PEER_CONFIG)


def bench_difflab(protocol, compile_too: bool) -> dict:
    """fp32 as-is (NCHW), fp32 channels_last, and bf16 autocast channels_last."""
    model = fresh_unet()
    result = {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_gflop_per_img": protocol.flops_per_image(model, plain) / 1e9,
        "train_img_s_fp32": protocol.train_rate(model, plain),
        "denoise_img_s_fp32": protocol.eval_rate(model.eval(), plain),
    }
    model = to_channels_last(fresh_unet())
    result["train_img_s_fp32_channels_last"] = protocol.train_rate(model, channels_last_input)
    result["train_img_s_bf16"] = protocol.train_rate(model, channels_last_input, bf16=True)
    model.eval()
    result["denoise_img_s_bf16"] = protocol.eval_rate(model, under_bf16(channels_last_input))
    if compile_too:
        model = to_channels_last(fresh_unet())
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        result["compiled_train_img_s_bf16"] = protocol.train_rate(
            compiled, channels_last_input, bf16=True
        )
        compiled.eval()
        result["compiled_denoise_img_s_bf16"] = protocol.eval_rate(
            compiled, under_bf16(channels_last_input)
        )
        result["compile_and_bench_s"] = time.perf_counter() - start
    return result


def bench_peer(protocol, build) -> dict:
    """The peer script's own measurements, plus bf16 evaluation for a like-for-like row."""
    model, fwd = build()
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_gflop_per_img": protocol.flops_per_image(model, fwd) / 1e9,
        "train_img_s_fp32": protocol.train_rate(model, fwd),
        "train_img_s_bf16": protocol.train_rate(model, fwd, bf16=True),
        "denoise_img_s_fp32": protocol.eval_rate(model.eval(), fwd),
        "denoise_img_s_bf16": protocol.eval_rate(model, under_bf16(fwd)),
    }


def table(out: dict) -> str:
    columns = [
        ("params_M", "params M"), ("train_gflop_per_img", "GFLOP/img"),
        ("train_img_s_fp32", "train fp32"), ("train_img_s_bf16", "train bf16"),
        ("denoise_img_s_fp32", "eval fp32"), ("denoise_img_s_bf16", "eval bf16"),
    ]
    rows = [f"{'img/s':12s}" + "".join(f"{title:>12s}" for _, title in columns)]
    for name in ("difflab", "diffusers", "lucidrains"):
        if isinstance(out.get(name), dict):
            cells = [out[name].get(key) for key, _ in columns]
            text = [f"{c:12.2f}" if c is not None else f"{'-':>12s}" for c in cells]
            rows.append(f"{name:12s}" + "".join(text))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="path of peer_bench.py")
    parser.add_argument("--quick", action="store_true", help="fewer timed iterations (noisier)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd difflab")
    args = parser.parse_args(argv)

    peer, note = load_peer(args.peer)
    protocol = peer if peer is not None else local_protocol()
    if args.quick:  # the peer functions read these module globals at call time
        protocol.ITERS, protocol.WARMUP = 3, 1
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "protocol": {"batch": protocol.BATCH, "shape": list(protocol.SHAPE),
                     "iters": protocol.ITERS, "warmup": protocol.WARMUP,
                     "source": str(args.peer) if peer is not None else "local stand-in"},
        "notes": [note] if note else [],
    }
    torch.manual_seed(0)
    out["difflab"] = bench_difflab(protocol, args.compile)
    if peer is not None:
        for name, builder in (("diffusers", "diffusers_unet"), ("lucidrains", "lucidrains_unet")):
            try:
                out[name] = bench_peer(protocol, getattr(peer, builder))
            except ImportError as error:
                out["notes"].append(f"{name} peer skipped: {error}")
    if isinstance(out.get("diffusers"), dict):
        ours, theirs = out["difflab"], out["diffusers"]
        out["speedup_vs_diffusers"] = {
            "train_bf16_vs_their_fp32": ours["train_img_s_bf16"] / theirs["train_img_s_fp32"],
            "train_bf16_vs_their_bf16": ours["train_img_s_bf16"] / theirs["train_img_s_bf16"],
            "denoise_bf16_vs_their_bf16": ours["denoise_img_s_bf16"] / theirs["denoise_img_s_bf16"],
        }
    print(json.dumps(out, indent=1))
    print(table(out), file=sys.stderr)
    for line in out["notes"]:
        print("note:", line, file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
