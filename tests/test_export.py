"""difflab-export: safetensors files that rebuild their model, and the errors of foreign files."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from difflab.training.callbacks import EMA_FORMAT
from difflab.training.checkpoint import CheckpointError, read_checkpoint
from difflab.training.export import export_safetensors


@pytest.fixture
def ema_file(tmp_path):
    """An ema.pt of a tiny digits model, with the full run config difflab-train writes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from difflab.cli import _hydra

    _hydra.setup()
    with initialize_config_dir(config_dir=str(_hydra.config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits_tiny", f"paths.output_dir={tmp_path / 'run'}",
                                          f"paths.root_dir={tmp_path}", "model.in_channels=1", "model.image_size=8",
                                          "schedule.sigma_data=0.5"])
    run_config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    net = instantiate(run_config["model"], _convert_="all")
    path = tmp_path / "ema.pt"
    torch.save({"format": EMA_FORMAT, "run_config": run_config, "state_dict": net.state_dict(), "epoch": 3,
                "global_step": 75}, path)
    return path


def test_an_export_rebuilds_the_same_model(ema_file):
    from difflab.cli.sample import build_denoiser

    out = export_safetensors(ema_file)
    assert out == ema_file.with_suffix(".safetensors") and not list(out.parent.glob("*.tmp"))
    config, weights, first_stage = read_checkpoint(ema_file)
    config_x, weights_x, first_stage_x = read_checkpoint(out)
    assert config_x == config and first_stage_x == first_stage == {}
    assert weights_x.keys() == weights.keys() and all(torch.equal(weights[k], weights_x[k]) for k in weights)
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 10, 500, 999])
    outputs = [build_denoiser(c, w, torch.device("cpu"))[0].x0(x, t) for c, w in ((config, weights),
                                                                                  (config_x, weights_x))]
    assert torch.equal(*outputs)


def test_foreign_safetensors_files_are_refused_by_name(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not one difflab-export wrote"):
        read_checkpoint(plain)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="broken.safetensors as a safetensors file"):
        read_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        export_safetensors(tmp_path / "missing.pt")


def test_the_export_cli_refuses_an_unknown_format():
    from difflab.cli import schema
    from difflab.cli.export import ExportConfig

    with pytest.raises(schema.ConfigError, match="format='onnx'"):
        ExportConfig(ckpt="x", format="onnx").validate()
