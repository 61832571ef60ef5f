"""Multi-device: a real 2-process DDP run on the CPU (gloo), and bf16-mixed on the CPU.

The DDP run is one `difflab-train experiment=digits_tiny trainer=ddp_cpu` subprocess: rank 0
launches rank 1 through Lightning's Hydra-aware launcher. A test-only callback
(`tests/ddp_probe.py`, injected with `+callbacks.probe._target_=...`) has each rank write what
it saw, so the tests compare the ranks with each other and with what rank 0 logged.
"""

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from difflab.cli import _hydra
from difflab.data import ImageDataModule
from difflab.diffusion.samplers import DDIMSampler
from difflab.diffusion.schedule import NoiseSchedule
from difflab.models import UNet
from difflab.training.callbacks import LastCheckpoint
from difflab.training.module import DiffusionModule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend

TESTS = Path(__file__).resolve().parent
EPOCHS = 2
WORLD = 2
PER_RANK_STEPS = 12  # ceil(1617 train images / 2 ranks) // batch 64 (checked below)


def _csv(path):
    header, *rows = path.read_text().splitlines()
    names = header.split(",")
    return [dict(zip(names, row.split(","))) for row in rows]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two epochs on 2 gloo processes, a grid and an FID (128 samples) after each epoch. The run
    directory is left to the default layout, so a stray second directory would show."""
    root = tmp_path_factory.mktemp("ddp")
    probe = tmp_path_factory.mktemp("ddp-probe")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "difflab.cli.train", "experiment=digits_tiny", "trainer=ddp_cpu",
         f"trainer.max_epochs={EPOCHS}", "callbacks.progress_bar=null", "callbacks.fid.every_n_epochs=1",
         f"paths.root_dir={root}", "+callbacks.probe._target_=ddp_probe.RankProbe",
         f"+callbacks.probe.dirpath={probe}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((root / "outputs" / "digits_tiny" / "runs").iterdir())
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return SimpleNamespace(root=root, runs=runs, run=runs[0], ranks=ranks)


def test_both_ranks_ran_and_rank_zero_alone_wrote_the_run(ddp_run):
    assert [r["rank"] for r in ddp_run.ranks] == [0, 1] and {r["world_size"] for r in ddp_run.ranks} == {WORLD}
    # One run directory (rank 1 was given rank 0's via hydra.run.dir), nothing else in cwd.
    assert sorted(p.name for p in ddp_run.root.iterdir()) == ["outputs"]
    assert len(ddp_run.runs) == 1
    run = ddp_run.run
    # Rank 1 leaves only its own job log (named by Lightning's launcher); no .hydra rewrite.
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [".hydra", "checkpoints", "config.yaml", "csv", "result.json", "samples", "train.log",
         "train_ddp_process_1.log"])
    assert OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.job.name == "train"  # rank 0's, not rewritten
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ema.pt", "last.ckpt"]  # no temp files
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]


def test_steps_checkpoint_and_ema(ddp_run):
    cfg = OmegaConf.load(ddp_run.run / "config.yaml")
    data = instantiate(cfg.data)
    data.setup("fit")
    n_train, batch = len(data.split("train")), cfg.data.batch_size
    single = n_train // batch  # one process, drop_last
    per_rank = math.ceil(n_train / WORLD) // batch  # DistributedSampler: each rank sees half the split
    assert (n_train, single, per_rank) == (1617, 25, PER_RANK_STEPS)  # half a single process's 25
    assert [r["steps"] for r in ddp_run.ranks] == [EPOCHS * per_rank] * WORLD

    ckpt = torch.load(ddp_run.run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ema = torch.load(ddp_run.run / "checkpoints" / "ema.pt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == ema["global_step"] == EPOCHS * per_rank
    assert ckpt["callbacks"]["EMA"]["updates"] == EPOCHS * per_rank
    differ = 0
    for name, value in ema["state_dict"].items():
        assert torch.equal(value, ckpt["state_dict"][f"net.{name}"])  # the checkpoint's weights are the EMA
        differ += not torch.equal(value, ckpt["current_model_state"][f"net.{name}"])  # raw weights kept apart
    assert differ > len(ema["state_dict"]) // 2


def test_grids_one_per_epoch_from_rank_zero(ddp_run):
    grids = sorted((ddp_run.run / "samples").iterdir())
    assert [g.name for g in grids] == [f"epoch_{e:04d}.png" for e in range(EPOCHS)]
    size = 4 * (8 + 2) + 2  # a 4x4 grid of 8x8 digits, 2 px padding
    assert np.asarray(Image.open(grids[-1])).shape[:2] == (size, size)


def test_fid_once_per_evaluation_on_all_samples_from_both_ranks(ddp_run):
    rows = [r for r in _csv(ddp_run.run / "csv" / "metrics.csv") if r.get("eval/fid")]
    assert [int(r["step"]) for r in rows] == [PER_RANK_STEPS * (e + 1) for e in range(EPOCHS)]  # once each
    assert all(math.isfinite(float(r["eval/fid"])) and float(r["eval/fid"]) > 0 for r in rows)
    first, second = (r["fid"] for r in ddp_run.ranks)
    assert len(first) == len(second) == EPOCHS
    for mine, theirs in zip(first, second):
        assert mine.shape[0] == 128  # callbacks.fid.num_samples: the gather covers both ranks
        assert torch.equal(mine, theirs)  # every rank scores the same gathered set
        # Rows 0..63 were drawn by rank 0, 64..127 by rank 1: from their own noise, no duplicates.
        assert torch.cdist(mine[:64], mine[64:]).min() > 1e-4


def test_val_loss_logged_once_per_epoch_as_the_mean_over_ranks(ddp_run):
    logged = [float(r["val/loss"]) for r in _csv(ddp_run.run / "csv" / "metrics.csv") if r.get("val/loss")]
    local = [r["val"] for r in ddp_run.ranks]
    assert len(logged) == EPOCHS and all(len(v) == EPOCHS for v in local)
    val_images = sum(v[0]["images"] for v in local)
    assert val_images == 180  # round(1797 * 0.1): the ranks split the validation set
    for epoch, value in enumerate(logged):
        per_rank = [v[epoch]["loss"] for v in local]
        assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-4)  # different images: a real mean
        assert value == pytest.approx(sum(per_rank) / WORLD, rel=1e-5)


def test_ranks_draw_different_timesteps_and_noise(ddp_run):
    zero, one = ddp_run.ranks
    assert zero["t"].shape == one["t"].shape == (64,)
    assert not torch.equal(zero["t"], one["t"])
    # Identical streams agree to float rounding (~1e-6); independent N(0, 1) noise by ~1.13.
    assert (zero["noise"] - one["noise"]).abs().mean() > 0.5
    assert abs(float(one["noise"].std()) - 1) < 0.1


# -- the mechanism, in-process ------------------------------------------------------------------
def _tiny_module():
    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               num_groups=4, image_size=8)
    return DiffusionModule(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5), warmup_steps=2,
                           run_config={"model": {"in_channels": 1, "image_size": 8}})


def _draws_after_train_start(module, rank, seed=7):
    pl.seed_everything(seed, verbose=False)
    module._trainer = SimpleNamespace(global_rank=rank)
    try:
        module.on_train_start()
    finally:
        module._trainer = None
    return torch.randn(8), np.random.rand(), random.random()


def test_rank_zero_keeps_its_stream_and_other_ranks_get_their_own():
    module = _tiny_module()
    pl.seed_everything(7, verbose=False)
    untouched = torch.randn(8), np.random.rand(), random.random()
    zero, one, two = (_draws_after_train_start(module, rank) for rank in range(3))
    assert torch.equal(zero[0], untouched[0]) and zero[1:] == untouched[1:]  # single process: unchanged
    assert not torch.equal(one[0], zero[0]) and not torch.equal(two[0], one[0])
    assert len({zero[1], one[1], two[1]}) == 3 and len({zero[2], one[2], two[2]}) == 3
    again = _draws_after_train_start(module, 1)
    assert torch.equal(again[0], one[0]) and again[1:] == one[1:]  # reproducible from the seed
    assert not torch.equal(_draws_after_train_start(module, 1, seed=8)[0], one[0])


def test_reseed_comes_after_the_checkpoint_restores_the_rng(tmp_path):
    """The per-rank reseed must follow `on_load_checkpoint` (which sets rank 0's saved RNG state
    on every rank), or a resumed DDP run would be back to identical noise on all ranks."""
    def trainer(max_steps, callbacks=()):
        return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                          enable_checkpointing=False, callbacks=list(callbacks), default_root_dir=tmp_path)

    data = ImageDataModule(name="digits", batch_size=32)
    trainer(2, [LastCheckpoint(dirpath=str(tmp_path), every_n_epochs=100)]).fit(_tiny_module(), datamodule=data)
    events = []

    class Recording(DiffusionModule):
        def on_load_checkpoint(self, checkpoint):
            super().on_load_checkpoint(checkpoint)
            events.append("restore rng")

        def on_train_start(self):
            super().on_train_start()
            events.append("reseed")

    resumed = Recording(_tiny_module().net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5), warmup_steps=2,
                        run_config={"model": {"in_channels": 1, "image_size": 8}})
    trainer(3).fit(resumed, datamodule=data, ckpt_path=tmp_path / "last.ckpt")
    assert events == ["restore rng", "reseed"]


# -- bf16-mixed on the CPU ----------------------------------------------------------------------
def test_bf16_mixed_trains_exports_fp32_ema_and_samples(tmp_path):
    """One epoch of digits_tiny under bf16 autocast, built from the real config (in-process, to
    spare a subprocess start), then difflab-sample's `sample()` on the exported EMA weights."""
    from difflab.cli.sample import sample
    from difflab.cli.train import build

    run = tmp_path / "run"
    previous = torch.get_float32_matmul_precision()
    try:
        with initialize_config_dir(config_dir=_hydra.config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[
                "experiment=digits_tiny", "trainer.precision=bf16-mixed", "trainer.max_epochs=1",
                "trainer.enable_model_summary=false", "callbacks.progress_bar=null", "callbacks.fid=null",
                f"paths.output_dir={run}"])
            module, datamodule, trainer = build(cfg)
            trainer.fit(module, datamodule=datamodule)
            sample_cfg = compose("sample", overrides=[
                f"ckpt={run / 'checkpoints' / 'ema.pt'}", "n=16", "sampler=ddim", "sampler.steps=5",
                "progress=false", "device=cpu", f"paths.output_dir={tmp_path / 'samples'}"])
            written = sample(sample_cfg)
    finally:
        torch.set_float32_matmul_precision(previous)

    assert trainer.precision == "bf16-mixed"
    rows = _csv(run / "csv" / "metrics.csv")
    losses = [float(r[k]) for r in rows for k in ("train/loss_step", "val/loss") if r.get(k)]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses)
    ema = torch.load(run / "checkpoints" / "ema.pt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in ema["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    images = np.load(written["npz"])["images"]
    assert images.shape == (16, 8, 8, 1) and images.std() > 0
    assert written["grid"].is_file()


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"DIFFLAB_RUN_ID": "exp7", "SLURM_JOB_ID": "12", "SLURM_NTASKS": "4"}, "exp7"),
    ({"SLURM_JOB_ID": "12", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, "slurm-12-0"),
    ({"SLURM_JOB_ID": "12", "SLURM_NTASKS": "4", "SLURM_ARRAY_TASK_ID": "3", "SLURM_STEP_ID": "1"}, "slurm-12_3-1"),
    ({"SLURM_JOB_ID": "12", "SLURM_NTASKS": "1"}, None),  # one task: nothing to share
    ({"TORCHELASTIC_RUN_ID": "ab12", "WORLD_SIZE": "2"}, "torchrun-ab12"),
    ({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "8"}, None),  # torchrun's default --rdzv-id
    ({"TORCHELASTIC_RUN_ID": "ab12", "WORLD_SIZE": "1"}, None),
])
def test_processes_of_one_launch_agree_on_the_run_name(env, expected):
    assert _hydra.launch_id(env) == expected
    name = _hydra.run_name(env)
    if expected is None:  # <date>_<time>_<random>
        date, time, uid = name.split("_")
        assert len(date) == 10 and len(time) == 8 and len(uid) == 6
    else:
        assert name == expected


def test_a_forked_process_names_its_runs_apart_from_its_parent():
    """Two runs started in the same second by a process and its fork (a fork-based pool or
    launcher) get different directories: the random part is drawn again in the child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its run name and leave without running the parent's atexit
        os.write(write, _hydra.run_name({}).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child.rsplit("_", 1)[1] != _hydra.run_name({}).rsplit("_", 1)[1]


def test_torchrun_processes_share_one_run_directory(tmp_path):
    """Under torchrun every process composes its own config; they must pick the same run
    directory (each process, not Lightning, decides it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "difflab.cli.train", "experiment=digits_tiny", "trainer=ddp_cpu", "train=false",
         f"paths.root_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "digits_tiny" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), runs
    assert (runs[0] / "config.yaml").is_file() and (runs[0] / ".hydra").is_dir()


@pytest.mark.slow  # a minute of 2 AVX2 cores: `make test-slow`
def test_ddp_jobs_of_a_multirun_each_run_once_in_their_own_directory(tmp_path):
    """Lightning reruns argv for ranks > 0; in a multirun argv holds `-m` and the sweep, so each
    extra rank would start the whole sweep again and write outside the job's directory."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "difflab.cli.train", "-m", "experiment=digits_tiny", "trainer=ddp_cpu",
         "trainer.max_epochs=1", "trainer.max_steps=3", "optimized_metric=train/loss", "callbacks=minimal", "callbacks.progress_bar=null",
         "schedule=linear,cosine", f"hydra.sweep.dir={sweep}", f"paths.root_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        result = json.loads((sweep / job / "result.json").read_text())
        assert result["status"] == "ok" and f"schedule={schedule}" in result["overrides"]
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran inside this job's directory
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["run_config"]["schedule"]["kind"] == schedule
    assert not (tmp_path / "outputs").exists()  # no rank wrote a run of its own
    with open(sweep / "summary.csv") as handle:
        assert [(r["job"], r["schedule"], r["status"]) for r in csv.DictReader(handle)] == [
            ("0", "linear", "ok"), ("1", "cosine", "ok")]
