"""Few steps: consistency tuning (ECT) against DDIM and DPM-Solver++ at 10 steps (`make few-steps`).

1. The default experiment (or `--base <run>/checkpoints/ema.pt`, a model already trained).
2. Consistency tuning of it: `difflab-train experiment=mnist5k_ect init_from=<its ema.pt>`.
3. difflab-evaluate on both, the same 500 samples' noise and domain FID: the trained model with
   DDIM and DPM-Solver++ at 1, 2 and 10 steps and with one and two plain x_0 predictions
   (`sampler=consistency` untuned), the tuned model with `sampler=consistency` at 1 and 2.
Writes results.md and results.json under outputs/few_steps/<time>/.

    python benchmarks/few_steps.py                       # about 12 minutes on 2 CPU cores
    python benchmarks/few_steps.py --base outputs/train/runs/<run>/checkpoints/ema.pt
"""

from __future__ import annotations

import argparse
import csv
import json
from datetime import datetime
from pathlib import Path

from latent_vs_pixel import ROOT, run, train

from difflab.metrics import report
from difflab.training.precision import machine

COLUMNS = ("model", "sampler", "steps", "nfe", "fid", "precision", "recall", "class_coverage", "seconds")


def evaluate(out: Path, name: str, ckpt: Path, samplers: str, steps: str) -> list[dict]:
    run_dir = out / f"eval_{name}"
    run("difflab.cli.evaluate", f"ckpt={ckpt}", f"samplers={samplers}", f"steps={steps}", "real_baseline=false",
        f"hydra.run.dir={run_dir}")
    with open(run_dir / "results.csv", newline="") as handle:
        return [{"model": name, **row} for row in csv.DictReader(handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "few_steps"
                        / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--base", type=Path, default=None, help="a trained ema.pt (default: train the default run)")
    parser.add_argument("--tune", nargs="*", default=[], help="extra overrides of the tuning run, e.g. trainer.max_epochs=8")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_seconds = None
    if args.base is None:
        base = train(out, "trained")
        ckpt, base_seconds = base["dir"] / "checkpoints" / "ema.pt", base["seconds"]
    else:
        ckpt = args.base.resolve()
    tuned = train(out, "tuned", "experiment=mnist5k_ect", f"init_from={ckpt}", *args.tune)
    rows = evaluate(out, "trained", ckpt, "[ddim,dpmpp,consistency]", "[1,2,10]")
    rows += evaluate(out, "tuned", tuned["dir"] / "checkpoints" / "ema.pt", "[consistency]", "[1,2]")
    rows = [r for r in rows if not (r["sampler"] == "consistency" and r["steps"] == "10")]
    rows = [{k: _number(v) for k, v in row.items()} for row in rows]
    lines = [report.markdown_table(rows, COLUMNS)]
    here = machine()
    lines.insert(0, f"machine: {here.get('cpu')}, {here.get('threads')} threads, torch {here.get('torch')}; "
                    f"training {base_seconds and round(base_seconds)} s, tuning {round(tuned['seconds'])} s "
                    f"({tuned['steps']} steps, {tuned['precision']})\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"machine": here, "rows": rows, "base": str(ckpt),
                                                  "tuning_seconds": tuned["seconds"]}, indent=2) + "\n")
    print("\n".join(lines))
    print(f"\n{out / 'results.md'}")


def _number(value: str) -> object:
    """A results.csv cell as a number where it is one (the table formats numbers alike)."""
    try:
        return float(value) if "." in value or "e" in value else int(value)
    except ValueError:
        return value


if __name__ == "__main__":
    main()
