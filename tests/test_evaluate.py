"""Sample-quality metrics end to end: the FID callback during training, `difflab-evaluate`
over a sampler x steps x guidance grid, its clear errors, and the callback's DDP sharding."""

import csv
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from difflab.cli import _hydra
from difflab.training.fid import FID

import warm_process

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process evaluations, too

_hydra.setup()
CONF = Path(_hydra.config_dir())
TRAIN_ARGS = ("experiment=digits_tiny", "trainer.max_epochs=1", "callbacks.fid.num_samples=64",
              "callbacks.fid.batch_size=64", "callbacks.progress_bar=null")
SCORES = ("fid", "kid", "precision", "recall", "class_coverage")


def _run(module, *args, cwd):
    # One thread always: 8x8 images gain nothing from intra-op threads, which only contend
    # on the two shared cores (with the other xdist worker, or anything else running).
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return warm_process.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def _train(root, name, *extra):
    """Train in process: the same composed config and `train()` the CLI runs, without paying
    for a second interpreter's torch/Lightning import (the CLI path itself is covered by
    test_cli.py). Lightning's seed variables are kept out of this process's environment."""
    from difflab.cli.train import train

    run = root / name
    run.mkdir()
    cfg = _compose("train", [*TRAIN_ARGS, *extra, f"paths.output_dir={run}", f"paths.root_dir={root}"])
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            patch.delenv(key, raising=False)  # restored (or removed again) on exit
        metrics = train(cfg)
    assert math.isfinite(metrics["eval/fid"])  # also in trainer.callback_metrics
    return run


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory):
    """One epoch of unconditional digits with a 64-sample FID at the end; its directory."""
    return _train(tmp_path_factory.mktemp("fid"), "uncond")


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """The same, class-conditional with classifier-free guidance."""
    return _train(tmp_path_factory.mktemp("fid"), "cond", "model.num_classes=10", "guidance=cfg")


def _final_eval_metrics(run):
    rows = [r for r in _rows(run / "csv" / "metrics.csv") if r.get("eval/fid")]
    assert rows, "no eval/fid row in metrics.csv"
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("eval/") and v}


# 1. The FID callback logs finite scores at the end of training.

def test_training_logs_finite_sample_metrics(uncond_run):
    metrics = _final_eval_metrics(uncond_run)
    for name in SCORES:
        assert math.isfinite(metrics[f"eval/{name}"]), name
    assert metrics["eval/fid"] > 0
    assert 0 <= metrics["eval/precision"] <= 1 and 0 <= metrics["eval/recall"] <= 1
    assert 0 < metrics["eval/class_coverage"] <= 1
    assert "eval/class_accuracy" not in metrics  # unconditional: no class was asked for


def test_conditional_training_logs_class_accuracy(cond_run):
    metrics = _final_eval_metrics(cond_run)
    for name in (*SCORES, "class_accuracy"):
        assert math.isfinite(metrics[f"eval/{name}"]), name
    assert 0 <= metrics["eval/class_accuracy"] <= 1


# 2. Debug and minimal callback sets leave FID out; the default keeps it.

@pytest.mark.parametrize("override", ["debug=fast", "debug=overfit", "debug=profiler", "callbacks=minimal"])
def test_debug_and_minimal_configs_have_no_fid_callback(override):
    cfg = _compose("train", ["paths.output_dir=/tmp/difflab-test-run", override])
    assert cfg.callbacks.get("fid") is None


def test_default_config_has_the_fid_callback():
    cfg = _compose("train", ["paths.output_dir=/tmp/difflab-test-run"])
    assert cfg.callbacks.fid._target_ == "difflab.training.fid.FID"
    assert cfg.callbacks.fid.num_samples >= 4


@pytest.mark.parametrize("override", ["debug=fast", "debug=profiler", "callbacks=minimal"])
def test_digits_tiny_with_fid_switched_off_builds_only_real_callbacks(override, tmp_path):
    from lightning.pytorch.callbacks import Callback

    from difflab.cli.train import build

    cfg = _compose("train", [f"paths.output_dir={tmp_path}", "experiment=digits_tiny", override])
    _, _, trainer = build(cfg)
    assert all(isinstance(callback, Callback) for callback in trainer.callbacks), trainer.callbacks
    assert not any(isinstance(callback, FID) for callback in trainer.callbacks)


# 3. difflab-evaluate on the unconditional run.

@pytest.fixture(scope="module")
def uncond_eval(uncond_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "uncond"
    proc = _run("difflab.cli.evaluate", f"ckpt={uncond_run / 'checkpoints' / 'last.ckpt'}", "n=48",
                "samplers=[ddim,dpmpp,heun]", "steps=[2,4]", "progress=false", f"hydra.run.dir={out}",
                cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_evaluate_writes_one_row_per_cell_plus_the_real_baseline(uncond_eval):
    rows = _rows(uncond_eval / "results.csv")
    assert len(rows) == 1 + 3 * 2
    assert {"sampler", "steps", "nfe", "fid", "kid", "precision", "recall", "class_coverage"} <= set(rows[0])
    baseline, cells = rows[0], rows[1:]
    assert baseline["sampler"] == "real (val)" and baseline["steps"] == "" and baseline["nfe"] == "0"
    assert [(r["sampler"], int(r["steps"])) for r in cells] == [
        (s, n) for s in ("ddim", "dpmpp", "heun") for n in (2, 4)]
    for row in cells:
        steps, nfe = int(row["steps"]), int(row["nfe"])
        assert nfe == {"ddim": steps, "dpmpp": steps, "heun": 2 * steps - 1}[row["sampler"]], row
        assert row["n"] == "48" and row["guidance_scale"] == ""  # unconditional: no guidance
        for name in SCORES:
            assert math.isfinite(float(row[name])), (row["sampler"], steps, name)


def test_real_images_score_better_than_two_step_samples(uncond_eval):
    baseline, *cells = _rows(uncond_eval / "results.csv")
    two_step = [float(r["fid"]) for r in cells if r["steps"] == "2"]
    assert len(two_step) == 3 and float(baseline["fid"]) < min(two_step)
    assert float(baseline["precision"]) > 0.5 and float(baseline["class_coverage"]) == 1.0


def test_evaluate_writes_markdown_plot_and_one_grid_per_cell(uncond_eval):
    lines = (uncond_eval / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| sampler | steps | nfe |") and set(table[1]) <= set("|-")
    assert len(table) == 2 + 1 + 6 and any(line.startswith("| real (val) |") for line in table)
    plot = uncond_eval / "metrics_vs_nfe.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        image.verify()
    assert not (uncond_eval / "metrics_vs_guidance.png").exists()  # unconditional: no guidance axis
    grids = sorted(p.name for p in (uncond_eval / "samples").iterdir())
    assert grids == sorted(f"{s}_{n}.png" for s in ("ddim", "dpmpp", "heun") for n in (2, 4))
    with Image.open(uncond_eval / "samples" / "ddim_2.png") as grid:
        assert grid.size[0] == 2 + 8 * 10  # 8 per row, 8x8 digits with 2px padding


# 4. difflab-evaluate on the conditional run: a guidance sweep.

def test_guidance_sweep_on_the_conditional_run(cond_run, tmp_path):
    """In process (the CLI itself runs on the unconditional checkpoint above)."""
    from difflab.cli.evaluate import evaluate

    out = tmp_path / "cond"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # evaluate composes sampler configs
        evaluate(compose("eval", [f"ckpt={cond_run / 'checkpoints' / 'ema.pt'}", f"paths.output_dir={out}",
                                  "progress=false", "n=40", "samplers=[ddim]", "steps=[4]",
                                  "guidance_scales=[0,1,3]"]))
    baseline, *cells = _rows(out / "results.csv")
    assert baseline["sampler"] == "real (val)"
    assert [float(r["guidance_scale"]) for r in cells] == [0, 1, 3]
    assert all(r["sampler"] == "ddim" and r["steps"] == "4" and r["nfe"] == "4" for r in cells)
    for row in (baseline, *cells):
        assert 0 <= float(row["class_accuracy"]) <= 1
    assert float(baseline["class_accuracy"]) > 0.8  # the domain classifier on held-out real digits
    with Image.open(out / "metrics_vs_guidance.png") as image:
        image.verify()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["ddim_4_w0.png", "ddim_4_w1.png", "ddim_4_w3.png"]
    assert "| ddim | 4 | 4 | 3 |" in (out / "results.md").read_text()


def test_same_seed_same_scores_in_process(uncond_run, tmp_path):
    from difflab.cli.evaluate import evaluate

    ckpt = uncond_run / "checkpoints" / "ema.pt"
    args = ("n=24", "samplers=[dpmpp]", "steps=[3]", "real_baseline=false", "grid_images=0")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # evaluate composes sampler configs
        runs = [evaluate(compose("eval", [f"ckpt={ckpt}", f"paths.output_dir={tmp_path / name}", "progress=false",
                                          f"seed={seed}", *args]))
                for name, seed in (("a", 5), ("b", 5), ("c", 6))]
    (first,), (again,), (other,) = runs
    for name in ("fid", "kid", "precision", "recall", "is", "class_coverage"):
        assert first[name] == again[name], name
    assert first["fid"] != other["fid"]  # the seed really chooses the noise
    assert first["nfe"] == 3 and (tmp_path / "a" / "results.csv").is_file()


# 5. Mistakes end with one clear message, not a traceback.

@pytest.mark.parametrize("overrides,expected", [
    (["samplers=[nope]"], ["samplers", "nope"]),
    (["metrics.extractor=inception", "metrics.inception_weights=/nonexistent.pth"], ["/nonexistent.pth"]),
    (["n=2"], ["n=2", ">= 4"]),
    (["samplers=[ddim]", "steps=[5000]"], ["sampler.steps=5000", "num_timesteps=1000"]),
    (["ckpt=/nonexistent/last.ckpt"], ["/nonexistent/last.ckpt", "does not exist"]),
], ids=["unknown-sampler", "missing-inception-weights", "n-too-small", "steps-over-T", "missing-ckpt"])
def test_evaluate_errors_exit_with_a_message(uncond_run, tmp_path, overrides, expected):
    """The CLI's own error handling, in process: `main(cfg)` is the body Hydra runs."""
    from difflab.cli import evaluate as cli

    ckpt = uncond_run / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", [f"ckpt={ckpt}", f"paths.output_dir={tmp_path / 'out'}", "progress=false",
                               "n=8", *overrides])
        with pytest.raises(SystemExit) as exit_info:
            cli.main(cfg)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("difflab-evaluate: ")  # exit status 1
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "out" / "results.csv").exists()


def test_evaluate_cli_error_has_no_traceback(uncond_run, tmp_path):
    proc = _run("difflab.cli.evaluate", f"ckpt={uncond_run / 'checkpoints' / 'ema.pt'}", "samplers=[ddim,nope]",
                "steps=[2]", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.csv").exists()


# 6. The callback's DDP logic, without processes.

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fid_shards_are_disjoint_equal_and_cover_every_sample(world_size):
    fid = FID(num_samples=10)
    shards = [fid.shard(world_size, rank) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # all_gather needs equal shapes
    indices = [i for s in shards for i in s]
    assert len(indices) == len(set(indices))  # disjoint
    assert set(range(10)) <= set(indices)  # every sample drawn by some rank
    assert len(indices) - 10 < world_size  # padding stays below one per rank
    assert indices == list(range(len(indices)))  # contiguous, rank-major


class _FakeModule:
    """`all_gather` over a simulated world: every rank's tensor stacked to [world, *local.shape];
    with one rank the tensor itself, as Lightning returns it without a process group."""

    device = torch.device("cpu")

    def __init__(self, per_rank):
        self.per_rank = per_rank

    def all_gather(self, local):
        assert any(torch.equal(local, t) for t in self.per_rank)  # called with this rank's tensor
        return self.per_rank[0] if len(self.per_rank) == 1 else torch.stack(self.per_rank)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("trailing", [(5,), ()], ids=["features", "vector"])
def test_fid_gather_keeps_the_first_samples_in_rank_major_order(world_size, trailing):
    fid = FID(num_samples=10)
    per_rank = []
    for rank in range(world_size):
        index = torch.tensor(list(fid.shard(world_size, rank)), dtype=torch.float64)
        value = index.view(-1, *[1] * len(trailing)).expand(-1, *trailing).clone()
        value[index >= 10] = -1  # padding a rank drew beyond num_samples
        per_rank.append(value)
    module = _FakeModule(per_rank)
    for rank in range(world_size):
        gathered = fid._gather(module, per_rank[rank])
        assert gathered.shape == (10, *trailing) and gathered.dtype == torch.float32
        expected = torch.arange(10, dtype=torch.float32).view(-1, *[1] * len(trailing)).expand(-1, *trailing)
        assert torch.equal(gathered, expected)
    assert fid._gather(module, None) is None  # no logits (extractor without a classifier head)


# --------------------------------------------------------------------------- task=inpaint | superres

def _evaluate_task(run, out, *overrides):
    from difflab.cli.evaluate import evaluate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        evaluate(compose("eval", [f"ckpt={run / 'checkpoints' / 'ema.pt'}", f"paths.output_dir={out}", "n=16",
                                  "batch_size=16", "progress=false", "samplers=[ddpm]", "steps=[6]",
                                  "jump_length=2", "jump_n_sample=2", "diversity_inputs=2", "diversity_samples=3",
                                  "label_ceiling=false", *overrides]))
    return _rows(out / "results.csv")


def test_inpaint_task_scores_methods_beside_the_baselines(uncond_run, tmp_path):
    rows = _evaluate_task(uncond_run, tmp_path / "inpaint", "task=inpaint", "mask=center")
    assert [r["method"] for r in rows] == ["zero (baseline)", "mean (baseline)", "nearest (baseline)",
                                           "replacement", "repaint", "ddnm"]
    for row in rows:
        assert 0.0 <= float(row["label_agreement"]) <= 1.0 and float(row["consistency_psnr"]) == math.inf
        assert math.isfinite(float(row["fid"])) and float(row["psnr_hole"]) < float(row["psnr"])
    by = {r["method"]: r for r in rows}
    assert int(by["replacement"]["nfe"]) == 6 and int(by["repaint"]["nfe"]) == 6 + 2 * 2  # jumps at 2 and 4
    assert int(by["ddnm"]["nfe"]) == 6  # its time-travel has its own knobs, off by default
    assert float(by["repaint"]["diversity"]) > 0 and float(by["zero (baseline)"]["diversity"]) == 0
    for name in ("replacement", "repaint", "ddnm"):  # over 3 restorations of 2 inputs
        assert float(by[name]["agreement_majority"]) in (0.0, 0.5, 1.0)
        assert float(by[name]["agreement_any"]) >= float(by[name]["agreement_majority"])
    for name in ("results.md", "restoration_vs_nfe.png", "strips/repaint_ddpm_6.png", "strips/baseline_nearest.png"):
        assert (tmp_path / "inpaint" / name).is_file(), name


def test_inpaint_task_reports_the_label_ceiling_of_the_known_pixels(uncond_run, tmp_path):
    rows = _evaluate_task(uncond_run, tmp_path / "ceiling", "task=inpaint", "mask=center", "methods=[guided]",
                          "baselines=false", "label_ceiling=true", "metrics.domain_steps=30")
    assert [r["method"] for r in rows] == ["known pixels only: best guess (ceiling)",
                                           "known pixels only: posterior draw (ceiling)", "guided"]
    for row in rows[:2]:
        assert 0.0 < float(row["label_agreement"]) <= 1.0 and row["fid"] == ""
    assert int(rows[2]["nfe"]) == 6 and float(rows[2]["consistency_psnr"]) == math.inf


def test_superres_task_is_consistent_for_ddnm(uncond_run, tmp_path):
    rows = _evaluate_task(uncond_run, tmp_path / "sr", "task=superres", "factor=2", "methods=[ddnm,ilvr]",
                          "jump_n_sample=1")
    by = {r["method"]: r for r in rows}
    assert list(by) == ["nearest (baseline)", "bicubic (baseline)", "ddnm", "ilvr"]
    assert float(by["ddnm"]["consistency_psnr"]) > 60 and float(by["nearest (baseline)"]["consistency_psnr"]) > 60
    assert float(by["bicubic (baseline)"]["consistency_psnr"]) < 60  # bicubic is not consistent
    assert "psnr_hole" not in rows[0] or rows[0]["psnr_hole"] == ""


def test_restoration_task_errors_name_the_setting(uncond_run, tmp_path):
    from difflab.cli.schema import ConfigError

    with pytest.raises(ConfigError, match="methods="):
        _evaluate_task(uncond_run, tmp_path / "bad", "task=inpaint", "methods=[paint]")
    with pytest.raises(ConfigError, match="repaint on ddpm with 6 steps: jump_length=6 must be smaller"):
        _evaluate_task(uncond_run, tmp_path / "bad", "task=inpaint", "methods=[repaint]", "jump_length=6")
    with pytest.raises(ConfigError, match="factor=3 does not divide"):
        _evaluate_task(uncond_run, tmp_path / "bad", "task=superres", "factor=3")


SR3_ARGS = ("task={_target_:difflab.training.tasks.SuperResolution,factor:2}",
            "model.conditioner={_target_:difflab.models.conditioning.Conditioner,embedders:"
            "[{_target_:difflab.models.conditioning.ImageConcat,input_key:low_res,channels:1}]}",
            "callbacks.fid=null")


@pytest.fixture(scope="module")
def sr3_run(tmp_path_factory):
    """One epoch of an SR3-style x2 model on the 8x8 digits; its directory."""
    from difflab.cli.train import train

    root = tmp_path_factory.mktemp("sr3")
    run = root / "sr3"
    run.mkdir()
    args = [a for a in TRAIN_ARGS if not a.startswith("callbacks.fid")]
    cfg = _compose("train", [*args, *SR3_ARGS, f"paths.output_dir={run}", f"paths.root_dir={root}"])
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            patch.delenv(key, raising=False)
        train(cfg)
    return run


def test_a_trained_sr3_model_is_scored_beside_the_training_free_methods(uncond_run, sr3_run, tmp_path):
    grid = Image.open(sorted((sr3_run / "samples").glob("*.png"))[-1])
    assert grid.size[0] == 2 + 3 * 10  # low-res | restored | truth
    rows = _evaluate_task(uncond_run, tmp_path / "sr", "task=superres", "factor=2", "methods=[ddnm,sr3]",
                          f"trained_ckpts=[{sr3_run / 'checkpoints' / 'ema.pt'}]")
    assert [r["method"] for r in rows] == ["nearest (baseline)", "bicubic (baseline)", "ddnm", "sr3"]
    sr3 = rows[-1]
    assert int(sr3["nfe"]) == 6 and math.isfinite(float(sr3["psnr"])) and float(sr3["consistency_psnr"]) < 60


def test_trained_and_training_free_checkpoints_are_not_mixed_up(uncond_run, sr3_run, tmp_path):
    from difflab.cli.schema import ConfigError

    with pytest.raises(ConfigError, match="method=sr3 needs a model trained for superres"):
        _evaluate_task(uncond_run, tmp_path / "a", "task=superres", "factor=2", "methods=[sr3]")
    with pytest.raises(ConfigError, match="its network needs that condition, so use method=sr3"):
        _evaluate_task(sr3_run, tmp_path / "b", "task=superres", "factor=2", "methods=[ddnm]")
    with pytest.raises(ConfigError, match="is a trained restoration model: it needs its condition"):
        _evaluate_task(sr3_run, tmp_path / "c")
    with pytest.raises(ValueError, match="trained for x2 super-resolution"):
        _evaluate_task(sr3_run, tmp_path / "d", "task=superres", "factor=4", "methods=[sr3]")


def test_sample_cli_restores_with_a_trained_sr3_model_and_refuses_plain_sampling(sr3_run, tmp_path):
    from difflab.cli import sample as sample_cli
    from difflab.cli.schema import ConfigError

    ckpt = sr3_run / "checkpoints" / "ema.pt"
    out = tmp_path / "sr3"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("sample", [f"ckpt={ckpt}", "mode=superres", "method=sr3", "factor=2", "n=4", "progress=false",
                                 "sampler=ddim", "sampler.steps=5", f"paths.output_dir={out}"])
        written = sample_cli.sample(cfg)
        assert written["strip"].is_file() and written["npz"].is_file()
        with pytest.raises(ConfigError, match="needs its condition, so mode=sample does not apply"):
            sample_cli.sample(compose("sample", [f"ckpt={ckpt}", f"paths.output_dir={tmp_path / 'x'}"]))


def test_sampler_args_reach_every_sampler_and_are_checked(uncond_run, tmp_path):
    from difflab.cli.evaluate import evaluate
    from difflab.cli.schema import ConfigError

    base = [f"ckpt={uncond_run / 'checkpoints' / 'ema.pt'}", "n=8", "batch_size=8", "progress=false",
            "samplers=[ddim]", "steps=[3]", "task=inpaint", "methods=[ddnm]", "baselines=false", "diversity_inputs=0",
            "label_ceiling=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        rows = evaluate(compose("eval", [*base, "+sampler_args.eta=0.85", f"paths.output_dir={tmp_path / 'a'}"]))
        assert [r["method"] for r in rows] == ["ddnm"]
        with pytest.raises(ConfigError, match="samplers:"):
            evaluate(compose("eval", [*base, "+sampler_args.etaa=1", f"paths.output_dir={tmp_path / 'b'}"]))
        with pytest.raises(ValueError, match="eta"):
            evaluate(compose("eval", [*base, "+sampler_args.eta=1.5", f"paths.output_dir={tmp_path / 'c'}"]))
