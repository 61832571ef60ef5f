"""`precision: auto`: the probe's decision both ways, its cache (and distrust of another
machine's), explicit settings, the warnings for a slow forced bf16 / 16-mixed, CUDA's rule,
and one real probe."""

import json
import logging

import pytest
import torch

from difflab.models import UNet
from difflab.training import precision as P

import warm_process

SHAPE = (64, 1, 8, 8)
REAL_MATMUL_GAIN = P.matmul_gain


def tiny_net():
    torch.manual_seed(0)
    return UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), attention_levels=(), mid_attention=False,
                num_groups=4, image_size=8)


def fake_timer(rates, calls=None):
    """A probe timer returning (first, steady) seconds from img/s per candidate name."""

    def timer(net, shape, candidate, cond=None, fp32_first=None):
        if calls is not None:
            calls.append(candidate.name)
        seconds = shape[0] / rates[candidate.name]
        return seconds, seconds

    return timer


def no_timer(*args, **kwargs):
    raise AssertionError("the probe ran, but it should not have")


@pytest.fixture(autouse=True)
def bf16_arithmetic(monkeypatch):
    """The quick matmul check passes (as on a CPU with bf16 arithmetic), unless a test says
    otherwise: the fake network timings then decide, on whatever CPU runs the tests."""
    monkeypatch.setattr(P, "matmul_gain", lambda: 3.0)


def test_a_cpu_without_bf16_arithmetic_skips_the_bf16_probe(tmp_path):
    calls = []
    decision = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path,
                         timer=fake_timer(SLOW_BF16, calls), bf16_check=lambda: 0.01)
    assert sorted(set(calls)) == ["32-true/channels_last", "32-true/contiguous"]
    assert (decision.precision, decision.ratio("bf16-mixed")) == ("32-true", 0.01)
    assert "not worth a probe" in decision.summary()
    again = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=no_timer,
                      bf16_check=no_timer)  # both the matmul check and the rates come from the cache
    assert (again.source, again.precision, again.bf16_matmul_gain) == ("cache", "32-true", 0.01)
    calls.clear()  # asked for explicitly, bf16 is measured on the network, for an honest warning
    forced = P.resolve("bf16-mixed", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path,
                       timer=fake_timer(SLOW_BF16, calls))
    assert set(calls) == {"bf16-mixed/channels_last"} and "0.08x the speed" in forced.warnings[0]


FAST_BF16 = {"32-true/contiguous": 100.0, "32-true/channels_last": 110.0, "bf16-mixed/channels_last": 300.0}
SLOW_BF16 = {"32-true/contiguous": 100.0, "32-true/channels_last": 130.0, "bf16-mixed/channels_last": 10.0}


def test_auto_picks_bf16_where_it_pays_and_caches_it(tmp_path):
    calls = []
    first = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=fake_timer(FAST_BF16, calls))
    assert (first.precision, first.channels_last, first.source) == ("bf16-mixed", True, "probe")
    assert sorted(set(calls)) == sorted(FAST_BF16) and first.ratio("bf16-mixed") == pytest.approx(300 / 110)
    files = list((tmp_path / "precision").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["machine"] == P.machine()
    again = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=no_timer)
    assert (again.precision, again.channels_last, again.source) == ("bf16-mixed", True, "cache")
    assert "bf16-mixed" in again.summary() and "cache" in again.summary()


def test_auto_keeps_float32_where_bf16_is_slower_and_measures_the_layout(tmp_path):
    decision = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=fake_timer(SLOW_BF16))
    assert (decision.precision, decision.channels_last) == ("32-true", True)
    assert decision.warnings == []
    tie = {**SLOW_BF16, "32-true/channels_last": 100.5}  # no gain: no reason to convert every batch
    decision = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, timer=fake_timer(tie))
    assert (decision.precision, decision.channels_last) == ("32-true", False)


def test_a_gain_below_the_threshold_is_not_enough():
    rates = {**SLOW_BF16, "bf16-mixed/channels_last": 1.2 * 130.0}
    assert P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, timer=fake_timer(rates)).precision == "32-true"


def test_a_cache_from_another_machine_is_measured_again(tmp_path, caplog):
    P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=fake_timer(FAST_BF16))
    path = next((tmp_path / "precision").glob("*.json"))
    record = json.loads(path.read_text())
    record["machine"] = {**record["machine"], "cpu": "Some Other CPU", "torch": "1.0"}
    path.write_text(json.dumps(record))
    calls = []
    with caplog.at_level(logging.INFO, logger="difflab.precision"):
        decision = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path,
                             timer=fake_timer(SLOW_BF16, calls))
    assert calls and decision.source == "probe" and decision.precision == "32-true"
    assert "another machine" in caplog.text and "Some Other CPU" in caplog.text
    assert json.loads(path.read_text())["machine"] == P.machine()  # re-measured here, re-cached
    path.write_text("{not json")
    assert P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path,
                     timer=fake_timer(SLOW_BF16)).source == "probe"


def test_a_cache_written_by_an_older_probe_is_measured_again(tmp_path, caplog):
    P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=fake_timer(FAST_BF16))
    path = next((tmp_path / "precision").glob("*.json"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": "difflab.precision/1"}))
    with caplog.at_level(logging.INFO, logger="difflab.precision"):
        decision = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=fake_timer(SLOW_BF16))
    assert decision.source == "probe" and decision.precision == "32-true"
    assert "another version of the probe (difflab.precision/1" in caplog.text and "another machine" not in caplog.text
    assert json.loads(path.read_text())["format"] == P.CACHE_FORMAT


def test_a_cache_of_another_network_is_not_used(tmp_path):
    P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path, timer=fake_timer(FAST_BF16))
    other = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), attention_levels=(), num_groups=4)
    assert P.resolve("auto", "cpu", "auto", other, SHAPE, cache_dir=tmp_path,
                     timer=fake_timer(SLOW_BF16)).source == "probe"


def test_explicit_settings_win_and_fp32_needs_no_probe():
    decision = P.resolve("32-true", "cpu", False, tiny_net(), SHAPE, timer=no_timer)
    assert (decision.precision, decision.channels_last, decision.source) == ("32-true", False, "requested")
    calls = []
    decision = P.resolve("32-true", "cpu", "auto", tiny_net(), SHAPE, timer=fake_timer(SLOW_BF16, calls))
    assert (decision.precision, decision.channels_last) == ("32-true", True)
    assert sorted(set(calls)) == ["32-true/channels_last", "32-true/contiguous"]  # no bf16 measured
    decision = P.resolve("bf16-mixed", "cpu", "auto", tiny_net(), SHAPE, timer=fake_timer(FAST_BF16))
    assert (decision.precision, decision.warnings) == ("bf16-mixed", [])


def test_a_forced_bf16_that_is_slower_runs_with_the_measured_ratio():
    decision = P.resolve("bf16-mixed", "cpu", True, tiny_net(), SHAPE,
                         timer=fake_timer({"32-true/channels_last": 130.0, "bf16-mixed/channels_last": 13.0}))
    assert decision.precision == "bf16-mixed" and decision.channels_last is True
    assert len(decision.warnings) == 1 and "0.10x the speed of 32-true" in decision.warnings[0]


def test_16_mixed_on_the_cpu_runs_as_bf16_with_a_warning():
    decision = P.resolve("16-mixed", "cpu", "auto", tiny_net(), SHAPE, timer=fake_timer(SLOW_BF16))
    assert decision.precision == "bf16-mixed"
    assert any("16-mixed is not available on the CPU" in w for w in decision.warnings)
    assert any("0.08x the speed" in w for w in decision.warnings)


@pytest.mark.parametrize("value", ["fp8", "bf16", 16, "auto-ish"])
def test_unknown_precision_names_the_allowed_values(value):
    with pytest.raises(P.PrecisionError, match="allowed: auto, 32-true"):
        P.resolve(value, "cpu", "auto", tiny_net(), SHAPE, timer=no_timer)
    with pytest.raises(P.PrecisionError, match="auto, true or false"):
        P.check_layout("yes")


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_follows_the_rule_without_a_probe(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    decision = P.resolve("auto", "gpu", "auto", tiny_net(), SHAPE, timer=no_timer)
    assert (decision.precision, decision.channels_last, decision.device, decision.source) == (
        expected, True, "cuda", "rule")
    assert P.resolve("32-true", "gpu", False, tiny_net(), SHAPE, timer=no_timer).precision == "32-true"


def test_a_clearly_slow_candidate_is_measured_for_one_step_only():
    steps = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()

        def forward(self, x, t):
            steps.append(x.shape[0])
            return self.net(x, t)

    first, steady = P.time_candidate(Counting(), (4, 1, 8, 8), P.BF16_CL, fp32_first=1e-9)
    assert first == steady and len(steps) == 1  # its first step alone was >= 3x fp32's first
    steps.clear()
    P.time_candidate(Counting(), (4, 1, 8, 8), P.BF16_CL, fp32_first=None)
    assert 2 <= len(steps) <= 1 + P.PROBE_MAX_STEPS  # one warm-up step, then timed steps


def test_a_real_probe_decides_consistently_with_what_it_measured(tmp_path):
    decision = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, cache_dir=tmp_path)
    assert set(decision.rates) == {"32-true/contiguous", "32-true/channels_last", "bf16-mixed/channels_last"}
    assert all(rate > 0 for rate in decision.rates.values())
    gain = decision.ratio("bf16-mixed")
    assert decision.precision == ("bf16-mixed" if gain >= P.BF16_MIN_GAIN else "32-true")
    assert decision.machine["threads"] == torch.get_num_threads() and decision.machine["torch"] == torch.__version__
    assert decision.probe_seconds is not None


@pytest.mark.slow  # a minute of 2 AVX2 cores: `make test-slow`
def test_the_cli_rejects_an_unknown_precision_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    proc = warm_process.run([sys.executable, "-m", "difflab.cli.train", "trainer.precision=fp8",
                             f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "difflab-train: trainer.precision='fp8' is not a precision difflab knows; allowed: auto, 32-true" \
        in proc.stderr


def test_the_probe_leaves_the_global_random_stream_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "matmul_gain", REAL_MATMUL_GAIN)
    net = tiny_net()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    P.resolve("auto", "cpu", "auto", net, SHAPE, cache_dir=tmp_path)  # matmul check + real probe
    assert torch.equal(torch.get_rng_state(), before)


def test_interleaved_rounds_outvote_a_transient_slowdown_and_drop_a_clearly_slow_candidate():
    calls = []
    steady = {"32-true/contiguous": 100.0, "32-true/channels_last": 110.0, "bf16-mixed/channels_last": 200.0}

    def timer(net, shape, candidate, cond=None, fp32_first=None):
        calls.append(candidate.name)
        rate = steady[candidate.name]
        if len(calls) == 3:  # another process ran while the first round timed bf16
            rate = 120.0
        return shape[0] / rate, shape[0] / rate

    decision = P.resolve("auto", "cpu", "auto", tiny_net(), SHAPE, timer=timer, bf16_check=lambda: 3.0)
    assert decision.precision == "bf16-mixed" and decision.rates["bf16-mixed/channels_last"] == pytest.approx(200.0)
    assert len(calls) == 3 * P.PROBE_ROUNDS
    calls.clear()
    hopeless = {**steady, "bf16-mixed/channels_last": 30.0}  # under half of fp32: one round is enough
    rates = P.probe(tiny_net(), SHAPE, [P.FP32_NCHW, P.FP32_CL, P.BF16_CL], timer=fake_timer(hopeless, calls))
    assert calls.count("bf16-mixed/channels_last") == 1 and calls.count("32-true/contiguous") == P.PROBE_ROUNDS
    assert rates == hopeless
