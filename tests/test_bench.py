"""`make bench` runs end to end (on tiny stand-in models, so it takes seconds): every model in
every setting, fractions of the measured matmul peaks, the auto choice, gradient
checkpointing, and the JSON kept on disk."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                mid_attention=True, num_groups=4, image_size=8, attention_head_dim=8)
    monkeypatch.setattr(module, "PEER_CONFIG", tiny)
    monkeypatch.setattr(module, "DEFAULT_CONFIG", {**tiny, "attention_levels": (), "patch_size": 2})
    monkeypatch.setattr(module, "LITE_CONFIG", {**tiny, "attention_levels": ()})
    small = module.local_protocol(batch=4, shape=(1, 8, 8), iters=1, warmup=1)
    monkeypatch.setattr(module, "local_protocol", lambda **kwargs: small)
    return module


def test_bench_reports_every_setting_the_peaks_and_keeps_its_json(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, n=2048, seconds=0.5: 100.0)
    out = bench.main(["--peer", str(tmp_path / "missing.py"), "--out", str(tmp_path / "kept")])
    assert set(out["models"]) == {"difflab (peer config)", "difflab unet_mnist_patch", "difflab unet_mnist_lite"}
    assert any("peer script not found" in n for n in out["notes"])
    for result in out["models"].values():
        assert set(result["train_img_s"]) == set(result["denoise_img_s"]) == {
            "fp32/contiguous", "fp32/channels_last", "bf16/contiguous", "bf16/channels_last"}
        best = result["best_train"]
        assert best["img_s"] == max(result["train_img_s"].values())
        expected = best["img_s"] * result["train_gflop_per_img"] / 100.0
        assert best["fraction_of_matmul_peak"] == pytest.approx(expected)
        assert result["denoise_gflop_per_img"] < result["train_gflop_per_img"]  # no backward
    profiled = out["step_profile"]["difflab (peer config)"]
    assert profiled["setting"] == out["models"]["difflab (peer config)"]["best_train"]["setting"]
    assert 0 < profiled["convolution_s"] < profiled["step_s"] and 0 < profiled["convolution_share"] < 1
    assert 0.5 < profiled["convolution_flop_share"] < 1 and profiled["convolution_gflop_s"] > 0
    assert out["auto"]["precision"] in ("32-true", "bf16-mixed") and out["machine"]["threads"] >= 1
    kept = list((tmp_path / "kept").glob("bench-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["models"].keys() == out["models"].keys()


def test_a_bf16_training_setting_runs_the_network_under_bf16_autocast(bench):
    # The forward wrapper of training must leave the step's autocast on (an earlier wrapper
    # entered autocast(enabled=False) and timed every bf16 training setting in fp32).
    seen = []

    def fwd(model, x, t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return model(x, t)

    model = bench.UNet(**bench.PEER_CONFIG)
    for bf16 in (True, False):
        bench.local_protocol().train_rate(model, bench._forward(fwd, True, False), bf16=bf16)
        assert set(seen) == {bf16}
        seen.clear()
    with torch.no_grad():
        bench._forward(fwd, False, True)(model, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert seen == [True]


def test_head_to_head_interleaves_the_models_and_keeps_each_best(bench, monkeypatch):
    calls = []
    slow_moment = {("a", "train", 1): 10.0}  # a load slows model a's training in round 1 only

    def time_setting(protocol, build, setting, kind):
        calls.append((build.name, kind, setting))
        round_ = sum(1 for c in calls if c[:2] == (build.name, kind)) - 1
        return slow_moment.get((build.name, kind, round_), 100.0 if build.name == "a" else 50.0) + round_

    def named(name):
        def build():
            raise AssertionError("time_setting is faked")
        build.name = name
        return build

    monkeypatch.setattr(bench, "time_setting", time_setting)
    monkeypatch.setattr(bench, "on_device", lambda build: build)
    out = {"models": {name: {"best_train": {"setting": "fp32/channels_last"},
                             "best_denoise": {"setting": "bf16/contiguous"}} for name in ("a", "b")}}
    best = bench.head_to_head(None, {"a": named("a"), "b": named("b")}, out, rounds=3)
    assert [c[:2] for c in calls[:4]] == [("a", "train"), ("a", "denoise"), ("b", "train"), ("b", "denoise")]
    assert len(calls) == 12 and {c[2] for c in calls if c[1] == "denoise"} == {"bf16/contiguous"}
    assert best == {"a": {"train": 102.0, "denoise": 102.0}, "b": {"train": 52.0, "denoise": 52.0}}


def test_gradient_checkpointing_is_timed_and_keeps_fewer_activations(bench):
    result = bench.bench_checkpointing(bench.local_protocol(), bf16=False)
    assert result["plain_train_img_s"] > 0 and result["checkpointing_train_img_s"] > 0
    assert 0 < result["checkpointing_activation_mb"] < 0.7 * result["plain_activation_mb"]
    assert result["memory_saving"] > 0.3


def test_the_default_network_is_read_from_the_config_the_training_default_names(bench):
    from omegaconf import OmegaConf

    train = OmegaConf.load(bench.REPO_ROOT / "conf" / "train.yaml")
    named = next(d["model"] for d in OmegaConf.to_container(train.defaults) if isinstance(d, dict) and "model" in d)
    assert named == bench.DEFAULT_MODEL
    config = bench.model_config(bench.DEFAULT_MODEL)
    assert config["patch_size"] == 2 and config["in_channels"] == 1 and config["image_size"] == 28
    bench.UNet(**config)  # the file's keys are the U-Net's arguments


def test_a_bf16_setting_is_measured_against_the_fp32_peak_where_bf16_matmuls_are_slower(bench):
    result = {"train_gflop_per_img": 1.0, "denoise_gflop_per_img": 0.5,
              "best_train": {"setting": "bf16/channels_last", "img_s": 50.0},
              "best_denoise": {"setting": "fp32/contiguous", "img_s": 100.0}}
    bench.peak_fraction(result, {"fp32": 100.0, "bf16": 0.5})  # an AVX2-only CPU: bf16 emulated
    assert result["best_train"]["fraction_of_matmul_peak"] == pytest.approx(0.5)  # not 100x
    assert result["best_denoise"]["fraction_of_matmul_peak"] == pytest.approx(0.5)
    bench.peak_fraction(result, {"fp32": 100.0, "bf16": 400.0})  # fast bf16: its own peak
    assert result["best_train"]["fraction_of_matmul_peak"] == pytest.approx(50.0 / 400.0)


def test_batch_sets_the_batch_of_every_model_and_the_device_is_recorded(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, n=2048, seconds=0.5: 100.0)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    seen = []
    timed = bench.local_protocol().train_rate

    def train_rate(model, fwd, bf16=False):
        seen.append(bench.local_protocol().BATCH)
        return timed(model, fwd, bf16)

    monkeypatch.setattr(bench.local_protocol(), "train_rate", train_rate)
    out = bench.main(["--peer", str(tmp_path / "missing.py"), "--batch", "3", "--out", str(tmp_path)])
    assert out["protocol"]["batch"] == 3 and out["protocol"]["device"] == "cpu"
    assert seen and set(seen) == {3}


def test_asking_for_cuda_where_there_is_none_says_so(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here; use --device cpu"):
        bench.main(["--device", "cuda", "--out", str(tmp_path)])
    assert bench.pick_device("auto") == "cpu" and not list(tmp_path.iterdir())  # nothing written
