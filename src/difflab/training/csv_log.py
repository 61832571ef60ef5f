"""`<run>/csv/metrics.csv` that survives a resume: Lightning's CSVLogger deletes the file it
finds, so a run resumed in its own directory (resume=auto, a requeued job) lost every loss
logged before the interruption.

`CSVLogger` here keeps the rows of the file it finds up to the first step it logs itself,
and appends after them: the rows a resumed run leaves are those of an uninterrupted run (the
steps trained after the last checkpoint and before a crash are trained again, so their first
rows are dropped, not doubled).
"""

from __future__ import annotations

import csv
from typing import Any, Optional

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's writer, keeping the earlier rows of an existing metrics file."""

    def _check_log_dir_exists(self) -> None:
        self._kept: Optional[list[dict[str, str]]] = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self._kept = list(csv.DictReader(file))

    def save(self) -> None:
        if self._kept is not None and self.metrics:
            first = min(int(row["step"]) for row in self.metrics)
            logged = {key for row in self.metrics if int(row["step"]) == first for key in row} - {"step", "epoch"}
            kept = [row for row in (_before(row, first, logged) for row in self._kept) if row]
            keys = sorted({key for row in kept for key in row} | {key for row in self.metrics for key in row})
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            self.metrics_keys, self._kept = keys, None
        super().save()


def _before(row: dict[str, str], first: int, logged: set[str]) -> Optional[dict[str, str]]:
    """What of an earlier row stays: rows of earlier steps whole; at the resumed run's first step
    (the training losses of a step, then a validation the resumed run ran again), the values it
    does not log there (`logged`); nothing after it."""
    step = _step(row)
    if step is None or step > first:
        return None
    if step == first:
        row = {key: ("" if key in logged else value) for key, value in row.items()}
        if not any(value != "" for key, value in row.items() if key not in ("step", "epoch")):
            return None
    return row


def _step(row: dict[str, str]) -> Optional[int]:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, whose metrics.csv keeps the rows of the run it resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
