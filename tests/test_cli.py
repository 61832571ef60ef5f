"""End to end through the real entry points: train on digits, then sample from the run."""

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import warm_process


def _run(module, *args, cwd, fresh=False):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"  # two xdist workers share two cores
    return warm_process.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600, fresh=fresh)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-epoch digits run; its directory."""
    root = tmp_path_factory.mktemp("e2e")
    run_dir = root / "run"
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "trainer.max_epochs=2", "logger=many",
                "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}", f"paths.root_dir={root}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_train_writes_config_checkpoints_grids_and_metrics(trained_run):
    assert (trained_run / "config.yaml").is_file()
    assert "name: digits" in (trained_run / "config.yaml").read_text()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    grids = sorted((trained_run / "samples").glob("epoch_*.png"))
    assert [g.name for g in grids] == ["epoch_0000.png", "epoch_0001.png"]
    grid = np.asarray(Image.open(grids[-1]))
    assert grid.shape[0] == grid.shape[1] > 4 * 8  # a 4x4 grid of 8x8 digits with padding
    header, *rows = (trained_run / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss_step" in header and "val/loss" in header and len(rows) >= 2


def test_grids_reach_the_image_logger(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard")).Reload()
    steps = [e.step for e in events.Images("samples")]
    assert len(steps) == 2 and steps[1] == 2 * steps[0] > 0  # one grid at the end of each epoch
    assert "train/loss_step" in events.Tags()["scalars"]


def test_checkpoints_hold_ema_weights_and_rebuild_config(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ema = torch.load(trained_run / "checkpoints" / "ema.pt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["run_config"]["model"]["image_size"] == 8
    assert "current_model_state" in ckpt  # Lightning keeps raw weights apart from the EMA ones
    for name, value in ema["state_dict"].items():
        assert torch.equal(value, ckpt["state_dict"][f"net.{name}"])  # state_dict = EMA weights
    raw = ckpt["current_model_state"]
    assert any(not torch.equal(raw[k], ckpt["state_dict"][k]) for k in raw if k.startswith("net."))
    assert not any(k.startswith("schedule.") for k in ckpt["state_dict"])  # buffers rebuilt, not saved


@pytest.mark.parametrize("ckpt_name", ["last.ckpt", "ema.pt"])
def test_sample_cli_writes_grid_and_npz(trained_run, tmp_path, ckpt_name):
    out = tmp_path / "sample"
    proc = _run("difflab.cli.sample", f"ckpt={trained_run / 'checkpoints' / ckpt_name}", "n=10",
                "sampler=ddim", "sampler.steps=5", "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert images.std() > 0
    assert (out / "samples.png").is_file()


def test_sample_cli_same_seed_same_images(trained_run, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}"
        proc = _run("difflab.cli.sample", f"ckpt={trained_run / 'checkpoints' / 'ema.pt'}", "n=4", "seed=3",
                    "sampler=ddim", "sampler.steps=4", "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs.append(np.load(out / "samples.npz")["images"])
    assert np.array_equal(*outs)


def test_sample_cli_rejects_a_file_that_is_not_a_difflab_checkpoint(tmp_path):
    bogus = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    proc = _run("difflab.cli.sample", f"ckpt={bogus}", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "not a difflab checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_reports_bad_value_without_traceback(tmp_path):
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "sampler.eta=3", f"hydra.run.dir={tmp_path / 'r'}",
                cwd=tmp_path)
    assert proc.returncode != 0
    assert "sampler.eta" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_continues_in_a_new_run_dir_and_leaves_the_old_one(trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    out = tmp_path / "resumed"
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "trainer.max_epochs=3", "callbacks.progress_bar=null",
                f"ckpt_path={last}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert last.read_bytes() == before
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == first["global_step"] * 3 // 2  # 2 epochs, then 1 more
    assert [p.name for p in sorted((out / "samples").glob("*.png"))] == ["epoch_0002.png"]


def test_resume_from_another_model_names_the_differing_keys(trained_run, tmp_path):
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "model.base_channels=32",
                f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'r'}",
                cwd=tmp_path)
    assert proc.returncode != 0
    assert "model.base_channels: checkpoint 16, now 32" in proc.stderr and "Traceback" not in proc.stderr


def test_default_experiment_runs_under_debug_fast(tmp_path):
    """The default composition (mnist5k, unet_mnist, precision auto) runs two batches, in a fresh
    process (the other CLI tests fork a warm one: tests/warm_process.py)."""
    proc = _run("difflab.cli.train", "debug=fast", f"hydra.run.dir={tmp_path / 'r'}", f"paths.root_dir={tmp_path}",
                cwd=tmp_path, fresh=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    header, *rows = (tmp_path / "r" / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/loss" in header and rows


@pytest.mark.slow
def test_default_model_learns_in_one_epoch(tmp_path):
    """One epoch of the default experiment (140 steps), scored as eps, takes the eps-MSE well below 1."""
    proc = _run("difflab.cli.train", "trainer.max_epochs=1", "objective=eps",
                "callbacks.progress_bar=null", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r.split(",") for r in (tmp_path / "r" / "csv" / "metrics.csv").read_text().splitlines()]
    val = [float(r[rows[0].index("val/loss")]) for r in rows[1:] if r[rows[0].index("val/loss")]]
    assert val and val[-1] < 0.15
    assert sorted(p.name for p in (tmp_path / "r" / "samples").iterdir()) == ["final.png"]


@pytest.mark.slow  # a minute of 2 AVX2 cores: `make test-slow`
def test_conditional_run_samples_a_chosen_class_with_guidance(tmp_path):
    run = tmp_path / "cond"
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "model.num_classes=10", "guidance=cfg",
                "trainer.max_epochs=1", "callbacks.progress_bar=null", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = run / "checkpoints" / "ema.pt"
    out = tmp_path / "s7"
    proc = _run("difflab.cli.sample", f"ckpt={ckpt}", "n=6", "class_label=7", "guidance.scale=3", "sampler=ddim",
                "sampler.steps=4", "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert np.load(out / "samples.npz")["labels"].tolist() == [7] * 6
    rows = tmp_path / "rows"
    proc = _run("difflab.cli.sample", f"ckpt={ckpt}", "n=6", "nrow=3", "sampler=ddim", "sampler.steps=4",
                "progress=false", f"hydra.run.dir={rows}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert np.load(rows / "samples.npz")["labels"].tolist() == [0, 0, 0, 1, 1, 1]  # one class per row
    proc = _run("difflab.cli.sample", f"ckpt={ckpt}", "class_label=12", f"hydra.run.dir={tmp_path / 'x'}",
                cwd=tmp_path)
    assert proc.returncode != 0 and "class_label=12" in proc.stderr and "[0, 9]" in proc.stderr


def test_class_label_or_guidance_on_an_unconditional_checkpoint_is_refused(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "ema.pt"
    for arg in ("class_label=3", "guidance.scale=2"):
        proc = _run("difflab.cli.sample", f"ckpt={ckpt}", arg, f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
        assert proc.returncode != 0 and "unconditional" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode,name,grid_rows", [("inversion", "inversion.png", 3), ("interpolate", "interpolation.png", 2),
                                                 ("forward", "forward.png", 2)])
def test_sample_modes_write_their_strip(trained_run, tmp_path, mode, name, grid_rows):
    out = tmp_path / mode
    proc = _run("difflab.cli.sample", f"ckpt={trained_run / 'checkpoints' / 'ema.pt'}", f"mode={mode}",
                f"n={grid_rows}", "columns=5", "sampler=ddim", "sampler.steps=10", f"hydra.run.dir={out}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    image = np.asarray(Image.open(out / name))
    cols = 3 if mode == "inversion" else 5
    rows = grid_rows
    assert image.shape[:2] == (2 + rows * 10, 2 + cols * 10)  # 8x8 images with 2px padding
    if mode == "inversion":
        assert "reconstruction MSE" in proc.stdout


def test_trajectory_gif_has_one_frame_per_step(trained_run, tmp_path):
    out = tmp_path / "traj"
    proc = _run("difflab.cli.sample", f"ckpt={trained_run / 'checkpoints' / 'ema.pt'}", "n=4", "trajectory=true",
                "sampler=ddim", "sampler.steps=6", "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert Image.open(out / "trajectory.gif").n_frames == 6


# --------------------------------------------------------------------------- restoration modes

def _restore(run_dir, out, *args):
    return _run("difflab.cli.sample", f"ckpt={run_dir / 'checkpoints' / 'ema.pt'}", "progress=false",
                f"hydra.run.dir={out}", *args, cwd=out.parent)


def test_inpaint_mode_writes_strip_and_npz_with_known_pixels_exact(trained_run, tmp_path):
    out = tmp_path / "inpaint"
    proc = _restore(trained_run, out, "mode=inpaint", "mask=center", "method=repaint", "sampler=ddpm",
                    "sampler.steps=10", "jump_length=2", "jump_n_sample=2", "n=3", "samples_per_input=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "6 restorations" in proc.stdout and "known pixels exact" in proc.stdout
    strip = np.asarray(Image.open(out / "restoration.png"))
    assert strip.shape[:2] == (2 + 3 * 10, 2 + 4 * 10)  # degraded | 2 restored | truth
    saved = np.load(out / "restoration.npz")
    keep = saved["keep"]
    assert keep.shape == (8, 8) and not keep[2:6, 2:6].any() and keep.sum() == 48
    restored, truth = saved["restored"], np.repeat(saved["truth"], 2, axis=0)
    assert np.array_equal(restored[:, keep], truth[:, keep])
    assert not np.array_equal(restored[:, ~keep], truth[:, ~keep])


def test_superres_mode_takes_low_res_or_full_size_files(trained_run, tmp_path):
    low = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    Image.fromarray(low).save(tmp_path / "low.png")
    Image.fromarray(np.kron(low, np.ones((2, 2), dtype=np.uint8))).save(tmp_path / "full.png")
    for name, columns in (("low.png", 2), ("full.png", 3)):
        out = tmp_path / name.split(".")[0]
        proc = _restore(trained_run, out, "mode=superres", "factor=2", "method=ddnm",
                        "sampler=ddim", "sampler.steps=8", f"input={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "consistency PSNR" in proc.stdout
        strip = np.asarray(Image.open(out / "restoration.png"))
        assert strip.shape[:2] == (12, 2 + columns * 10)  # one row; truth only when the file was full size
        saved = np.load(out / "restoration.npz")
        assert saved["restored"].shape == (1, 8, 8, 1) and int(saved["factor"]) == 2
        assert ("truth" in saved.files) == (name == "full.png")


BAD_RESTORATION = [
    (("mode=superres", "factor=3"), "factor=3 does not divide the image size 8x8"),
    (("mode=inpaint", "mask=centre"), "unknown mask 'centre'"),
    (("mode=inpaint", "method=ilvr"), "method=ilvr is low-pass guidance for super-resolution"),
    (("mode=inpaint", "method=sr3"), "method=sr3 is for superres; inpaint with a trained model is method=palette"),
    (("mode=superres", "method=sr3"), "method=sr3 needs a model trained for superres"),
    (("mode=inpaint", "method=paint"), "method='paint' is not allowed: expected replacement, repaint, ddnm, ilvr, guided, sr3"),
    (("mode=inpaint", "sampler=ddim", "sampler.steps=4", "jump_length=5"), "jump_length=5 must be smaller"),
    (("mode=inpaint", "jump_n_sample=0"), "jump_n_sample=0 is not allowed"),
    (("mode=superres", "factor=2", "input=WRONG_SIZE"), "the input images are 5x5 but this model makes 8x8"),
    (("mode=inpaint", "mask=GREY"), "not binary"),
    (("mode=inpaint", "input=MISSING"), "is neither 'val' nor an existing image file or folder"),
]


def _bad_files(tmp_path, args):
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "wrong.png")
    grey = np.zeros((8, 8), dtype=np.uint8)
    grey[0, 0] = 100
    Image.fromarray(grey).save(tmp_path / "grey.png")
    names = {"WRONG_SIZE": "wrong.png", "GREY": "grey.png", "MISSING": "missing.png"}
    return [a.split("=")[0] + "=" + str(tmp_path / names[a.split("=")[1]]) if a.split("=")[1] in names else a
            for a in args]


@pytest.mark.parametrize("args, message", BAD_RESTORATION)
def test_restoration_bad_input_names_the_setting(trained_run, tmp_path, args, message):
    from hydra import compose, initialize_config_dir

    from difflab.cli import sample as sample_cli

    out = tmp_path / "bad"
    overrides = [f"ckpt={trained_run / 'checkpoints' / 'ema.pt'}", "progress=false", f"paths.output_dir={out}",
                 *_bad_files(tmp_path, args)]
    with initialize_config_dir(config_dir=str(Path(sample_cli.__file__).parents[3] / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        sample_cli.sample(cfg)
    assert not (out / "restoration.png").exists()


@pytest.mark.parametrize("args, message", [BAD_RESTORATION[0], BAD_RESTORATION[8]])
def test_restoration_bad_input_is_one_clear_line(trained_run, tmp_path, args, message):
    out = tmp_path / "bad"
    proc = _restore(trained_run, out, *_bad_files(tmp_path, args))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "restoration.png").exists()
