"""Evaluation results as files: CSV, a markdown table, and plots (metric vs NFE, vs guidance)."""

from __future__ import annotations

import csv
import io
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

ROW_KEYS = ("sampler", "steps", "nfe", "guidance_scale")
MARKDOWN_COLUMNS = ("sampler", "steps", "nfe", "guidance_scale", "fid", "kid", "precision", "recall", "is",
                    "class_coverage", "class_accuracy", "seconds")


class OutputWriteError(RuntimeError):
    """A run's file could not be written (a full disk, no permission); the files already there are intact."""


@contextmanager
def replacing(path: Path, hint: str = "", rename: bool = True) -> Iterator[Path]:
    """Write to the temporary path yielded, then rename it over `path` (`rename=False`: a DDP rank
    that writes nothing): an interrupted or failed write leaves the previous `path` as it was. A
    failure (full disk, read-only folder) removes the partial file and raises OutputWriteError."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if rename:
            tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        kept = f"{path} is the previous one, untouched" if path.is_file() else "nothing earlier was touched"
        raise OutputWriteError(f"could not write {path} ({error.strerror or error}): free disk space or make "
                               f"{path.parent} writable, then go on{hint}; {kept}") from None


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` atomically (a temporary file, then a rename): a reader, or another process
    writing the same summary, never sees half a file."""
    path = Path(path)
    with replacing(path) as partial:
        partial.write_text(text)
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per grid cell; columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = MARKDOWN_COLUMNS) -> str:
    """A GitHub markdown table of the columns present in at least one row."""
    present = [c for c in columns if any(c in row for row in rows)]
    lines = ["| " + " | ".join(present) + " |", "|" + "|".join("---" for _ in present) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in present) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _series(rows: Sequence[dict[str, Any]], group_by: Sequence[str], x: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={row[k]}" if k != "sampler" else str(row[k]) for k in group_by
                          if row.get(k) is not None)
        groups.setdefault(label or "all", []).append(row)
    return {label: sorted(points, key=lambda r: r[x]) for label, points in groups.items()}


def plot_metrics(rows: Sequence[dict[str, Any]], path: str | Path, x: str, metrics: Sequence[str],
                 group_by: Sequence[str], log_x: bool = False, title: str = "",
                 baseline: dict[str, Any] | None = None) -> Path | None:
    """One panel per metric (those present), one line per group, and the `baseline` row
    (real images) as a dashed line; None if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    metrics = [m for m in metrics if any(row.get(m) is not None for row in rows)]
    if not metrics or len({row[x] for row in rows}) < 2:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, points in _series(rows, group_by, x).items():
            ax.plot([p[x] for p in points], [p.get(metric) for p in points], marker="o", label=label)
        if baseline is not None and baseline.get(metric) is not None:
            ax.axhline(baseline[metric], color="gray", linestyle="--", label="real images")
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({row[x] for row in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(rows: Sequence[dict[str, Any]], path: str | Path, label: str, metrics: Sequence[str],
              baseline: dict[str, Any] | None = None, title: str = "") -> Path | None:
    """One panel per metric: a bar per `label` value (the mean of its rows), each row as a dot
    (seeds), and the `baseline` row as a dashed line; None if no row has any of the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def numbers(points: Sequence[dict[str, Any]], metric: str) -> list[float]:
        return [float(p[metric]) for p in points if isinstance(p.get(metric), (int, float))
                and math.isfinite(p[metric])]

    metrics = [m for m in metrics if numbers(rows, m)]
    if not metrics:
        return None
    labels = list(dict.fromkeys(str(row[label]) for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.2, 0.75 * len(labels) + 1.4) * len(metrics), 3.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, name in enumerate(labels):
            values = numbers([r for r in rows if str(r[label]) == name], metric)
            if values:
                ax.bar(i, sum(values) / len(values), color=f"C{i % 10}", alpha=0.75)
                ax.plot([i] * len(values), values, "k.", markersize=5)
        if baseline is not None and numbers([baseline], metric):
            ax.axhline(float(baseline[metric]), color="gray", linestyle="--", label="real images")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
