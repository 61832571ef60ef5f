"""difflab-ablate end to end on digits: each variant trains in its own process and is scored
the same way; a failing variant is recorded while the others finish; resume reuses work;
a typo fails before anything trains."""

import csv
import math
import os
import sys

import pytest

from difflab.cli.ablate import mean_rows
from difflab.metrics import report

import warm_process


def _ablate(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return warm_process.run([sys.executable, "-m", "difflab.cli.ablate", 'base=["experiment=digits_tiny"]',
                             'budget=["trainer.max_epochs=1"]', "eval.n=64", "eval.steps=10", "eval.grid_images=16",
                             f"paths.root_dir={cwd}", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # a minute of 2 AVX2 cores: `make test-slow`
def test_ablation_tables_every_variant_keeps_going_after_a_failure_and_resumes(tmp_path):
    work = tmp_path / "ablation"
    # `broken` composes but cannot load its data: it fails inside its own training process.
    first = _ablate("only=[linear,broken,cosine-v]", '+variants.broken=["data=folder","data.path=/nonexistent"]',
                    f"hydra.run.dir={work}", cwd=tmp_path)
    assert first.returncode != 0
    assert "1 of 3 runs failed (broken)" in first.stderr and f"resume={work}" in first.stderr

    rows = _rows(work / "results.csv")
    assert [(r["variant"], r["status"]) for r in rows] == [
        ("linear", "ok"), ("broken", "failed"), ("cosine-v", "ok"), ("real (val) images", "reference")]
    linear, broken, v, real = rows
    assert (linear["schedule"], linear["objective"]) == ("linear", "eps")
    assert (v["schedule"], v["objective"]) == ("cosine", "v")
    for row in (linear, v):
        assert math.isfinite(float(row["fid"])) and math.isfinite(float(row["val/loss"]))
        assert float(row["fid"]) > float(real["fid"])  # one epoch is far from the real images' floor
    assert "/nonexistent" in broken["error"]
    assert linear["fid"] != v["fid"]
    for name in ("linear-s42", "cosine-v-s42"):
        run = work / "runs" / name
        assert (run / "checkpoints" / "ema.pt").is_file() and (run / "eval" / "samples" / "ddim_10.png").is_file()
        assert (run / "train.log").is_file() and (run / "result.json").is_file()
    assert (work / "runs" / "broken-s42" / "stdout.log").is_file()
    table = (work / "results.md").read_text()
    assert "| linear | 42 | linear | eps | ok |" in table and "| broken | 42 |" in table
    assert (work / "ablation.png").stat().st_size > 10_000

    # Resume without the broken variant: nothing is trained or sampled again, the numbers stay.
    again = _ablate("only=[linear,cosine-v]", f"resume={work}", f"hydra.run.dir={tmp_path / 'resume-log'}",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("trained already") == 2 and log.count("evaluated already") == 2
    assert [(r["variant"], r["fid"]) for r in _rows(work / "results.csv")][:2] == [
        ("linear", linear["fid"]), ("cosine-v", v["fid"])]


def test_a_typo_in_any_variant_stops_before_training(tmp_path):
    proc = _ablate("only=[linear,typo]", '+variants.typo=["schedule=cosin"]', f"hydra.run.dir={tmp_path / 'a'}",
                   cwd=tmp_path)
    assert proc.returncode != 0
    assert "variant typo" in proc.stderr and "cosin" in proc.stderr
    assert not (tmp_path / "a" / "runs").exists()  # not even the first variant started


@pytest.mark.parametrize("change,message", [
    ({"only": ["nope"]}, "only="), ({"seeds": [1, 1]}, "seeds="), ({"variants": {"a/b": []}}, "variants="),
    ({"base": ["seed=3"]}, "no seed="), ({"eval": {"n": 2}}, "eval.n="),
])
def test_ablate_config_errors_name_the_key(change, message):
    from omegaconf import OmegaConf

    from difflab.cli.schema import AblateConfig, ConfigError

    paths = dict.fromkeys(("root_dir", "data_dir", "log_dir", "cache_dir", "output_dir"), ".")
    cfg = OmegaConf.merge(OmegaConf.structured(AblateConfig),
                          {"paths": paths, "variants": {"linear": ["schedule=linear"]}}, change)
    with pytest.raises(ConfigError, match=message):
        OmegaConf.to_object(cfg).validate()


def test_mean_rows_average_over_seeds_and_skip_failures():
    rows = [{"variant": "a", "seed": 1, "status": "ok", "fid": 2.0, "val/loss": 0.5},
            {"variant": "a", "seed": 2, "status": "ok", "fid": 4.0, "val/loss": 0.7},
            {"variant": "a", "seed": 3, "status": "failed"},
            {"variant": "b", "seed": 1, "status": "failed"}]
    (a,) = mean_rows(rows)
    assert a["seeds"] == 2 and a["fid"] == pytest.approx(3.0) and a["fid std"] == pytest.approx(math.sqrt(2))
    assert a["val/loss"] == pytest.approx(0.6)


def test_plot_bars_draws_present_metrics_only(tmp_path):
    rows = [{"variant": "a", "fid": 3.0}, {"variant": "a", "fid": 5.0}, {"variant": "b", "fid": float("nan")}]
    assert report.plot_bars(rows, tmp_path / "p.png", "variant", ("fid", "kid"), baseline={"fid": 1.0}).is_file()
    assert report.plot_bars(rows, tmp_path / "q.png", "variant", ("kid",)) is None


def test_results_md_adds_a_mean_table_for_several_seeds(tmp_path):
    from omegaconf import OmegaConf

    from difflab.cli.ablate import write_outputs

    cfg = OmegaConf.create({"budget": ["trainer.max_epochs=1"], "base": [], "seeds": [1, 2],
                            "eval": {"n": 8, "sampler": "ddim", "steps": 5, "metrics": {"extractor": "domain",
                                                                                       "ref_split": "train"}}})
    rows = [{"variant": "a", "seed": 1, "status": "ok", "schedule": "cosine", "objective": "eps", "fid": 2.0},
            {"variant": "a", "seed": 2, "status": "ok", "schedule": "cosine", "objective": "eps", "fid": 4.0}]
    write_outputs(cfg, tmp_path, rows, {"sampler": "real (val)", "fid": 0.5})
    text = (tmp_path / "results.md").read_text()
    assert "| a | 2 | cosine | eps | - | 3 ± 1.4 |" in text
    assert [r["variant"] for r in _rows(tmp_path / "results.csv")] == ["a", "a", "real (val) images"]
