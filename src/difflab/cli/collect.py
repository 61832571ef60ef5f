"""difflab-collect: one table of every job of a multirun (its overrides, status and final metrics).

    difflab-collect outputs/train/multiruns/2026-11-22_10-00-00_ab12cd
    difflab-collect <sweep dir> --sort eval/fid --metrics val/loss eval/fid eval/kid

Each `difflab-train` run leaves `result.json` in its directory (status, error, wall time,
overrides, final metrics), also when it fails. This reads the jobs of a sweep directory and
writes `summary.csv` (everything) and `summary.md` (the overrides that vary, the status and
the validation / evaluation metrics) into it. Every multirun does this by itself when its
last job ends (the `CollectResults` Hydra callback in conf/hydra/default.yaml); run the command
again after adding jobs, or on a sweep that was interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from difflab.metrics import report

log = logging.getLogger("difflab.collect")
RESULT_FILE = "result.json"
SUMMARY_METRIC_PREFIXES = ("val/", "eval/")


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The job directories of a sweep (those with a `.hydra/` or a result), numbers first in order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {sweep_dir}")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / RESULT_FILE).is_file())]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _overrides(job: Path, result: Optional[dict[str, Any]]) -> list[str]:
    if result is not None:
        return list(result.get("overrides", []))
    path = job / ".hydra" / "overrides.yaml"
    if path.is_file():  # a job that never wrote a result (killed, or still running)
        import yaml

        return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]
    return []


def read_job(job: Path) -> dict[str, Any]:
    """One row: `job`, each override as a column, `status`, `seconds`, the metrics, `error`."""
    result = None
    path = job / RESULT_FILE
    if path.is_file():
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            return {"job": job.name, "status": "unreadable", "error": f"{path}: {error}"}
    row: dict[str, Any] = {"job": job.name}
    row.update(dict(_split_override(o) for o in _overrides(job, result)))
    if result is None:
        row["status"] = "missing"  # killed before the end, or still running
        return row
    row["status"] = result.get("status", "unknown")
    row["seconds"] = result.get("seconds")
    if result.get("planned_steps"):  # a run cut short shows how far it got, e.g. 50/1400
        row["steps"] = f"{result.get('steps')}/{result['planned_steps']}"
    if isinstance(result.get("precision"), dict):
        row["precision"] = result["precision"].get("precision")
    row.update(result.get("metrics", {}))
    if result.get("error"):
        row["error"] = result["error"].splitlines()[0][:200]
    return row


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    return [read_job(job) for job in job_dirs(sweep_dir)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_columns(rows: Sequence[dict[str, Any]], metrics: Optional[Sequence[str]] = None) -> list[str]:
    """job, the override keys whose values differ between jobs, status, steps (done/planned), seconds, the metrics
    (`metrics`, else every val/ and eval/ metric), error (if any job has one)."""
    keys: list[str] = []
    overrides: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
        order = list(row)
        before_status = order[1:order.index("status")] if "status" in order else []
        overrides += [k for k in before_status if k not in overrides]  # rows: job, overrides, status, ...
    numeric = {k for k in keys if any(_is_number(r.get(k)) for r in rows)}
    if metrics is None:
        metrics = [k for k in keys if k in numeric and k.startswith(SUMMARY_METRIC_PREFIXES)]
    overrides = [k for k in overrides if len({str(r.get(k)) for r in rows}) > 1]
    steps = ["steps"] if any(r.get("steps") for r in rows) else []
    columns = ["job", *overrides, "status", *steps, "seconds", *metrics]
    if any(r.get("error") for r in rows):
        columns.append("error")
    return columns


def sort_rows(rows: list[dict[str, Any]], key: Optional[str]) -> list[dict[str, Any]]:
    """Ascending by `key`; rows without a finite value last (in job order)."""
    if not key:
        return rows

    def order(row: dict[str, Any]) -> tuple[int, float]:
        value = row.get(key)
        return (0, float(value)) if _is_number(value) and math.isfinite(value) else (1, 0.0)

    return sorted(rows, key=order)


def write_summary(sweep_dir: str | Path, metrics: Optional[Sequence[str]] = None,
                  sort: Optional[str] = None) -> tuple[Path, Path, list[dict[str, Any]]]:
    sweep_dir = Path(sweep_dir)
    rows = sort_rows(collect(sweep_dir), sort)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (looked for */.hydra and */{RESULT_FILE})")
    # Jobs of a parallel launcher may summarise at once: both writes are atomic.
    csv_path = report.write_csv(rows, sweep_dir / "summary.csv")
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    header = (f"{len(rows)} jobs in `{sweep_dir}`: " + ", ".join(f"{n} {s}" for s, n in counts.items())
              + (f"; sorted by {sort}" if sort else "") + ".\n\n")
    md_path = report.write_text(sweep_dir / "summary.md",
                                header + report.markdown_table(rows, summary_columns(rows, metrics)))
    return csv_path, md_path, rows


class CollectResults(Callback):
    """Hydra callback: after every job of a multirun (failed ones too: Hydra stops calling
    `on_multirun_end` once a job has failed) and at its end, rewrite the sweep's summary."""

    def __init__(self, sort: Optional[str] = None) -> None:
        self.sort = sort

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._summarise(Path(str(config.hydra.sweep.dir)), announce=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._summarise(Path(str(config.hydra.sweep.dir)), announce=True)

    def _summarise(self, sweep_dir: Path, announce: bool) -> None:
        try:
            if not any((job / RESULT_FILE).is_file() for job in job_dirs(sweep_dir)):
                return  # not difflab-train jobs (or none ran): nothing to summarise
            _, md_path, rows = write_summary(sweep_dir, sort=self.sort)
        except (OSError, ValueError) as error:  # a summary must never hide the jobs' own outcome
            log.warning("could not summarise %s: %s", sweep_dir, error)
            return
        failed = [r["job"] for r in rows if r["status"] != "ok"]
        if announce or failed:
            log.info("summary of %d jobs: %s%s", len(rows), md_path,
                     f" (not ok: jobs {', '.join(failed)})" if failed else "")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="difflab-collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. outputs/train/multiruns/<time>_<id>")
    parser.add_argument("--sort", default=None, help="sort jobs by this metric, ascending (e.g. val/loss)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="metric columns of summary.md (default: every val/ and eval/ metric)")
    args = parser.parse_args(argv)
    try:
        csv_path, md_path, rows = write_summary(args.sweep_dir, args.metrics, args.sort)
    except FileNotFoundError as error:
        sys.exit(f"difflab-collect: {error}")
    print(md_path.read_text(), end="")
    print(f"csv: {csv_path}\nmarkdown: {md_path}")


if __name__ == "__main__":
    main()
