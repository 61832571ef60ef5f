"""A test-only callback for tests/test_distributed.py, loaded into a real `difflab-train`
run with `+callbacks.probe._target_=ddp_probe.RankProbe` (tests/ on PYTHONPATH).

Every rank writes `<dirpath>/rank<r>.pt` at the end of fit with what it saw itself:
- `t`, `noise`: the timesteps and noise of its first training step, read off the network's
  input (x_t, t) and the clean batch, so they are exactly what `diffusion_loss` drew;
- `val`: per validation epoch, the mean loss over this rank's own validation images
  (weighted by batch size, as Lightning weights its epoch mean before syncing);
- `fid`: the features the FID callback scored at each evaluation, after the gather;
- `steps`: how many training batches this rank ran.
It only observes: it draws no random numbers and changes no weights.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from difflab.diffusion.process import predict_eps_from_x0
from difflab.training.fid import FID


class RankProbe(pl.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.record: dict = {"val": [], "fid": [], "steps": 0}
        self._x0 = None
        self._hook = None
        self._val_sum = 0.0
        self._val_count = 0

    def on_fit_start(self, trainer, pl_module):
        # Keep a copy of every tensor the FID callback gathers (its `features` is the first).
        for callback in trainer.callbacks:
            if isinstance(callback, FID):
                gather = callback._gather
                fid_record = self.record["fid"]

                def recording_gather(module, local, _gather=gather, _out=fid_record):
                    gathered = _gather(module, local)
                    if gathered is not None and gathered.dim() == 2 and gathered.shape[1] > 16:
                        _out.append(gathered.clone())  # features [N, D]; logits are [N, 10]
                    return gathered

                callback._gather = recording_gather

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "t" in self.record or self._hook is not None:
            return
        self._x0 = batch[0].detach().clone()

        def first_forward(net, args):
            xt, t = args[0], args[1]
            self.record["t"] = t.detach().cpu().clone()
            self.record["noise"] = predict_eps_from_x0(pl_module.schedule, xt.detach().float(), t,
                                                       self._x0.float()).cpu()
            self._hook.remove()

        self._hook = pl_module.net.register_forward_pre_hook(first_forward)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["steps"] += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        size = batch[0].shape[0]
        self._val_sum += float(outputs) * size
        self._val_count += size

    def on_validation_epoch_end(self, trainer, pl_module):
        self.record["val"].append({"step": trainer.global_step, "loss": self._val_sum / self._val_count,
                                   "images": self._val_count})
        self._val_sum, self._val_count = 0.0, 0

    def on_train_end(self, trainer, pl_module):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.record.update(rank=trainer.global_rank, world_size=trainer.world_size)
        torch.save(self.record, self.dirpath / f"rank{trainer.global_rank}.pt")
