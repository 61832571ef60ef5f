"""End to end: a run on each new path / output / density / weighting trains, records what it
measured, samples with every sampler family, and bad settings stop at composition."""

import re
import sys

import numpy as np
import pytest
import torch
import yaml

import warm_process


def _run(module, *args, cwd):
    return warm_process.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)


@pytest.mark.parametrize("recipe", [
    ["schedule=flow", "objective=auto", "density=logit_normal", "weighting=min_snr"],  # auto: velocity
    pytest.param(["schedule=edm", "objective=edm", "density=lognormal", "density.stratified=true",
                  "weighting=uncertainty"], marks=pytest.mark.slow),  # the default recipe in the default suite
], ids=["flow-velocity", "edm-uncertainty"])
def test_a_recipe_trains_and_samples(tmp_path, recipe):
    run = tmp_path / "run"
    proc = _run("difflab.cli.train", "experiment=digits_tiny", "trainer.max_epochs=1", "callbacks.progress_bar=null",
                *recipe, f"hydra.run.dir={run}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = yaml.safe_load((run / "config.yaml").read_text())
    # sigma_data was measured from the training images (digits in [-1, 1]) and written down.
    assert 0.3 < config["schedule"]["sigma_data"] < 1.0
    assert config["schedule"]["kind"] == recipe[0].split("=")[1]
    assert config["objective"]["prediction"] == ("velocity" if "schedule=flow" in recipe else "edm")  # as resolved
    if "weighting=uncertainty" in recipe:  # the learned weighting trained with the network
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert state["weighting.linear.weight"].abs().sum() > 0
    for sampler in ("ddim", "heun", "dpmpp") if "schedule=flow" in recipe else ("heun",):
        out = tmp_path / f"s-{sampler}"
        proc = _run("difflab.cli.sample", f"ckpt={run / 'checkpoints' / 'ema.pt'}", "n=4", f"sampler={sampler}",
                    "sampler.steps=4", "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        images = np.load(out / "samples.npz")["images"]
        assert images.shape[0] == 4 and np.isfinite(images).all()


@pytest.mark.parametrize("args,message", [
    (["schedule=cosine", "objective=velocity"], "objective=velocity is the rectified-flow field and needs schedule=flow"),
    (["density=lognormal", "density.p_std=0"], "density: p_std must be > 0"),
    (["density=logit_normal", "density.std=-1"], "density: std must be > 0"),
    (["weighting=min_snr", "weighting.gamma=-1"], "weighting: gamma must be > 0"),
    (["weighting=p2", "weighting.k=0"], "weighting: k must be > 0"),
    (["weighting=uncertainty", "weighting.base=eps"], "weighting: uncertainty base 'eps'"),
    (["schedule=flow", "schedule.sigma_min=0"], "schedule.sigma_min/sigma_max"),
    (["schedule=edm", "schedule.sigma_data=-0.5"], "schedule.sigma_data"),
])
def test_bad_training_method_settings_name_the_setting(args, message):
    from hydra import compose, initialize_config_dir

    from difflab.cli import _hydra, schema

    _hydra.setup()
    with initialize_config_dir(config_dir=str(_hydra.config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/difflab-test-run", *args])
    with pytest.raises(schema.ConfigError, match=re.escape(message)):
        schema.validate(cfg)


@pytest.mark.parametrize("schedule,output", [("flow", "velocity"), ("edm", "edm"), ("cosine", "v"), ("linear", "v")])
def test_objective_auto_resolves_to_the_paths_own_output(schedule, output):
    from hydra import compose, initialize_config_dir

    from difflab.cli import _hydra, schema

    _hydra.setup()
    with initialize_config_dir(config_dir=str(_hydra.config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/difflab-test-run", f"schedule={schedule}"])
    assert cfg.objective.prediction == "auto"  # the default, until the run starts
    schema.resolve_objective(cfg)
    schema.validate(cfg)
    assert cfg.objective.prediction == output
    cfg.objective.prediction = "eps"  # an explicit choice is kept
    schema.resolve_objective(cfg)
    assert cfg.objective.prediction == "eps"


def test_a_typo_in_a_new_group_stops_the_cli_without_traceback(tmp_path):
    for args, message in ((["weighting=soft_min_snr", "weighting.gamm=2"], "gamm"),
                          (["density=uniformish"], "density")):
        proc = _run("difflab.cli.train", "experiment=digits_tiny", *args, f"hydra.run.dir={tmp_path / 'r'}",
                    f"paths.root_dir={tmp_path}", cwd=tmp_path)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "r" / "checkpoints").exists()
