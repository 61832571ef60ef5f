"""difflab-ema-sweep: post-hoc EMA (EDM2) after training.

    difflab-train callbacks=posthoc ...
    difflab-ema-sweep ckpt_dir=outputs/train/runs/<run>/checkpoints/posthoc stds=[0.03,0.05,0.1,0.15]

Reconstructs, for each EMA length in ``stds``, the power-function EMA of that relative std at
``step`` (default: the last snapshot) as the least-squares combination of the run's snapshots
(``difflab.training.posthoc_ema``), writes it as ``ema-<std>.pt`` (the format of ``ema.pt``, so
difflab-sample and difflab-evaluate take it), scores it with difflab-evaluate's grid (samplers x
steps x guidance scales), and writes ``results.csv``, ``results.md`` and ``fid_vs_ema_length.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from difflab.cli import _hydra, evaluate, schema
from difflab.metrics import report
from difflab.training.callbacks import EMA_FORMAT
from difflab.training.posthoc_ema import read_snapshots, reconstruct

log = logging.getLogger("difflab.ema_sweep")
_hydra.setup()


def sweep(cfg: DictConfig) -> list[dict[str, Any]]:
    OmegaConf.to_object(cfg).validate()
    snapshots = read_snapshots(cfg.ckpt_dir)
    last = max(s["step"] for s in snapshots)
    step = int(cfg.step or last)
    if step > last:
        raise schema.ConfigError(f"step={step} is after the last snapshot (step {last}) in {cfg.ckpt_dir}")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracked = sorted({s["std"] for s in snapshots})
    log.info("%d snapshots of EMA lengths %s up to step %d", len(snapshots), tracked, last)
    rows = []
    for std in cfg.stds:
        state, coefficients = reconstruct(snapshots, float(std), step)
        newest = max((s for s in snapshots if s["step"] <= step), key=lambda s: s["step"])
        path = out / f"ema-{float(std):.3f}.pt"
        payload = {"format": EMA_FORMAT, "run_config": newest["run_config"], "state_dict": state,
                   "global_step": step, "epoch": None, "posthoc": {"std": float(std),
                                                                  "coefficients": coefficients.tolist()}}
        if "first_stage" in newest:
            payload["first_stage"] = newest["first_stage"]
        torch.save(payload, path)
        cell_cfg = cfg.copy()
        OmegaConf.update(cell_cfg, "ckpt", str(path))
        OmegaConf.update(cell_cfg, "paths.output_dir", str(out / f"std-{float(std):.3f}"))
        log.info("EMA length %.3f at step %d: %d snapshot weights, sum %.4f", std, step, len(coefficients),
                 float(coefficients.sum()))
        for row in evaluate.evaluate(cell_cfg):
            rows.append({"ema_std": float(std), "step": step, **row})
    write(rows, out)
    return rows


def write(rows: list[dict[str, Any]], out: Path) -> None:
    report.write_csv(rows, out / "results.csv")
    table = report.markdown_table(rows, ("ema_std", "step", *report.MARKDOWN_COLUMNS))
    (out / "results.md").write_text(table)
    plot = report.plot_metrics(rows, out / "fid_vs_ema_length.png", "ema_std", ("fid", "precision", "recall"),
                               group_by=("sampler", "steps", "guidance_scale"))
    print(table)
    for name, path in (("csv", out / "results.csv"), ("markdown", out / "results.md"), ("plot", plot)):
        if path is not None:
            print(f"{name}: {path}")


@hydra.main(version_base="1.3", config_path=_hydra.config_dir(), config_name="ema_sweep")
def main(cfg: DictConfig) -> None:
    with _hydra.exit_on_user_error("difflab-ema-sweep", evaluate.USER_ERRORS):
        sweep(cfg)


main = _hydra.entry(main, "ema_sweep", "difflab-ema-sweep")

if __name__ == "__main__":
    main()
