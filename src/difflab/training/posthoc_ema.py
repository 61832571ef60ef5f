"""Power-function EMA and post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training
dynamics of diffusion models", EDM2, sec. 3.1-3.2 and appendix C), written from the paper.

A power-function EMA averages the weights seen up to step t with density proportional to
tau^gamma, tau in [0, t]: its update is ``ema <- beta ema + (1 - beta) w`` with
``beta_t = (1 - 1/t)^(gamma + 1)``, so its length scales with the run. It is named by its
relative standard deviation (the std of that density over t),

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

e.g. 0.05 or 0.10: "an EMA 10% as long as the run". ``PostHocEMA`` keeps two such averages and
writes snapshots of both a chosen number of times. Since every snapshot is an average of the
same weight trajectory with a known density, an EMA of *any* other length at any step is
approximately a linear combination of them: the coefficients minimise the L2 distance between
the densities (``posthoc_coefficients``), in closed form since the inner product of two
power-function densities ending at t_a and t_b is

    <p_a, p_b> = (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a+1) t_b^(g_b+1)).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch

from difflab.metrics.report import replacing

SNAPSHOT_FORMAT = "difflab-posthoc-ema-v1"
SNAPSHOT_NAME = re.compile(r"^ema-(?P<std>[0-9.]+)-(?P<step>\d+)\.pt$")


def std_to_gamma(std: float) -> float:
    """The exponent gamma of the power-function EMA whose relative std is ``std`` (0 < std < 0.2887)."""
    if not 0.0 < std < 12 ** -0.5:  # gamma -> 0 gives the uniform density, whose relative std is 1/sqrt(12)
        raise ValueError(f"an EMA length (relative std: callbacks.ema.std, callbacks.posthoc_ema.stds, "
                         f"difflab-ema-sweep stds) must lie in (0, {12 ** -0.5:.4f}), got {std}")
    lo, hi = 0.0, 1e9  # sigma_rel(gamma) falls monotonically from 0.2887 to 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_std(mid) > std:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def gamma_to_std(gamma: float) -> float:
    """Relative std of the power-function density tau^gamma on [0, t]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t: int) -> float:
    """The decay at the t-th update (t = 1 copies the weights)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def _inner(gamma_a: torch.Tensor, t_a: torch.Tensor, gamma_b: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
    g = gamma_a + gamma_b + 1
    m = torch.minimum(t_a, t_b)
    # logs keep t^(gamma) finite for long runs and large gamma
    log = (gamma_a + 1).log() + (gamma_b + 1).log() + g * m.log() - g.log() - (gamma_a + 1) * t_a.log() \
        - (gamma_b + 1) * t_b.log()
    return log.exp()


def posthoc_coefficients(gammas: Sequence[float], steps: Sequence[int], target_gamma: float,
                         target_step: int) -> torch.Tensor:
    """Least-squares weights [len(gammas)] of the snapshots (exponent, step) whose combination best
    matches the power-function EMA of ``target_gamma`` at ``target_step`` (module doc), float64."""
    g = torch.as_tensor(list(gammas), dtype=torch.float64)
    t = torch.as_tensor(list(steps), dtype=torch.float64)
    if g.numel() == 0:
        raise ValueError("no snapshots to combine")
    if bool((t < 1).any()) or target_step < 1:
        raise ValueError("snapshot steps and the target step must be >= 1")
    gram = _inner(g[:, None], t[:, None], g[None, :], t[None, :])
    rhs = _inner(g, t, torch.tensor(target_gamma, dtype=torch.float64), torch.tensor(float(target_step),
                                                                                      dtype=torch.float64))
    return torch.linalg.lstsq(gram, rhs[:, None], rcond=1e-12).solution[:, 0]


class PostHocEMA(pl.Callback):
    """Keeps power-function EMAs of the network (one per ``stds`` entry) and writes
    ``snapshots`` snapshots of each, evenly spaced over the run, to ``dirpath`` as
    ``ema-<std>-<step>.pt`` (the network's averaged weights, the run config, gamma, step).
    ``difflab-ema-sweep`` reconstructs any EMA length from them. Resumes with the run."""

    def __init__(self, stds: Sequence[float] = (0.05, 0.10), snapshots: int = 16,
                 dirpath: str = "checkpoints/posthoc") -> None:
        if not stds:
            raise ValueError("PostHocEMA needs at least one EMA length in stds")
        if snapshots < 1:
            raise ValueError(f"snapshots must be >= 1, got {snapshots}")
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_gamma(s) for s in self.stds]
        self.snapshots, self.dirpath = int(snapshots), Path(dirpath)
        self._averages: Optional[list[list[torch.Tensor]]] = None
        self._updates = 0
        self._saved: list[int] = []
        self._due: Optional[tuple[int, set[int]]] = None

    def _params(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p.detach() for p in pl_module.net.parameters()]

    def snapshot_steps(self, total: int) -> list[int]:
        """The steps at which snapshots are written: ``snapshots`` of them, the last at ``total``."""
        return sorted({max(1, round(total * (k + 1) / self.snapshots)) for k in range(self.snapshots)})

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step <= self._updates:  # not an optimizer step (gradient accumulation)
            return
        current = self._params(pl_module)
        if self._averages is None:
            self._averages = [[p.clone() for p in current] for _ in self.stds]
        self._updates += 1
        for gamma, average in zip(self.gammas, self._averages):
            torch._foreach_lerp_(average, current, 1.0 - power_beta(gamma, self._updates))
        # The run's length is known once it runs, and a time budget may shorten it early on.
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else \
            int(trainer.estimated_stepping_batches)
        if self._due is None or self._due[0] != total:
            self._due = (total, set(self.snapshot_steps(total)))
        if self._updates in self._due[1] and self._updates not in self._saved:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if self._averages is not None and self._updates not in self._saved:  # a run cut short: its last state
            self._write(trainer, pl_module)

    def _write(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._saved.append(self._updates)
        if not trainer.is_global_zero:
            return
        names = [name for name, _ in pl_module.net.named_parameters()]
        buffers = {k: v.detach().cpu() for k, v in pl_module.net.named_buffers()}
        for std, gamma, average in zip(self.stds, self.gammas, self._averages):
            state = {**buffers, **{n: a.cpu().clone() for n, a in zip(names, average)}}
            payload = {"format": SNAPSHOT_FORMAT, "std": std, "gamma": gamma, "step": self._updates,
                       "state_dict": state, "parameters": names, "run_config": dict(pl_module.hparams.get("run_config") or {})}
            first_stage = getattr(pl_module, "first_stage", None)
            if first_stage is not None:
                payload["first_stage"] = {k: v.detach().cpu() for k, v in first_stage.state_dict().items()}
            with replacing(self.dirpath / f"ema-{std:.3f}-{self._updates:07d}.pt") as tmp:
                torch.save(payload, tmp)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self._updates, "saved": list(self._saved),
                "averages": None if self._averages is None else [[a.cpu() for a in avg] for avg in self._averages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._updates, self._saved = int(state_dict["updates"]), list(state_dict["saved"])
        self._averages = state_dict["averages"]

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        if self._averages is not None:  # restored from a checkpoint: onto the module's device
            device = next(pl_module.net.parameters()).device
            self._averages = [[a.to(device) for a in avg] for avg in self._averages]


def read_snapshots(dirpath: str | Path) -> list[dict[str, Any]]:
    """Every snapshot in ``dirpath`` (loaded with weights_only=True), sorted by (std, step)."""
    directory = Path(dirpath)
    if not directory.is_dir():
        raise FileNotFoundError(f"ckpt_dir={directory} is not a directory: point it at a run's "
                                "checkpoints/posthoc (train with callbacks=posthoc)")
    files = sorted(p for p in directory.iterdir() if SNAPSHOT_NAME.match(p.name))
    if not files:
        raise FileNotFoundError(f"ckpt_dir={directory} holds no post-hoc EMA snapshots (ema-<std>-<step>.pt): "
                                "train with callbacks=posthoc")
    snapshots = []
    for path in files:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a truncated or foreign file
            raise ValueError(f"{path} is not a readable post-hoc EMA snapshot ({error}); delete it or re-run") \
                from None
        if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a difflab post-hoc EMA snapshot")
        snapshots.append({**payload, "path": path})
    return sorted(snapshots, key=lambda s: (s["std"], s["step"]))


def reconstruct(snapshots: list[dict[str, Any]], std: float, step: Optional[int] = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(state_dict, coefficients): the EMA of relative std ``std`` at ``step`` (default: the last
    snapshot's) as a least-squares combination of ``snapshots``. Non-float entries (buffers such
    as counters) are taken from the last snapshot."""
    step = step or max(s["step"] for s in snapshots)
    usable = [s for s in snapshots if s["step"] <= step]
    coefficients = posthoc_coefficients([s["gamma"] for s in usable], [s["step"] for s in usable],
                                        std_to_gamma(std), step)
    newest = max(usable, key=lambda s: s["step"])
    last, parameters = newest["state_dict"], set(newest["parameters"])
    state = {}
    for key, value in last.items():
        if key in parameters:
            state[key] = sum(float(c) * s["state_dict"][key].double() for c, s in zip(coefficients, usable)).to(
                value.dtype)
        else:
            state[key] = value.clone()
    return state, coefficients
