"""`make bench`: difflab's U-Net next to the peer U-Nets, in one run on one machine.

    python benchmarks/bench.py [--peer PATH] [--quick] [--compile] [--device auto|cpu|cuda]
                               [--batch N] [--rounds N] [--out DIR]

The peers and the measuring protocol (batch, warm-up, iterations, Adam step, MSE to eps,
FLOP counting) come from importing the peer script (default ../shared/peer_bench.py from
the repo root), so both sides are timed by the same functions. If that script or a peer
package is missing, a note says so and difflab's numbers are still reported, timed by a
local stand-in of the same protocol.

On a GPU (`--device auto` picks CUDA where there is one) the peer script's timing functions
cannot be used as they are: they build their batches on the CPU and autocast the CPU. The
stand-in then times every model, the peers' own U-Nets (still built by the peer script)
included, by the same protocol on the GPU, synchronising before each clock read, with more
iterations (batches of 64 small digits take milliseconds there). `--batch` changes the batch
of every model; at the peers' 64 a GPU mostly measures launch overhead.

Every model is timed in four settings (fp32 / bf16 autocast x contiguous / channels_last)
and compared at its own fastest one. The run also measures this machine's matmul peak in
fp32 and bf16, so each rate is reported as a fraction of the peak of the precision it ran
in; it names the machine and what `precision: auto` chooses for the default model; and it
measures gradient checkpointing (speed, and the activations a training step keeps).

Prints one JSON object on stdout (also kept in `--out`, default outputs/bench/); a
human-readable table goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import convolution_share  # noqa: E402

from difflab.models import UNet  # noqa: E402
from difflab.training import precision  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEER = REPO_ROOT.parent / "shared" / "peer_bench.py"
CL = torch.channels_last
DEVICE = torch.device("cpu")  # where every model is timed; main() sets it from --device
# The peers' shape of the problem: 28x28x1 digits, channels 32/64/128, attention in the middle.
PEER_CONFIG = dict(
    in_channels=1, base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=1,
    attention_levels=(1,), mid_attention=True, num_groups=8, image_size=28,
)


def model_config(name: str) -> dict:
    """The U-Net arguments of conf/model/<name>.yaml for the 28x28x1 digits."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{name}.yaml"))
    config.pop("defaults", None)
    return {**config, "in_channels": 1, "image_size": 28}


DEFAULT_MODEL = "unet_mnist_patch"  # conf/train.yaml's model
DEFAULT_CONFIG = model_config(DEFAULT_MODEL)
LITE_CONFIG = model_config("unet_mnist_lite")  # the earlier default
SETTINGS = [(p, layout) for p in ("fp32", "bf16") for layout in ("contiguous", "channels_last")]


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


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a clock read times it (nothing on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def local_protocol(batch: int = 64, shape=(1, 28, 28), iters: int = 8, warmup: int = 2):
    """Stand-in for the peer script's timing functions when it is unavailable (or on a GPU):
    same batch, warm-up, iterations, Adam(1e-4) step and MSE-to-eps loss, on DEVICE."""

    def inputs():
        return (torch.randn(protocol.BATCH, *protocol.SHAPE, device=DEVICE),
                torch.randint(0, 1000, (protocol.BATCH,), device=DEVICE))

    def timed(step):
        for i in range(protocol.WARMUP + protocol.ITERS):
            if i == protocol.WARMUP:
                synchronize()
                start = time.perf_counter()
            step()
        synchronize()
        return protocol.BATCH * protocol.ITERS / (time.perf_counter() - start)

    def train_rate(model, fwd, bf16=False):
        optimiser = torch.optim.Adam(model.parameters(), 1e-4)
        x, t = inputs()
        eps = torch.randn_like(x)

        def step():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
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


# -- the machine ------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """GFLOP/s of an n x n matmul in `dtype` on DEVICE (best of repeated runs; on a GPU n is
    raised to 8192, the size at which its matrix units run near their peak)."""
    if DEVICE.type == "cuda":
        n = max(n, 8192)
    a, b = torch.randn(n, n, device=DEVICE).to(dtype), torch.randn(n, n, device=DEVICE).to(dtype)
    a @ b
    synchronize()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        synchronize()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best / 1e9


def auto_choice() -> dict:
    """What `precision: auto` decides for the default model at the default batch (a fresh probe)."""
    torch.manual_seed(0)
    decision = precision.resolve("auto", DEVICE.type, "auto", UNet(**DEFAULT_CONFIG), (32, 1, 28, 28))
    return {"precision": decision.precision, "channels_last": decision.channels_last,
            "probe_img_s": decision.rates, "probe_seconds": decision.probe_seconds}


def pick_device(name: str) -> str:
    """cuda or cpu for --device (auto as training resolves it: precision.device_kind); asking
    for cuda where there is none is an error that says so."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but torch sees no CUDA GPU here; use --device cpu (or auto)")
    return precision.device_kind(name)


def gpu_name() -> dict:
    """The GPU's name and CUDA version where the models are timed on one."""
    if DEVICE.type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(DEVICE), "cuda": torch.version.cuda}


# -- timing one model in every setting --------------------------------------------------
def _forward(fwd, channels_last: bool, bf16_eval: bool):
    """`fwd` with the input in the layout, under bf16 autocast when `bf16_eval` (denoising).
    Without it no autocast context is entered at all: an `autocast(enabled=False)` here would
    switch off the training step's own bf16 autocast and time a bf16 setting in fp32."""
    def forward(model, x, t):
        if channels_last:
            x = x.contiguous(memory_format=CL)
        if not bf16_eval:
            return fwd(model, x, t)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return fwd(model, x, t)

    return forward


def _call(model, x, t):
    return model(x, t)


def flops_forward(model, fwd, protocol) -> float:
    x = torch.randn(protocol.BATCH, *protocol.SHAPE, device=DEVICE)
    t = torch.randint(0, 1000, (protocol.BATCH,), device=DEVICE)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fwd(model, x, t)
    return counter.get_total_flops() / protocol.BATCH


def on_device(build):
    """`build` with its model moved to DEVICE (the peer script builds on the CPU)."""
    def moved():
        model, fwd = build()
        return model.to(DEVICE), fwd
    return moved


def in_setting(build, setting: str, kind: str):
    """(a fresh model from `build()` in `setting`'s layout, its forward for `kind`, whether the
    setting is bf16). Training's forward enters no autocast: the step's own bf16 autocast
    covers it; denoising's runs under bf16 autocast itself."""
    dtype, layout = setting.split("/")
    model, fwd = build()
    if layout == "channels_last":
        model = model.to(memory_format=CL)
    bf16 = dtype == "bf16"
    return model, _forward(fwd, layout == "channels_last", bf16 and kind == "denoise"), bf16


def time_setting(protocol, build, setting: str, kind: str) -> float:
    """img/s of a fresh model from `build()` in `setting` ("fp32/channels_last", ...), for
    `kind` "train" (the protocol's training step) or "denoise" (a forward without gradients)."""
    model, forward, bf16 = in_setting(build, setting, kind)
    if kind == "train":
        return protocol.train_rate(model, forward, bf16=bf16)
    model.eval()
    return protocol.eval_rate(model, forward)


def head_to_head(protocol, builders: dict, out: dict, rounds: int) -> dict:
    """The named models again at their fastest settings, in `rounds` interleaved rounds, each
    rate keeping its best: a load that slows one moment of a shared machine then slows one
    round of every model instead of deciding a ratio alone (one round of the table can move a
    model by 20-30% here)."""
    best = {name: {"train": 0.0, "denoise": 0.0} for name in builders}
    for _ in range(rounds):
        for name, build in builders.items():
            for kind in ("train", "denoise"):
                setting = out["models"][name][f"best_{kind}"]["setting"]
                best[name][kind] = max(best[name][kind], time_setting(protocol, on_device(build), setting, kind))
    return best


def bench_model(protocol, build, rough_bf16: bool) -> dict:
    """Train and denoise img/s in every setting; `build()` -> (fresh model, forward fn)."""
    build = on_device(build)
    model, fwd = build()
    result = {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_gflop_per_img": protocol.flops_per_image(model, fwd) / 1e9,
        "denoise_gflop_per_img": flops_forward(model, fwd, protocol) / 1e9,
        "train_img_s": {}, "denoise_img_s": {},
    }
    for dtype, layout in SETTINGS:
        name = f"{dtype}/{layout}"
        saved = protocol.ITERS, protocol.WARMUP
        if dtype == "bf16" and rough_bf16:  # bf16 far slower than fp32 here: one timed step is enough
            protocol.ITERS, protocol.WARMUP = 1, 0  # a step of seconds: set-up costs are lost in it
        try:
            for kind in ("train", "denoise"):
                result[f"{kind}_img_s"][name] = time_setting(protocol, build, name, kind)
        finally:
            protocol.ITERS, protocol.WARMUP = saved
    for kind in ("train", "denoise"):
        rates = result[f"{kind}_img_s"]
        best = max(rates, key=rates.get)
        result[f"best_{kind}"] = {"setting": best, "img_s": rates[best]}
    return result


def peak_fraction(result: dict, peaks: dict) -> None:
    """Achieved GFLOP/s of each model's best setting over the matmul peak of its precision.

    Where bf16 matmuls are slower than fp32 (no bf16 arithmetic: autocast's convolutions and
    normalisations then run much of their work in fp32), a bf16 setting is measured against
    the fp32 peak, the faster of the two, so the fraction stays a fraction of what the machine
    can do."""
    for kind in ("train", "denoise"):
        best = result[f"best_{kind}"]
        gflops = best["img_s"] * result[f"{kind}_gflop_per_img"]
        best["gflop_s"] = gflops
        precision_peak = peaks[best["setting"].split("/")[0]]
        best["fraction_of_matmul_peak"] = gflops / max(precision_peak, peaks["fp32"])


def profile_steps(protocol, builders: dict, out: dict, peaks: dict) -> dict:
    """Each named model's training step at its fastest setting, profiled on the CPU: the share
    of the step inside convolutions and their rate (step_profile.py)."""
    profiled = {}
    for name, build in builders.items():
        setting = out["models"][name]["best_train"]["setting"]
        model, forward, bf16 = in_setting(build, setting, "train")
        x = torch.randn(protocol.BATCH, *protocol.SHAPE)
        t = torch.randint(0, 1000, (protocol.BATCH,))
        share = convolution_share(model, forward, x, t, bf16=bf16)
        peak = max(peaks["bf16" if bf16 else "fp32"], peaks["fp32"])  # as peak_fraction: emulated bf16 against fp32
        profiled[name] = {"setting": setting, **share,
                          "convolution_fraction_of_matmul_peak": share["convolution_gflop_s"] / peak}
    return profiled


# -- gradient checkpointing: speed and peak memory --------------------------------------
def saved_activation_mb(model, x: torch.Tensor, t: torch.Tensor, bf16: bool) -> float:
    """Megabytes of tensors autograd keeps for the backward pass of one forward: the memory a
    training step holds at its peak beyond weights and optimizer state, and what gradient
    checkpointing saves (a checkpointed block keeps only its inputs). Counted per storage."""
    seen: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t).float().square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def bench_checkpointing(protocol, bf16: bool) -> dict:
    """Training img/s and saved activations, without and with gradient checkpointing."""
    out = {"precision": "bf16" if bf16 else "fp32"}
    x = torch.randn(protocol.BATCH, *protocol.SHAPE, device=DEVICE).contiguous(memory_format=CL)
    t = torch.randint(0, 1000, (protocol.BATCH,), device=DEVICE)
    for checkpointing in (False, True):
        key = "checkpointing" if checkpointing else "plain"
        torch.manual_seed(0)
        model = UNet(**PEER_CONFIG, gradient_checkpointing=checkpointing).to(DEVICE, memory_format=CL)
        out[f"{key}_activation_mb"] = saved_activation_mb(model, x, t, bf16)
        out[f"{key}_train_img_s"] = protocol.train_rate(model, _forward(_call, True, False),
                                                        bf16=bf16)
    out["memory_saving"] = 1 - out["checkpointing_activation_mb"] / out["plain_activation_mb"]
    out["speed_cost"] = 1 - out["checkpointing_train_img_s"] / out["plain_train_img_s"]
    return out


def bench_compiled(protocol, bf16: bool) -> dict:
    model = UNet(**PEER_CONFIG).to(DEVICE, memory_format=CL)
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    train = protocol.train_rate(compiled, _forward(_call, True, False), bf16=bf16)
    compiled.eval()
    denoise = protocol.eval_rate(compiled, _forward(_call, True, bf16))
    return {"precision": "bf16" if bf16 else "fp32", "train_img_s": train, "denoise_img_s": denoise,
            "compile_and_bench_s": time.perf_counter() - start}


# -- report -----------------------------------------------------------------------------
def table(out: dict) -> str:
    head = (f"{'model':26s}{'params M':>9s}{'GFLOP/img':>10s}  {'best train setting':24s}{'img/s':>8s}{'peak':>6s}"
            f"  {'best denoise setting':24s}{'img/s':>8s}{'peak':>6s}")
    rows = [head]
    for name, result in out["models"].items():
        tr, de = result["best_train"], result["best_denoise"]
        rows.append(f"{name:26s}{result['params_M']:9.2f}{result['train_gflop_per_img']:10.2f}  "
                    f"{tr['setting']:24s}{tr['img_s']:8.1f}{tr['fraction_of_matmul_peak']:6.0%}  "
                    f"{de['setting']:24s}{de['img_s']:8.1f}{de['fraction_of_matmul_peak']:6.0%}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="path of peer_bench.py")
    parser.add_argument("--quick", action="store_true", help="fewer timed iterations (noisier)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd difflab")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to time the models (auto: the GPU where there is one)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the peer configuration against diffusers (0: none)")
    parser.add_argument("--batch", type=int, default=None, help="batch of every model (default: the peers' 64)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench", help="where the JSON is kept")
    args = parser.parse_args(argv)

    global DEVICE
    DEVICE = torch.device(pick_device(args.device))
    peer, note = load_peer(args.peer)
    protocol = peer if peer is not None and DEVICE.type == "cpu" else local_protocol()
    if DEVICE.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as trainer=gpu runs (fixed shapes)
        protocol.ITERS, protocol.WARMUP = 50, 10  # a step takes milliseconds there
    if args.quick:  # the peer functions read these module globals at call time
        protocol.ITERS, protocol.WARMUP = 3, 1
    if args.batch is not None:
        protocol.BATCH = args.batch
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rough_bf16 = peaks["bf16"] < 0.5 * peaks["fp32"]
    out = {
        "machine": {**precision.machine(), **gpu_name()},
        "matmul_peak_gflop_s": peaks,
        "auto": auto_choice(),
        "protocol": {"batch": protocol.BATCH, "shape": list(protocol.SHAPE),
                     "iters": protocol.ITERS, "warmup": protocol.WARMUP,
                     "device": DEVICE.type,
                     "source": str(args.peer) if protocol is peer else "local stand-in"},
        "notes": [note] if note else [],
        "models": {},
    }
    if peer is not None and protocol is not peer:
        out["notes"].append(f"on {DEVICE.type}: every model, the peers' U-Nets too, timed by the local "
                            "stand-in of the peer protocol (the peer script's functions run on the CPU only)")
    if rough_bf16:
        out["notes"].append("bf16 matmul is slower than half of fp32 here: bf16 settings timed over one step, without warm-up")

    def ours(config):
        def build():
            torch.manual_seed(0)
            return UNet(**config), _call
        return build

    out["models"]["difflab (peer config)"] = bench_model(protocol, ours(PEER_CONFIG), rough_bf16)
    out["models"][f"difflab {DEFAULT_MODEL}"] = bench_model(protocol, ours(DEFAULT_CONFIG), rough_bf16)
    out["models"]["difflab unet_mnist_lite"] = bench_model(protocol, ours(LITE_CONFIG), rough_bf16)
    if peer is not None:
        for name, builder in (("diffusers", "diffusers_unet"), ("lucidrains", "lucidrains_unet")):
            try:
                out["models"][name] = bench_model(protocol, getattr(peer, builder), rough_bf16)
            except ImportError as error:
                out["notes"].append(f"{name} peer skipped: {error}")
    for result in out["models"].values():
        peak_fraction(result, peaks)
    if "diffusers" in out["models"]:
        ours_best, theirs = out["models"]["difflab (peer config)"], out["models"]["diffusers"]
        out["speedup_vs_diffusers"] = {
            kind: ours_best[f"best_{kind}"]["img_s"] / theirs[f"best_{kind}"]["img_s"] for kind in ("train", "denoise")}
        if args.rounds > 0:
            rates = head_to_head(protocol, {"difflab (peer config)": ours(PEER_CONFIG),
                                            "diffusers": peer.diffusers_unet}, out, args.rounds)
            out["head_to_head"] = {"rounds": args.rounds, "img_s": rates, "speedup_vs_diffusers": {
                kind: rates["difflab (peer config)"][kind] / rates["diffusers"][kind] for kind in ("train", "denoise")}}
        default = out["models"][f"difflab {DEFAULT_MODEL}"]
        out["default_speedup_vs_diffusers"] = {
            kind: default[f"best_{kind}"]["img_s"] / theirs[f"best_{kind}"]["img_s"] for kind in ("train", "denoise")}
    if DEVICE.type == "cpu":
        builders = {"difflab (peer config)": ours(PEER_CONFIG)}
        if "diffusers" in out["models"]:
            builders["diffusers"] = peer.diffusers_unet
        out["step_profile"] = profile_steps(protocol, builders, out, peaks)
    out["gradient_checkpointing"] = bench_checkpointing(protocol, bf16=out["auto"]["precision"] != "32-true")
    if args.compile:
        out["compiled"] = bench_compiled(protocol, bf16=out["auto"]["precision"] != "32-true")

    text = json.dumps(out, indent=1)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    kept = args.out / f"bench-{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    kept.write_text(text + "\n")
    m = out["machine"]
    if "gpu" in m:
        print(f"GPU: {m['gpu']} (CUDA {m['cuda']}), timed there", file=sys.stderr)
    print(f"machine: {m['cpu']} | ISA {', '.join(m['isa']) or '-'} ({m['torch_cpu_capability']}) | "
          f"{m['threads']} threads | torch {m['torch']}", file=sys.stderr)
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s | precision auto: "
          f"{out['auto']['precision']}, channels_last={out['auto']['channels_last']}", file=sys.stderr)
    print(table(out), file=sys.stderr)
    if "speedup_vs_diffusers" in out:
        s = out["speedup_vs_diffusers"]
        print(f"difflab vs diffusers, each at its fastest: train {s['train']:.2f}x, denoise {s['denoise']:.2f}x",
              file=sys.stderr)
        if "head_to_head" in out:
            h = out["head_to_head"]
            rates = ", ".join(f"{name} {r['train']:.1f} / {r['denoise']:.1f}" for name, r in h["img_s"].items())
            print(f"  best of {h['rounds']} interleaved rounds: train {h['speedup_vs_diffusers']['train']:.2f}x, "
                  f"denoise {h['speedup_vs_diffusers']['denoise']:.2f}x (train / denoise img/s: {rates})",
                  file=sys.stderr)
        d = out["default_speedup_vs_diffusers"]
        print(f"difflab's default network ({DEFAULT_MODEL}) vs diffusers: train {d['train']:.2f}x, "
              f"denoise {d['denoise']:.2f}x", file=sys.stderr)
    for name, p in out.get("step_profile", {}).items():
        print(f"{name} training step ({p['setting']}): {p['convolution_share']:.0%} of its {p['step_s'] * 1e3:.0f} ms "
              f"in convolutions ({p['convolution_flop_share']:.0%} of its FLOPs), which run at "
              f"{p['convolution_gflop_s']:.0f} GFLOP/s = {p['convolution_fraction_of_matmul_peak']:.0%} of the matmul "
              "peak: the most a step of this model could reach here", file=sys.stderr)
    g = out["gradient_checkpointing"]
    print(f"gradient checkpointing ({g['precision']}, peer config, batch {protocol.BATCH}): train "
          f"{g['plain_train_img_s']:.1f} -> {g['checkpointing_train_img_s']:.1f} img/s ({g['speed_cost']:.0%} slower); "
          f"activations kept for backward {g['plain_activation_mb']:.0f} -> {g['checkpointing_activation_mb']:.0f} MB "
          f"({g['memory_saving']:.0%} less)", file=sys.stderr)
    for line in out["notes"]:
        print("note:", line, file=sys.stderr)
    print(f"kept: {kept}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
