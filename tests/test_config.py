"""Every option of every config group composes, builds, and typos fail loudly."""

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from difflab.cli import _hydra, schema

_hydra.setup()
CONF = Path(_hydra.config_dir())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
FIXED = ["paths.output_dir=/tmp/difflab-test-run"]  # ${hydra:...} is only set inside a real run


def _compose(overrides, config_dir=CONF, name="train"):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(name, overrides=[*FIXED, *overrides])


def test_every_group_has_options():
    assert {"data", "model", "schedule", "objective", "sampler", "trainer", "logger", "callbacks",
            "paths", "experiment", "debug"} <= set(GROUPS)
    assert len(OPTIONS) >= 30


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_validates(group, option):
    extra = {("data", "folder"): ["data.path=/nonexistent"],
             ("guidance", "cfg"): ["model.num_classes=10"],
             ("model", "autoencoder_kl"): ["stage=autoencoder"],
             ("objective", "velocity"): ["schedule=flow"]}.get((group, option), [])
    cfg = _compose([f"{group}={option}", *extra])
    schema.validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    # The cheap object-building nodes really build.
    if group == "schedule":
        assert instantiate(cfg.schedule).num_timesteps == cfg.schedule.num_timesteps
    if group in ("density", "weighting"):
        from difflab.diffusion import DENSITIES, WEIGHTINGS

        assert type(instantiate(cfg[group])) is {**DENSITIES, **WEIGHTINGS}[option]
    if group == "sampler":
        from difflab.diffusion.samplers import SAMPLERS

        assert type(instantiate(cfg.sampler)) is SAMPLERS[option]  # conf/sampler/<name> builds that sampler
    if group == "model":
        net = instantiate(cfg.model, in_channels=3 if option == "unet_cifar" else 1,
                          image_size=32 if option != "unet_tiny" else 8, _convert_="all")
        assert sum(p.numel() for p in net.parameters()) > 0


def test_override_typo_names_the_key():
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        _compose(["optim.lrr=0.1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException, match="optim.lr"):
        _compose(["optim.lr=fast"])


@pytest.mark.parametrize("override,key", [
    ("sampler=ddim sampler.eta=1.5", "sampler.eta"),
    ("sampler=ddim sampler.steps=0", "sampler.steps"),
    ("sampler=ddim sampler.steps=5000", "sampler.steps"),
    ("data.val_fraction=1.2", "data.val_fraction"),
    ("objective.prediction=score", "objective.prediction"),
    ("model.attention_levels=[7]", "model.attention_levels"),
    ("optim.lr=-1", "optim.lr"),
    ("guidance=cfg", "guidance.scale"),  # guidance on an unconditional model
    ("sampler=heun sampler.rho=-1", "rho"),  # checked by the sampler's own constructor
    ("sampler=dpmpp sampler.order=3", "order"),
    ("sampler=pc sampler.steps=1001", "sampler.steps"),
    ("p_uncond=1.0", "p_uncond"),
])
def test_out_of_range_value_names_the_key(override, key):
    cfg = _compose(override.split())
    with pytest.raises(schema.ConfigError, match=key.replace(".", r"\.")):
        schema.validate(cfg)


def test_typo_in_a_yaml_file_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nsampler:\n  etaa: 0.5\n")
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="etaa"):
        _compose(["experiment=typo"], config_dir=conf)


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException, match="ddim"):
        _compose(["sampler=dpmsolver_typo"])


def test_default_experiment_is_mnist5k_with_measured_precision():
    cfg = _compose([])
    assert cfg.data.name == "mnist5k" and cfg.trainer.precision == "auto" and cfg.channels_last == "auto"
    assert cfg.callbacks.ema._target_.endswith("EMA") and cfg.callbacks.sample_grid is not None
    assert cfg.logger.csv.save_dir == "/tmp/difflab-test-run"


def test_default_network_is_patched_and_measured_experiments_keep_the_network_of_their_figures():
    """The default trains on 2x2 patches; the experiments whose README tables were measured on
    unet_mnist_lite (the default network before it) pin that network, so the tables stay true."""
    default = _compose([]).model
    assert default.patch_size == 2 and list(default.channel_mults) == [1, 1]
    for experiment in ("mnist5k_long", "mnist5k_v", "mnist5k_cfg", "mnist5k_sr3", "mnist5k_palette"):
        model = _compose([f"experiment={experiment}"]).model
        assert model.patch_size == 1 and list(model.channel_mults) == [1, 2, 2], experiment
    assert _compose(["experiment=mnist5k_ect"]).model.patch_size == 2  # tunes a default run: same network
