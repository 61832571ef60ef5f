"""Time to quality, side by side (`make ttq`): difflab's default recipe and the two peers of
`../shared/peer_bench.py`, each trained the way its own examples train it (benchmarks/
ttq_peers.py), one after another on this machine, with EMA snapshots at wall-clock marks.

Every snapshot is scored the same way: difflab's DDIM sampler (eta 0, x0 clipped to [-1, 1])
on the model's own schedule and objective, the same n, noise seed and domain features (the
offline classifier of mnist5k), in the inference precision difflab's `auto` picks for each
network. Prints FID against wall time and, per peer, how much sooner difflab reached the
FID that peer had at its last mark (the time where difflab's curve crosses it, interpolated
linearly between difflab's marks; at or before its first mark if it starts better).

    python benchmarks/ttq.py                       # ~45 min on 2 CPU cores
    python benchmarks/ttq.py --peer-marks 60 120 --marks 30 60 --n 200 --steps 25   # a short look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttq_peers  # noqa: E402

from difflab.cli.sample import build_denoiser, load_model  # noqa: E402
from difflab.data import ImageDataModule  # noqa: E402
from difflab.diffusion import Denoiser, NoiseSchedule  # noqa: E402
from difflab.diffusion.samplers import DDIMSampler  # noqa: E402
from difflab.metrics.evaluate import SampleEvaluator  # noqa: E402
from difflab.training.inference_precision import AutocastNetwork, resolve_inference  # noqa: E402
from difflab.training.precision import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIFFLAB_MARKS = (30, 60, 90, 120, 150, 180, 240, 300, 450, 600)
PEER_MARKS = (60, 150, 300, 600)


def launch(command: list[str], log: Path) -> float:
    """Run `command` from the repo root; its wall time. The clock of its snapshots is `start`."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def train_difflab(out: Path, marks: Sequence[float], overrides: Sequence[str]) -> list[dict[str, Any]]:
    """The default recipe (plus `overrides`); its snapshots, and its final EMA weights at the
    run's whole wall time (final grid and FID callback included) if it ended before the last mark."""
    run_dir = out / "difflab"
    marks_arg = "[" + ",".join(f"{m:g}" for m in marks) + "]"
    seconds = launch([sys.executable, "-m", "difflab.cli.train", "callbacks=wallclock", "callbacks.progress_bar=null",
            f"callbacks.wallclock_snapshots.marks_s={marks_arg}",
            f"callbacks.wallclock_snapshots.start_time={time.time()}", f"hydra.run.dir={run_dir}", *overrides],
           out / "difflab.log")
    result = json.loads((run_dir / "result.json").read_text())
    folder = run_dir / "checkpoints" / "wallclock"
    taken = [{**snap, "path": folder / snap["file"]} for snap in snapshots(folder)]
    if len(taken) < len(marks):
        taken.append({"mark_s": "end", "elapsed_s": round(seconds, 2), "step": result.get("steps"),
                      "path": run_dir / "checkpoints" / "ema.pt"})
    precision = (result.get("precision") or {}).get("precision")
    return [{**snap, "train_precision": precision} for snap in taken]


def train_peer(out: Path, peer: str, marks: Sequence[float], precision: str) -> list[dict[str, Any]]:
    folder = out / peer
    launch([sys.executable, str(Path(__file__).parent / "ttq_peers.py"), peer, "--out", str(folder),
            "--marks", *map(str, marks), "--start", str(time.time()), "--precision", precision],
           out / f"{peer}.log")
    record = json.loads((folder / "peer.json").read_text())
    return [{**snap, "path": folder / snap["file"], "train_precision": "bf16-mixed" if record["bf16"] else "32-true"}
            for snap in record["snapshots"]]


def difflab_denoiser(path: Path, cache_dir: str, precision: str = "auto") -> tuple[Denoiser, NoiseSchedule]:
    run_config, weights, _ = load_model(str(path), torch.device("cpu"))
    return build_denoiser(run_config, weights, torch.device("cpu"), precision=precision, cache_dir=cache_dir,
                          batch=256)


def peer_denoiser(peer: str, path: Path, cache_dir: str, precision: str = "auto", raw: bool = False
                  ) -> tuple[Denoiser, NoiseSchedule]:
    """The peer's EMA weights at a snapshot (``raw``: its live weights) through difflab's Denoiser."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    net = ttq_peers.peer_network(peer, payload["raw_state_dict" if raw else "state_dict"])
    kind, objective = ttq_peers.peer_schedule(peer)
    schedule = NoiseSchedule(kind, ttq_peers.T)
    decision = resolve_inference(precision, "cpu", net, (256, 1, 28, 28), channels_last=False, cache_dir=cache_dir)
    return Denoiser(AutocastNetwork.wrap(net, decision), schedule, objective, clip_range=1.0), schedule


def score(evaluator: SampleEvaluator, denoiser: Denoiser, schedule: NoiseSchedule, n: int, steps: int,
          seed: int, spacing: str = "leading") -> dict[str, float]:
    sampler = DDIMSampler(steps=steps, spacing=spacing)
    start = time.perf_counter()
    generated = evaluator.generate(lambda size, cond, g: sampler.sample(denoiser, schedule, (size, 1, 28, 28),
                                                                        generator=g), n,
                                   generator=torch.Generator().manual_seed(seed), keep_images=0)
    scores = evaluator.score(generated.features)
    return {"fid": round(scores["fid"], 3), "precision": round(scores["precision"], 3),
            "recall": round(scores["recall"], 3), "sample_s": round(time.perf_counter() - start, 1)}


def crossing_time(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    """The first wall time at which the FID curve [(seconds, fid), ...] reaches `target`
    (linear between points; the first point's time if it is already there); None if never."""
    for i, (seconds, fid) in enumerate(curve):
        if fid <= target:
            if i == 0:
                return seconds
            (s0, f0), (s1, f1) = curve[i - 1], (seconds, fid)
            return s0 + (f0 - target) / (f0 - f1) * (s1 - s0)
    return None


def snapshots(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "wallclock.json").read_text())["snapshots"]


def report(rows: list[dict[str, Any]], here: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict]:
    curve = [(r["elapsed_s"], r["fid"]) for r in rows if r["model"] == "difflab"]
    lines = [f"machine: {here.get('cpu')}, {here.get('threads')} threads, torch {here.get('torch')}; "
             f"DDIM-{args.steps} ({args.spacing}), n={args.n}, domain FID, scored in {args.score_precision}", "",
             "| model | mark (s) | taken at (s) | step | train precision | domain FID | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['mark_s']} | {r['elapsed_s']:.0f} | {r['step']} | {r['train_precision']} | "
              f"{r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |" for r in rows]
    ratios = {}
    for peer in args.peers:
        last = best_at_last_mark(rows, peer)
        # The peer's own first time at that quality (its curve need not fall at every mark).
        peer_s = crossing_time(peer_curve(rows, peer), last["fid"])
        reached = crossing_time(curve, last["fid"])
        ratios[peer] = {"peer_fid": last["fid"], "peer_weights": last["model"], "peer_s": peer_s, "difflab_s": reached,
                        "times_sooner": None if reached is None else round(peer_s / reached, 2),
                        "at_each_mark": ratios_at_marks(rows, peer, curve)}
        lines.append("")
        first = reached is not None and reached == curve[0][0]  # already there at its first mark: a bound
        ratios[peer]["lower_bound"] = first
        lines.append(f"{last['model']} at {peer_s:.0f} s: FID {last['fid']:.2f}; difflab reached it "
                     + ("never (within its marks)" if reached is None else
                        f"{'by' if first else 'at'} {reached:.0f} s: {'>= ' if first else ''}"
                        f"{ratios[peer]['times_sooner']:.2f}x sooner"))
        lines.append("  at each of its marks: " + "; ".join(
            f"{m['peer_s']:.0f} s FID {m['peer_fid']:.2f} -> " + ("never" if m["difflab_s"] is None else
                                                               f"{'<=' if m['lower_bound'] else ''}{m['difflab_s']:.0f} s "
                                                               f"({'>=' if m['lower_bound'] else ''}{m['times_sooner']:.1f}x)")
            for m in ratios[peer]["at_each_mark"]))
    return "\n".join(lines) + "\n", ratios


def peer_curve(rows: list[dict[str, Any]], peer: str) -> list[tuple[float, float]]:
    """The peer's best FID at each mark, EMA or live weights (when both were scored)."""
    marks: dict[float, float] = {}
    for r in rows:
        if r["model"] in (peer, f"{peer} (raw)"):
            marks[r["elapsed_s"]] = min(r["fid"], marks.get(r["elapsed_s"], float("inf")))
    return sorted(marks.items())


def best_at_last_mark(rows: list[dict[str, Any]], peer: str) -> dict[str, Any]:
    """The peer's row at its last mark with the lower FID of its EMA and live weights."""
    last = max(r["mark_s"] for r in rows if r["model"] == peer)
    return min((r for r in rows if r["model"] in (peer, f"{peer} (raw)") and r["mark_s"] == last),
               key=lambda r: r["fid"])


def ratios_at_marks(rows: list[dict[str, Any]], peer: str, curve: list[tuple[float, float]]) -> list[dict]:
    """How much sooner difflab reached the peer's (best) FID at each of the peer's marks."""
    out = []
    for seconds, fid in peer_curve(rows, peer):
        reached = crossing_time(curve, fid)
        out.append({"peer_s": seconds, "peer_fid": fid, "difflab_s": reached,
                    "times_sooner": None if reached is None else round(seconds / reached, 2),
                    "lower_bound": reached is not None and reached == curve[0][0]})
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        points = [(r["elapsed_s"] / 60, r["fid"]) for r in rows if r["model"] == model]
        ax.plot(*zip(*points), marker="o", label=model)
    ax.set(xlabel="wall time (min)", ylabel="domain FID", yscale="log", title="time to quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "ttq" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--marks", type=float, nargs="+", default=list(DIFFLAB_MARKS), help="difflab's, seconds")
    parser.add_argument("--peer-marks", type=float, nargs="+", default=list(PEER_MARKS), help="the peers', seconds")
    parser.add_argument("--peers", nargs="*", default=list(ttq_peers.PEERS), choices=ttq_peers.PEERS)
    parser.add_argument("--peer-precision", choices=("auto", "32", "bf16"), default="auto")
    parser.add_argument("--n", type=int, default=500, help="samples per snapshot")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    parser.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default="leading",
                        help="DDIM timestep spacing of the scoring (trailing starts at T-1 on every schedule)")
    parser.add_argument("--score-precision", choices=("auto", "32-true"), default="auto",
                        help="what every snapshot samples in (32-true: the same arithmetic for all)")
    parser.add_argument("--raw", action="store_true",
                        help="also score the peers' live weights; a peer's quality is then the better of the two")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--train-args", nargs="*", default=[], help="difflab-train overrides (default: none)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    runs = {"difflab": train_difflab(args.out, args.marks, args.train_args)}
    for peer in args.peers:
        runs[peer] = train_peer(args.out, peer, args.peer_marks, args.peer_precision)

    datamodule = ImageDataModule("mnist5k", batch_size=32, seed=42)
    evaluator = SampleEvaluator(datamodule, "domain", args.cache_dir)
    rows = []
    for model, taken in runs.items():
        for snap in taken:
            path = snap.pop("path")
            weights = [False, True] if model != "difflab" and args.raw else [False]
            for raw in weights:
                denoiser, schedule = (difflab_denoiser(path, args.cache_dir, args.score_precision)
                                      if model == "difflab" else
                                      peer_denoiser(model, path, args.cache_dir, args.score_precision, raw=raw))
                rows.append({"model": f"{model} (raw)" if raw else model, **snap,
                             "file": str(path.relative_to(args.out)),
                             **score(evaluator, denoiser, schedule, args.n, args.steps, args.seed, args.spacing)})
                print(json.dumps(rows[-1]), flush=True)
    here = machine()
    text, ratios = report(rows, here, args)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"machine": here, "rows": rows, "ratios": ratios,
                                                       "n": args.n, "steps": args.steps}, indent=1) + "\n")
    plot(rows, args.out / "fid_vs_time.png")
    print(text + f"\n{args.out / 'results.md'}")
    return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
