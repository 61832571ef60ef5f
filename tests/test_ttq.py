"""`make ttq` (benchmarks/ttq.py): the wall-clock snapshots it scores, the peers' processes
seen through difflab's samplers, and the crossing time its ratio comes from."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from difflab.diffusion import Denoiser, NoiseSchedule
from difflab.training.checkpoint import load_network_weights
from difflab.training.wallclock import WallClockSnapshots

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ttq():
    return load("ttq")


@pytest.fixture(scope="module")
def peers():
    return load("ttq_peers")


class SteppedClock(WallClockSnapshots):
    """Ten seconds per optimizer step, so the marks a step passes are known."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.now = 10.0 * trainer.global_step
        super().on_train_batch_end(trainer, pl_module, *args)

    def elapsed(self):
        return getattr(self, "now", 0.0)


def test_snapshots_at_the_marks_a_run_passes_as_ema_files(tmp_path):
    import lightning.pytorch as pl

    from difflab.data import ImageDataModule
    from difflab.diffusion.samplers import DDIMSampler
    from difflab.models import UNet
    from difflab.training.ema import EMA
    from difflab.training.module import DiffusionModule

    net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
               num_groups=4, image_size=8)
    module = DiffusionModule(net, NoiseSchedule("cosine", 100), DDIMSampler(steps=5), lr=2e-3,
                             run_config={"model": {"in_channels": 1, "image_size": 8}})
    clock = SteppedClock(marks_s=[15, 20, 35, 1000], dirpath=str(tmp_path / "wall"))
    ema = EMA(decay=0.9)

    class Witness(pl.Callback):  # the EMA and the live weights at step 4, when mark 35 is taken
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 4:
                self.ema = {k: v.clone() for k, v in ema.averaged_module.net.state_dict().items()}
                self.live = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    witness = Witness()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_checkpointing=False, callbacks=[ema, clock, witness], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ImageDataModule(name="digits", batch_size=32))
    assert sorted(p.name for p in (tmp_path / "wall").iterdir()) == [
        "wall-00015.0s.pt", "wall-00020.0s.pt", "wall-00035.0s.pt", "wallclock.json"]
    at_35 = load_network_weights(tmp_path / "wall" / "wall-00035.0s.pt")[1]
    assert all(torch.equal(at_35[k], witness.ema[k]) for k in at_35)  # the EMA weights, not the live ones
    assert any(not torch.equal(at_35[k], witness.live[k]) for k in at_35)
    assert clock.state_dict()["taken"] == json.loads((tmp_path / "wall" / "wallclock.json").read_text())["snapshots"]
    record = json.loads((tmp_path / "wall" / "wallclock.json").read_text())
    # step 2 (20 s) passes 15 and 20 at once, step 4 (40 s) passes 35; 1000 s is never reached
    assert [(s["mark_s"], s["step"]) for s in record["snapshots"]] == [(15, 2), (20, 2), (35, 4)]
    assert record["ended"]["step"] == 6
    weights = [load_network_weights(tmp_path / "wall" / s["file"])[1] for s in record["snapshots"]]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    config, _ = load_network_weights(tmp_path / "wall" / record["snapshots"][0]["file"])
    assert config["model"]["image_size"] == 8
    assert not (tmp_path / "wall" / "wall-01000.0s.pt").exists()


def test_snapshots_need_the_ema_and_resume_without_rewriting(tmp_path):
    clock = WallClockSnapshots(marks_s=[10, 20], dirpath=str(tmp_path))
    trainer = type("T", (), {"callbacks": [clock]})()
    with pytest.raises(ValueError, match="no EMA callback"):
        clock.on_fit_start(trainer, None)
    resumed = WallClockSnapshots(marks_s=[10, 20], dirpath=str(tmp_path))
    resumed.load_state_dict({"taken": [{"mark_s": 10.0, "elapsed_s": 10.5, "step": 3, "file": "wall-00010.0s.pt"}]})
    assert resumed._pending() == [20.0]


@pytest.mark.parametrize("marks", [[], [0, 10], [20, 10], [10, 10], [10, float("inf")]])
def test_marks_must_be_positive_and_rising(marks):
    with pytest.raises(ValueError, match="positive, rising"):
        WallClockSnapshots(marks_s=marks)


def test_the_peers_processes_are_difflab_schedules(peers):
    from denoising_diffusion_pytorch import GaussianDiffusion
    from diffusers import DDPMScheduler

    kind, objective = peers.peer_schedule("lucidrains")
    lucid = GaussianDiffusion(peers.lucidrains_unet(), image_size=28, timesteps=peers.T)
    assert lucid.objective == {"v": "pred_v"}[objective]
    assert torch.allclose(NoiseSchedule(kind, peers.T).alpha_bar, lucid.alphas_cumprod.float(), atol=1e-6)
    kind, objective = peers.peer_schedule("diffusers")
    scheduler = DDPMScheduler(num_train_timesteps=peers.T, beta_schedule="linear")
    assert scheduler.config.prediction_type == {"eps": "epsilon"}[objective]
    assert torch.allclose(NoiseSchedule(kind, peers.T).alpha_bar, scheduler.alphas_cumprod, atol=1e-6)


@pytest.mark.parametrize("peer", ["diffusers", "lucidrains"])
def test_a_peer_snapshot_loads_and_samples_through_difflab(peers, ttq, peer, tmp_path):
    net = peers.peer_network(peer)
    torch.save({"state_dict": net.unet.state_dict()}, tmp_path / "w.pt")
    denoiser, schedule = ttq.peer_denoiser(peer, tmp_path / "w.pt", str(tmp_path / "cache"), precision="32-true")
    assert isinstance(denoiser, Denoiser) and denoiser.objective == peers.peer_schedule(peer)[1]
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(denoiser.raw(x, 500), net(x, torch.full((2,), 500)), atol=1e-5)


def test_peer_clock_writes_each_passed_mark_once(peers, tmp_path):
    clock = peers.Clock([1.0, 2.0, 50.0], start=0.0, out=tmp_path)
    clock.elapsed = lambda: 2.5
    calls = []
    clock.snapshot(lambda: calls.append(1) or {"w": torch.ones(1)}, step=7, raw=lambda: {"w": torch.zeros(1)})
    assert [s["mark_s"] for s in clock.taken] == [1.0, 2.0] and len(calls) == 1 and not clock.due()
    payload = torch.load(tmp_path / clock.taken[0]["file"], weights_only=True)
    assert payload["state_dict"]["w"] == 1 and payload["raw_state_dict"]["w"] == 0  # EMA and live weights
    assert json.loads((tmp_path / "wallclock.json").read_text())["snapshots"][1]["step"] == 7


def test_crossing_time_interpolates_between_marks(ttq):
    curve = [(30, 80.0), (60, 40.0), (90, 20.0)]
    assert ttq.crossing_time(curve, 30.0) == pytest.approx(75.0)
    assert ttq.crossing_time(curve, 90.0) == 30  # better at its first mark already
    assert ttq.crossing_time(curve, 10.0) is None


def test_report_gives_the_ratio_to_each_peer(ttq):
    import argparse

    rows = [{"model": m, "mark_s": s, "elapsed_s": s, "step": 1, "train_precision": "32-true", "fid": f,
             "precision": 0.5, "recall": 0.5} for m, s, f in
            [("difflab", 30, 60.0), ("difflab", 60, 20.0), ("diffusers", 600, 40.0), ("lucidrains", 600, 100.0)]]
    text, ratios = ttq.report(rows, {"cpu": "x", "threads": 2, "torch": "t"},
                              argparse.Namespace(peers=["diffusers", "lucidrains"], steps=50, n=500,
                                                 spacing="leading", score_precision="auto"))
    assert ratios["diffusers"]["difflab_s"] == pytest.approx(45.0)
    assert ratios["diffusers"]["times_sooner"] == pytest.approx(600 / 45, abs=0.01)
    assert ratios["lucidrains"]["lower_bound"] and ratios["lucidrains"]["times_sooner"] == 20.0
    assert "13.33x sooner" in text and ">= 20.00x sooner" in text


def test_a_peer_is_judged_by_its_better_weights_and_its_first_time_there(ttq):
    import argparse

    rows = [{"model": m, "mark_s": s, "elapsed_s": s, "step": 1, "train_precision": "32-true", "fid": f,
             "precision": 0.5, "recall": 0.5} for m, s, f in
            [("difflab", 30, 60.0), ("difflab", 60, 20.0), ("difflab", 90, 10.0),
             ("diffusers", 300, 30.0), ("diffusers (raw)", 300, 25.0),
             ("diffusers", 600, 40.0), ("diffusers (raw)", 600, 20.0)]]
    text, ratios = ttq.report(rows, {"cpu": "x", "threads": 2, "torch": "t"},
                              argparse.Namespace(peers=["diffusers"], steps=50, n=500, spacing="trailing",
                                                 score_precision="32-true"))
    # The live weights beat the EMA at 600 s: the peer's quality is FID 20, which difflab reached at 60 s.
    assert ratios["diffusers"]["peer_fid"] == 20.0 and ratios["diffusers"]["peer_weights"] == "diffusers (raw)"
    assert ratios["diffusers"]["difflab_s"] == pytest.approx(60.0) and ratios["diffusers"]["times_sooner"] == 10.0
    marks = ratios["diffusers"]["at_each_mark"]
    assert [(m["peer_s"], m["peer_fid"]) for m in marks] == [(300, 25.0), (600, 20.0)]
    assert marks[0]["difflab_s"] == pytest.approx(56.25)  # FID 25 between (30 s, 60) and (60 s, 20)
    assert "DDIM-50 (trailing)" in text and "scored in 32-true" in text
