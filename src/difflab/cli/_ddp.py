"""DDP under Hydra: the processes Lightning starts must rerun *this job*, not the command line.

Lightning's subprocess launcher (`strategy=ddp` with `devices>1` on one machine) starts ranks
1..N-1 by rerunning `sys.argv` with `hydra.run.dir=<hydra.run.dir>`. In a multirun that is
wrong twice: argv holds `-m` and the sweep lists, so every extra rank would start the whole
sweep again, and `hydra.run.dir` is not the job's directory (`<sweep dir>/<job number>`), so
the ranks would write elsewhere. `install()` swaps in a command built from the job itself:
its resolved task overrides (one value per swept key) and its output directory. In a single
run this is the same command Lightning would build.

The launcher also leaves `LOCAL_RANK`, `MASTER_PORT`, ... in the environment and the process
group open, so the next job of a multirun in the same process would think its ranks were
started externally and wait for processes that never come. `job_scope()` undoes both.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Sequence

from difflab.cli._hydra import quote


def child_command(local_rank: int, module: str = "difflab.cli.train") -> tuple[Sequence[str], str]:
    """(command, working directory) of the process with `local_rank`, for the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", module, *hydra_cfg.overrides.task,
               f"hydra.run.dir={quote(hydra_cfg.runtime.output_dir)}",
               f"hydra.job.name={hydra_cfg.job.name}_ddp_process_{local_rank}",
               "hydra.output_subdir=null"]  # rank 0 alone writes .hydra/
    return command, get_original_cwd()


def install() -> None:
    """Point Lightning's subprocess launcher (its Trainer-side copy) at `child_command`."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        raise RuntimeError("this Lightning version no longer has subprocess_script._hydra_subprocess_cmd; "
                           "difflab's DDP-under-Hydra fix (difflab/cli/_ddp.py) needs updating")
    subprocess_script._hydra_subprocess_cmd = child_command


LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def job_scope() -> Iterator[None]:
    """Around one training job: afterwards, the DDP launch variables are as they were before
    and the process group is closed, so the next job launches its own ranks."""
    before = {key: os.environ.get(key) for key in LAUNCH_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
