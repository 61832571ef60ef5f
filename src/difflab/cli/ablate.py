"""difflab-ablate: train every variant with one budget, evaluate each the same way, one table.

    difflab-ablate                                       # make ablate: schedules, objectives
    difflab-ablate only=[linear,cosine] seeds=[1,2,3]
    difflab-ablate base=[experiment=digits_tiny] budget=[trainer.max_epochs=3] eval.n=200
    difflab-ablate resume=outputs/ablate/runs/<time>_<id>    # finish an interrupted ablation

Each (variant, seed) is a separate `difflab-train` process (its own run directory under
`runs/`, its log in `runs/<name>/stdout.log`), so one failing variant is recorded and the
others still run. Every run is then scored by `difflab-evaluate`'s code on its EMA weights
with the same sampler, noise and reference features. Written to the ablation directory:
`results.csv`, `results.md` (with the held-out real images' scores as the floor) and
`ablation.png`. With `resume=<dir>`, runs and evaluations already finished there are reused.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from difflab.cli import _hydra, schema
from difflab.cli._hydra import quote
from difflab.cli.evaluate import evaluate
from difflab.cli.collect import RESULT_FILE
from difflab.data import DatasetUnavailableError
from difflab.metrics import report
from difflab.metrics.features import ExtractorUnavailableError
from difflab.training.checkpoint import CheckpointError

log = logging.getLogger("difflab.ablate")
_hydra.setup()

METRICS = ("fid", "kid", "precision", "recall", "class_coverage", "class_entropy")
COLUMNS = ("variant", "seed", "schedule", "objective", "status", "train_seconds", "val/loss", *METRICS,
           "eval_seconds", "error")


@dataclass
class Run:
    variant: str
    seed: int
    overrides: list[str]  # base + variant + budget
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def plan(cfg: DictConfig, work: Path) -> list[Run]:
    names = list(cfg.only) if cfg.only else list(cfg.variants)
    return [Run(name, int(seed), [*cfg.base, *cfg.variants[name], *cfg.budget], work / "runs" / f"{name}-s{seed}")
            for name in names for seed in cfg.seeds]


def check_composes(run: Run) -> None:
    """Compose and validate the run's training config now: a typo fails in a second, not
    after the variants before it have trained."""
    overrides = [o for o in run.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        cfg = hydra.compose(config_name="train", overrides=[*overrides, f"seed={run.seed}", "paths.output_dir=_"])
    except HydraException as error:
        raise schema.ConfigError(f"variant {run.variant}: {str(error).splitlines()[0]}") from error
    try:
        schema.validate(cfg)
    except schema.ConfigError as error:
        raise schema.ConfigError(f"variant {run.variant}: {error}") from error


def _read_result(run: Run) -> Optional[dict[str, Any]]:
    try:
        return json.loads((run.dir / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _finished(run: Run) -> Optional[dict[str, Any]]:
    result = _read_result(run)
    if result and result.get("status") == "ok" and (run.dir / "checkpoints" / "ema.pt").is_file():
        return result
    return None


def train_run(run: Run, root_dir: str) -> dict[str, Any]:
    """`difflab-train` in its own process; returns its result.json (status ok or failed)."""
    if (done := _finished(run)) is not None:
        log.info("%s: trained already (%s), reused", run.name, run.dir)
        return done
    run.dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "difflab.cli.train", *run.overrides, f"seed={run.seed}",
               f"hydra.run.dir={quote(run.dir)}", f"paths.root_dir={quote(root_dir)}",
               "++callbacks.fid=null",            # evaluated below, the same way for every run
               "++callbacks.progress_bar=null"]   # the log is a file
    stdout = run.dir / "stdout.log"
    log.info("%s: training (%s); log: %s", run.name, " ".join(run.overrides) or "defaults", stdout)
    start = time.perf_counter()
    with stdout.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    result = _read_result(run) or {}
    if code != 0 or result.get("status") != "ok":
        tail = stdout.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        error = result.get("error") or tail[0]
        log.error("%s: training failed (exit %d): %s; see %s", run.name, code, error, stdout)
        return {"status": "failed", "error": error, "seconds": round(time.perf_counter() - start, 1), "metrics": {}}
    log.info("%s: trained in %.0f s, val/loss %s", run.name, result["seconds"],
             result["metrics"].get("val/loss", "-"))
    return result


def eval_config(cfg: DictConfig, run: Run, run_config: dict[str, Any]) -> DictConfig:
    """A difflab-evaluate config for one cell: the ablation's sampler, steps, n and noise."""
    e = cfg.eval
    scale = (run_config.get("guidance") or {}).get("scale")
    conditional = run_config["model"].get("num_classes") is not None
    values = {"ckpt": str(run.dir / "checkpoints" / "ema.pt"), "n": e.n, "batch_size": e.batch_size,
              "seed": e.seed, "device": cfg.device, "progress": False, "samplers": [e.sampler],
              "steps": [e.steps], "guidance_scales": [1.0 if scale is None else scale] if conditional else [],
              "grid_images": e.grid_images, "real_baseline": True,
              "metrics": OmegaConf.to_container(e.metrics),
              "paths": {**OmegaConf.to_container(cfg.paths, resolve=True), "output_dir": str(run.dir / "eval")}}
    return OmegaConf.merge(OmegaConf.structured(schema.EvalConfig), values)


def evaluate_run(cfg: DictConfig, run: Run, run_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's scores, the held-out real images' scores); reused from `eval/results.csv`."""
    saved = run.dir / "eval" / "results.csv"
    if not saved.is_file():
        evaluate(eval_config(cfg, run, run_config))
    else:
        log.info("%s: evaluated already (%s), reused", run.name, saved)
    with saved.open() as handle:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    real = next(r for r in rows if r.get("steps") in (None, ""))
    cell = next(r for r in rows if r.get("steps") not in (None, ""))
    return cell, real


def _number(value: str) -> Any:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value else number


def ablate(cfg: DictConfig) -> list[dict[str, Any]]:
    OmegaConf.to_object(cfg).validate()
    work = Path(cfg.resume) if cfg.resume else Path(cfg.paths.output_dir)
    if cfg.resume and not work.is_dir():
        raise FileNotFoundError(f"resume={cfg.resume}: no such ablation directory")
    runs = plan(cfg, work)
    for run in runs:
        check_composes(run)
    OmegaConf.save(cfg, work / "ablate.yaml", resolve=True)
    log.info("ablation of %d runs in %s", len(runs), work)
    rows, real, start = [], None, time.perf_counter()
    for index, run in enumerate(runs, 1):
        log.info("[%d/%d] %s", index, len(runs), run.name)
        result = train_run(run, str(cfg.paths.root_dir))
        row: dict[str, Any] = {"variant": run.variant, "seed": run.seed, "status": result["status"],
                               "train_seconds": result.get("seconds"), "val/loss": result["metrics"].get("val/loss")}
        if result["status"] == "ok":
            run_config = OmegaConf.to_container(OmegaConf.load(run.dir / "config.yaml"), resolve=True)
            row.update(schedule=run_config["schedule"]["kind"], objective=run_config["objective"]["prediction"])
            try:
                cell, real = evaluate_run(cfg, run, run_config)
            except (CheckpointError, ExtractorUnavailableError, DatasetUnavailableError, FileNotFoundError,
                    ValueError, RuntimeError) as error:
                log.error("%s: evaluation failed: %s", run.name, error)
                row.update(status="eval failed", error=str(error).splitlines()[0])
            else:
                row.update({k: cell.get(k) for k in METRICS}, eval_seconds=cell.get("seconds"))
        else:
            row["error"] = result.get("error")
        rows.append(row)
        write_outputs(cfg, work, rows, real)  # after every run: an interruption loses nothing finished
    log.info("ablation done in %.1f min: %s", (time.perf_counter() - start) / 60, work / "results.md")
    print((work / "results.md").read_text())
    failed = [r["variant"] for r in rows if r["status"] != "ok"]
    if failed:
        raise AblationFailed(f"{len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); the others' "
                             f"results are in {work}; fix the cause and rerun with resume={work}")
    return rows


class AblationFailed(RuntimeError):
    pass


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: the mean and standard deviation over its seeds (runs that finished)."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        done = [r for r in rows if r["variant"] == variant and r["status"] == "ok"]
        if not done:
            continue
        row: dict[str, Any] = {"variant": variant, "seeds": len(done),
                               "schedule": done[0].get("schedule"), "objective": done[0].get("objective")}
        for key in ("val/loss", *METRICS):
            values = [r[key] for r in done if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def _pm(row: dict[str, Any], key: str) -> str:
    value, std = row.get(key), row.get(f"{key} std")
    if value is None:
        return "-"
    return f"{value:.4g} ± {std:.2g}" if std else f"{value:.4g}"


def write_outputs(cfg: DictConfig, work: Path, rows: list[dict[str, Any]], real: Optional[dict[str, Any]]) -> None:
    e = cfg.eval
    all_rows = rows + ([{"variant": f"{real['sampler']} images", "status": "reference", "seed": None,
                         **{k: real.get(k) for k in METRICS}}] if real else [])
    report.write_csv(all_rows, work / "results.csv")
    header = (f"Budget `{' '.join(cfg.budget) or '(the experiment default)'}`"
              + (f" on `{' '.join(cfg.base)}`" if cfg.base else " on the default experiment")
              + f"; seeds {list(cfg.seeds)}. Each run: {e.n} samples, `{e.sampler}` {e.steps} steps, EMA weights, "
              f"extractor `{e.metrics.extractor}`, against the {e.metrics.ref_split} split. "
              "The last row scores held-out real images at the same n: the floor. val/loss is each run's "
              "own objective's loss: compare it only between runs of one objective.\n\n")
    text = header + report.markdown_table(all_rows, COLUMNS)
    means = mean_rows(rows)
    if len(cfg.seeds) > 1 and means:
        shown = [{**m, **{k: _pm(m, k) for k in ("val/loss", *METRICS)}} for m in means]
        text += "\nMean ± standard deviation over seeds:\n\n" + report.markdown_table(
            shown, ["variant", "seeds", "schedule", "objective", "val/loss", *METRICS])
    report.write_text(work / "results.md", text)
    report.plot_bars(rows, work / "ablation.png", "variant", ("fid", "kid", "precision", "recall", "class_coverage"),
                     baseline=real, title=f"{' '.join(cfg.budget)}; {e.sampler} {e.steps} steps, n={e.n}")


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="ablate")
def main(cfg: DictConfig) -> None:
    with _hydra.exit_on_user_error("difflab-ablate", (schema.ConfigError, FileNotFoundError, AblationFailed)):
        ablate(cfg)


main = _hydra.entry(main, "ablate", "difflab-ablate")

if __name__ == "__main__":
    main()
