"""The two peers of `../shared/peer_bench.py`, trained the way their own examples train them,
with EMA snapshots at wall-clock marks (for `make ttq`, benchmarks/ttq.py).

- diffusers: the loop of `examples/unconditional_image_generation/train_unconditional.py` with
  its README's flags (batch 16, lr 1e-4, AdamW betas (0.95, 0.999), weight decay 1e-6, cosine
  LR with 500 warm-up steps over 100 epochs, gradient clipping at 1, `EMAModel` with warm-up
  (inv_gamma 1, power 3/4, max decay 0.9999)), `DDPMScheduler` (linear betas, T = 1000, eps).
- lucidrains: `GaussianDiffusion` (T = 1000, its default sigmoid schedule and v objective) +
  `Trainer` with its README's settings (batch 32, 2 accumulation steps, lr 8e-5, EMA decay
  0.995), from a folder of PNGs of the same training split.

Both U-Nets are peer_bench's configurations (~2.6M parameters). Horizontal flips are off for
both (digits are not mirror-symmetric) and the peers' own sampling, FID and checkpointing
during training are off (they would only cost the peers time). Precision is each network's
own `precision: auto` decision (bf16 autocast only where measured >= 1.3x fp32 here).
Clocks start at `--start` (the Unix time the benchmark launched this process), so imports and
data loading count, as they do for difflab.

    python benchmarks/ttq_peers.py diffusers --out DIR --marks 60 150 300 600 --start $(date +%s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from difflab.training.wallclock import check_marks, snapshot_name

T = 1000
PEERS = ("diffusers", "lucidrains")


def diffusers_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def lucidrains_unet() -> torch.nn.Module:
    from denoising_diffusion_pytorch import Unet

    return Unet(dim=32, dim_mults=(1, 2, 4), channels=1, flash_attn=False)


class PeerNetwork(torch.nn.Module):
    """A peer U-Net behind difflab's network call `net(x, t, cond)` (integer timesteps)."""

    def __init__(self, peer: str, unet: torch.nn.Module) -> None:
        super().__init__()
        self.peer, self.unet = peer, unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out = self.unet(x, t)
        return out.sample if self.peer == "diffusers" else out


def peer_network(peer: str, state_dict: dict[str, torch.Tensor] | None = None) -> PeerNetwork:
    net = PeerNetwork(peer, diffusers_unet() if peer == "diffusers" else lucidrains_unet())
    if state_dict is not None:
        net.unet.load_state_dict(state_dict)
    return net.eval()


def peer_schedule(peer: str) -> tuple[str, str]:
    """(difflab schedule kind, objective) equal to the peer's training process: diffusers'
    DDPMScheduler is linear 1e-4..0.02 with eps; lucidrains' default is its sigmoid
    schedule (-3, 3, tau 1) with v. tests/test_ttq.py checks both tables against the peers'."""
    return ("linear", "eps") if peer == "diffusers" else ("sigmoid", "v")


class Clock:
    """Snapshots at wall-clock marks since `start`; `due()` is True when the next mark has passed."""

    def __init__(self, marks: list[float], start: float, out: Path) -> None:
        self.marks, self.start, self.out, self.taken = marks, start, out, []
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.time() - self.start

    def done(self) -> bool:
        return len(self.taken) == len(self.marks)

    def due(self) -> bool:
        return not self.done() and self.elapsed() >= self.marks[len(self.taken)]

    def snapshot(self, state_dict: Callable[[], dict[str, torch.Tensor]], step: int,
                 raw: Optional[Callable[[], dict[str, torch.Tensor]]] = None) -> None:
        """Write the EMA weights `state_dict()` (and the live ones, `raw()`) at every passed mark."""
        weights = live = None
        while self.due():
            mark = self.marks[len(self.taken)]
            weights = weights or {k: v.detach().cpu().clone() for k, v in state_dict().items()}
            live = live or ({k: v.detach().cpu().clone() for k, v in raw().items()} if raw else None)
            name = snapshot_name(mark)
            torch.save({"state_dict": weights, "raw_state_dict": live, "mark_s": mark, "elapsed_s": self.elapsed(),
                        "step": step}, self.out / name)
            self.taken.append({"mark_s": mark, "elapsed_s": round(self.elapsed(), 2), "step": step, "file": name})
        (self.out / "wallclock.json").write_text(json.dumps({"start_time": self.start, "marks_s": self.marks,
                                                             "snapshots": self.taken}, indent=1) + "\n")


def train_images(seed: int = 42) -> torch.Tensor:
    """The training split difflab's default run trains on (mnist5k, its seed), in [-1, 1]."""
    from difflab.data import ImageDataModule

    datamodule = ImageDataModule("mnist5k", batch_size=32, seed=seed)
    datamodule.setup("fit")
    return datamodule.split("train").images.clone()


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_diffusers(images: torch.Tensor, clock: Clock, bf16: bool, seed: int) -> None:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = diffusers_unet().train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=16, shuffle=True)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=len(loader) * 100)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)

    def ema_weights() -> dict[str, torch.Tensor]:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        ema.restore(model.parameters())
        return weights

    step = 0
    while not clock.done():
        for (clean,) in loader:
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, T, (clean.shape[0],))
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            with autocast(bf16):
                pred = model(noisy, timesteps, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            step += 1
            if clock.due():
                clock.snapshot(ema_weights, step, raw=model.state_dict)
                if clock.done():
                    return


class _Stop(Exception):
    """Raised from the EMA update hook once the last mark is written."""


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, image in enumerate(pixels):
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")


def train_lucidrains(images: torch.Tensor, clock: Clock, bf16: bool, seed: int) -> None:
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer

    torch.manual_seed(seed)
    folder = clock.out / "images"
    write_pngs(images, folder)
    diffusion = GaussianDiffusion(lucidrains_unet(), image_size=28, timesteps=T, sampling_timesteps=50)
    trainer = Trainer(diffusion, str(folder), train_batch_size=32, gradient_accumulate_every=2, train_lr=8e-5,
                      train_num_steps=10 ** 9, ema_decay=0.995, amp=bf16, mixed_precision_type="bf16",
                      augment_horizontal_flip=False, calculate_fid=False, save_and_sample_every=10 ** 9,
                      results_folder=str(clock.out / "results"))
    update = trainer.ema.update

    def update_and_snapshot() -> None:
        update()
        if clock.due():
            clock.snapshot(lambda: trainer.ema.ema_model.model.state_dict(), trainer.step,
                           raw=trainer.model.model.state_dict)
            if clock.done():
                raise _Stop

    trainer.ema.update = update_and_snapshot
    with contextlib.suppress(_Stop):
        trainer.train()


def training_precision(peer: str) -> bool:
    """Whether bf16 autocast trains this peer's network faster here (difflab's auto rule)."""
    from difflab.training.precision import resolve

    net = PeerNetwork(peer, diffusers_unet() if peer == "diffusers" else lucidrains_unet())
    decision = resolve("auto", "cpu", False, net, (32, 1, 28, 28), cache_dir=".cache", kind=f"peer-{peer}")
    return decision.precision == "bf16-mixed"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--marks", type=float, nargs="+", required=True, help="wall-clock seconds")
    parser.add_argument("--start", type=float, default=None, help="Unix time the clock starts at (default: now)")
    parser.add_argument("--precision", choices=("auto", "32", "bf16"), default="auto")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    start = time.time() if args.start is None else args.start
    try:
        check_marks(args.marks)
    except ValueError as error:
        parser.error(f"--{error}")
    bf16 = training_precision(args.peer) if args.precision == "auto" else args.precision == "bf16"
    clock = Clock(args.marks, start, args.out)
    images = train_images(args.seed)
    (train_diffusers if args.peer == "diffusers" else train_lucidrains)(images, clock, bf16, args.seed)
    record = {"peer": args.peer, "bf16": bf16, "snapshots": clock.taken, "ended_s": round(clock.elapsed(), 2)}
    (args.out / "peer.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
