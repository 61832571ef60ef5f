"""Is latent space worth it here? Pixel diffusion against autoencoder + latent diffusion, at
the default run's wall-time budget and at half of it, on this machine (`make latent-table`).

1. The default experiment in pixel space: its wall time T (start-up, grids and FID included)
   is the budget.
2. The autoencoder (experiment=mnist5k_autoencoder) takes part of it.
3. Latent diffusion (experiment=mnist5k_latent) gets the rest. A 1-epoch run measures what a
   latent run spends outside its training steps (start-up, the latents' encoding, grids and
   the final FID); the budget's run gets the remainder as `trainer.budget_minutes`, so its
   own time budget plans the epochs from the step rate it measures (as the default does).
4. The same at T / 2: the pixel run with as many epochs as fit (a 1-epoch run and the
   default's run give its start-up and epoch time), an autoencoder with half its epochs,
   and latent diffusion planned to what is left.
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

from difflab.training.plan import STEP_FRACTION
from difflab.training.precision import machine

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
MOST_EPOCHS = 200  # the latent runs' max_epochs: their time budget plans fewer
# What a long latent run spends between its steps beyond a 1-epoch run's overhead (validation
# every 5 epochs, grids, the mid-run FID): 3.5% of its step time on Intel-AMX (65 epochs).
IN_RUN_EXTRAS = 0.05


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


def outside_steps(run: dict) -> float:
    """Seconds of a finished run spent outside its training steps: its wall time less its
    steps at the rate it measured (start-up, data, grids, validation, the final FID)."""
    return max(run["seconds"] - run["steps"] / (run["img_per_s"] / BATCH), 0.0)


def latent_budget_minutes(budget: float, ae_seconds: float, overhead: float) -> float:
    """The `trainer.budget_minutes` of a latent run whose steps fill what is left of `budget`
    after the autoencoder and a latent run's overhead (less `IN_RUN_EXTRAS`). The time budget
    plans `STEP_FRACTION` of its minutes as steps, so the minutes are scaled up by it. Nothing
    left is an error that says so."""
    left = budget - ae_seconds - overhead
    if left <= 0:
        sys.exit(f"no time left for latent diffusion: budget {budget:.0f} s, autoencoder {ae_seconds:.0f} s, "
                 f"a latent run's start-up and evaluation {overhead:.0f} s; give the default run a longer "
                 "trainer.budget_minutes or the autoencoder fewer epochs")
    return left * (1 - IN_RUN_EXTRAS) / STEP_FRACTION / 60


def latent_within(out: Path, tag: str, budget: float, ae: dict, overhead: float) -> dict:
    """Latent diffusion planned by its own time budget to what is left of `budget` after `ae`."""
    minutes = latent_budget_minutes(budget, ae["seconds"], overhead)
    ckpt = ae["dir"] / "checkpoints" / "autoencoder.pt"
    latent = train(out, f"latent_{tag}", "experiment=mnist5k_latent", f"first_stage.ckpt={ckpt}",
                   f"trainer.max_epochs={MOST_EPOCHS}", f"trainer.budget_minutes={minutes:.4f}",
                   "trainer.max_time=null")
    return {**latent, "epochs": run_epochs(latent["dir"])}


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
    overhead = outside_steps(train(out, "latent_1_epoch", "experiment=mnist5k_latent", first_stage,
                                   "trainer.max_epochs=1"))
    latent = latent_within(out, "full", budget, ae, overhead)

    pixel_start_up, pixel_epoch = timing(train(out, "pixel_1_epoch", "trainer.max_epochs=1"), pixel,
                                        (1, pixel_epochs))
    pixel_half_epochs = epochs_that_fit(budget / 2, pixel_start_up, pixel_epoch, most=pixel_epochs)
    pixel_half = {**train(out, "pixel_half", f"trainer.max_epochs={pixel_half_epochs}"), "epochs": pixel_half_epochs}
    ae_half = train(out, "ae_half", "experiment=mnist5k_autoencoder", "trainer.max_epochs=3")
    latent_half = latent_within(out, "half", budget / 2, ae_half, overhead)

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
