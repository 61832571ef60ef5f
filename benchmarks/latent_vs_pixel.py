"""Is latent space worth it here? Pixel diffusion against autoencoder + latent diffusion, at
the default run's wall-time budget and at half of it, on this machine (`make latent-table`).

1. The default experiment in pixel space: its wall time T (start-up, grids and FID included)
   is the budget.
2. The autoencoder (experiment=mnist5k_autoencoder) takes part of it.
3. Latent diffusion (experiment=mnist5k_latent) gets the rest: runs of 1 and 3 epochs measure
   its start-up (grids and FID included) and its epoch time, and the budget's run trains as
   many epochs as fit.
4. The same at T / 2: the pixel run with as many epochs as fit (a 1-epoch run and the
   default's run give its start-up and epoch time), an autoencoder with half its epochs,
   and latent diffusion with what is left.
The default's epochs are what its time budget planned on this machine (`plan` in its
result.json), so the table follows whatever the default experiment is.
Each model is scored by difflab-evaluate (DDIM-50, 500 samples, domain FID), which also times
the sampling (decoding included). Training img/s is each run's measured step rate times its
batch. Writes results.md and results.json under outputs/latent_vs_pixel/<time>/.

    python benchmarks/latent_vs_pixel.py            # about 3x the default run's wall time
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from difflab.training.precision import machine

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def run(module: str, *args: str) -> float:
    """Run a difflab CLI to completion; its wall time in seconds (start-up included)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args, "callbacks.progress_bar=null"
                           if module.endswith("train") else "progress=false"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def steps_per_second(run_dir: Path) -> float:
    """The step rate the run measured after its first steps (StepBudget's log line)."""
    match = re.search(r"([\d.]+) steps/s", (run_dir / "train.log").read_text())
    if not match:
        raise RuntimeError(f"no step rate in {run_dir / 'train.log'}")
    return float(match.group(1))


def train(out: Path, name: str, *overrides: str) -> dict:
    run_dir = out / name
    seconds = run("difflab.cli.train", *overrides, f"hydra.run.dir={run_dir}")
    result = json.loads((run_dir / "result.json").read_text())
    if result["status"] != "ok":  # a run cut short (max_time on a slow CPU) would make every estimate wrong
        sys.exit(f"{name} ended {result['status']} after {result.get('steps')} of {result.get('planned_steps')} "
                 f"steps ({result.get('stop_reason')}); the table needs complete runs: pass trainer.max_time=null")
    return {"dir": run_dir, "seconds": seconds, "steps": result.get("steps"), "status": result["status"],
            "precision": (result.get("precision") or {}).get("precision"),
            "img_per_s": steps_per_second(run_dir) * BATCH, "metrics": result["metrics"]}


def evaluate(out: Path, name: str, ckpt: Path) -> dict:
    run_dir = out / f"eval_{name}"
    run("difflab.cli.evaluate", f"ckpt={ckpt}", "samplers=[ddim]", "steps=[50]", "real_baseline=false",
        f"hydra.run.dir={run_dir}")
    with open(run_dir / "results.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    return {"fid": float(row["fid"]), "sample_seconds": float(row["seconds"])}


def run_epochs(run_dir: Path) -> int:
    """The epochs a finished run trained: what its time budget planned (`plan` in result.json),
    or its `trainer.max_epochs` (config.yaml) when it had no budget."""
    plan = json.loads((run_dir / "result.json").read_text()).get("plan")
    if plan:
        return int(plan["planned_epochs"])
    from omegaconf import OmegaConf

    return int(OmegaConf.load(run_dir / "config.yaml").trainer.max_epochs)


def epochs_that_fit(budget: float, start_up: float, epoch: float, most: int = 200) -> int:
    return max(1, min(most, math.floor((budget - start_up) / epoch)))


def timing(short: dict, long: dict, epochs: tuple[int, int]) -> tuple[float, float]:
    """(start-up, seconds per epoch) from the wall times of two runs of `epochs` epochs."""
    per_epoch = (long["seconds"] - short["seconds"]) / (epochs[1] - epochs[0])
    return short["seconds"] - epochs[0] * per_epoch, per_epoch


def latent_within(out: Path, tag: str, budget: float, ae: dict, start_up: float, per_epoch: float) -> dict:
    """Latent diffusion with the epochs that fit in `budget` after the autoencoder `ae`."""
    epochs = epochs_that_fit(budget - ae["seconds"], start_up, per_epoch)
    ckpt = ae["dir"] / "checkpoints" / "autoencoder.pt"
    latent = train(out, f"latent_{tag}", "experiment=mnist5k_latent", f"first_stage.ckpt={ckpt}",
                   f"trainer.max_epochs={epochs}")
    return {**latent, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "latent_vs_pixel"
                        / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    pixel = train(out, "pixel")  # the default experiment, as many epochs as its time budget plans here
    pixel_epochs = run_epochs(pixel["dir"])
    budget = pixel["seconds"]
    ae = train(out, "ae", "experiment=mnist5k_autoencoder")
    first_stage = f"first_stage.ckpt={ae['dir'] / 'checkpoints' / 'autoencoder.pt'}"
    short, long = (train(out, f"latent_{n}_epochs", "experiment=mnist5k_latent", first_stage,
                         f"trainer.max_epochs={n}") for n in (1, 3))
    latent_timing = timing(short, long, (1, 3))
    latent = latent_within(out, "full", budget, ae, *latent_timing)

    pixel_start_up, pixel_epoch = timing(train(out, "pixel_1_epoch", "trainer.max_epochs=1"), pixel,
                                        (1, pixel_epochs))
    pixel_half_epochs = epochs_that_fit(budget / 2, pixel_start_up, pixel_epoch, most=pixel_epochs)
    pixel_half = {**train(out, "pixel_half", f"trainer.max_epochs={pixel_half_epochs}"), "epochs": pixel_half_epochs}
    ae_half = train(out, "ae_half", "experiment=mnist5k_autoencoder", "trainer.max_epochs=3")
    latent_half = latent_within(out, "half", budget / 2, ae_half, *latent_timing)

    rows = []
    for label, budget_s, diffusion, first in (("pixel", budget, {**pixel, "epochs": pixel_epochs}, None),
                                              ("latent", budget, latent, ae),
                                              ("pixel", budget / 2, pixel_half, None),
                                              ("latent", budget / 2, latent_half, ae_half)):
        scores = evaluate(out, f"{label}_{int(budget_s)}", diffusion["dir"] / "checkpoints" / "ema.pt")
        total = diffusion["seconds"] + (first["seconds"] if first else 0.0)
        rows.append({"model": label, "budget_s": round(budget_s, 1), "autoencoder_s": round(first["seconds"], 1)
                     if first else 0.0, "diffusion_s": round(diffusion["seconds"], 1), "total_s": round(total, 1),
                     "epochs": diffusion["epochs"], "steps": diffusion["steps"], "status": diffusion["status"],
                     "precision": diffusion["precision"], "train_img_per_s": round(diffusion["img_per_s"], 1),
                     "ddim50_seconds_500": scores["sample_seconds"], "domain_fid": round(scores["fid"], 2)})
    header = ["model", "budget_s", "autoencoder_s", "diffusion_s", "total_s", "epochs", "steps", "precision",
              "train_img_per_s", "ddim50_seconds_500", "domain_fid"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    ratio = {"train_img_per_s": rows[1]["train_img_per_s"] / rows[0]["train_img_per_s"],
             "sampling_speed": rows[0]["ddim50_seconds_500"] / rows[1]["ddim50_seconds_500"]}
    lines.append(f"\nlatent / pixel: training img/s x{ratio['train_img_per_s']:.2f}, "
                 f"DDIM-50 sampling (with decoding) x{ratio['sampling_speed']:.2f} faster")
    here = machine()
    lines.insert(0, f"machine: {here.get('cpu')}, {here.get('threads')} threads, torch {here.get('torch')}\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"machine": here, "rows": rows, "ratios": ratio}, indent=2) + "\n")
    print("\n".join(lines))
    print(f"\n{out / 'results.md'}")


if __name__ == "__main__":
    main()
