"""Hyperparameter search and launchers: the configs compose, the plugins load, a real
two-trial Optuna sweep runs, and a metric the run never logs stops the run loudly."""

import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

from difflab.cli import _hydra

import warm_process

_hydra.setup()
CONF = Path(_hydra.config_dir())
FIXED = ["paths.output_dir=/tmp/difflab-test-run"]  # ${hydra:...} is only set inside a real run


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*FIXED, *overrides], return_hydra_config=True)


def _run(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return warm_process.run([sys.executable, "-m", "difflab.cli.train", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)


def test_default_has_no_search_and_reports_val_loss():
    cfg = _compose([])
    assert cfg.optimized_metric == "val/loss"
    assert cfg.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert cfg.hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def test_optuna_search_composes_and_its_params_parse():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    cfg = _compose(["hparams_search=mnist5k_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.direction == "minimize" and sweeper.n_trials == 20 and sweeper.n_jobs == 1
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert get_class(sweeper.sampler._target_).__name__ == "TPESampler"
    assert cfg.optimized_metric == "val/loss"

    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    dists = {o.get_key_element(): create_optuna_distribution_from_override(o) for o in overrides}
    assert set(dists) == {"optim.lr", "density", "weighting"}
    lr = dists["optim.lr"]
    assert type(lr).__name__ == "LogUniformDistribution" and (lr.low, lr.high) == (5e-4, 5e-3)
    assert list(dists["density"].choices) == ["logit_normal", "uniform", "lognormal"]
    assert list(dists["weighting"].choices) == ["simplified", "min_snr", "soft_min_snr"]
    # Every sampled value is a valid option of the train config, and builds on the default path.
    for density in dists["density"].choices:
        for weighting in dists["weighting"].choices:
            cfg = _compose([f"density={density}", f"weighting={weighting}", "optim.lr=1e-3"])
            instantiate(cfg.density), instantiate(cfg.weighting)


@pytest.mark.parametrize("launcher,target", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_composes_and_its_class_imports(launcher, target):
    cfg = _compose([f"launcher={launcher}"])
    assert cfg.hydra.launcher._target_ == target
    assert get_class(target).__name__ == target.rsplit(".", 1)[1]
    if launcher == "joblib":
        assert cfg.hydra.launcher.n_jobs == 2
    else:
        knobs = {"partition", "timeout_min", "gpus_per_node", "tasks_per_node", "nodes", "cpus_per_task",
                 "mem_gb", "array_parallelism", "additional_parameters"}
        assert knobs <= set(cfg.hydra.launcher)


def test_search_and_launcher_combine():
    cfg = _compose(["hparams_search=mnist5k_optuna", "launcher=joblib"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")


def test_two_trial_optuna_sweep_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _run("-m", "hparams_search=mnist5k_optuna", "experiment=digits_tiny", "trainer.max_epochs=1",
                "hydra.sweeper.n_trials=2", "callbacks=minimal", "callbacks.progress_bar=null",
                f"hydra.sweep.dir={sweep_dir}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert isinstance(results["best_value"], float) and math.isfinite(results["best_value"])
    assert {"optim.lr", "density", "weighting"} <= set(results["best_params"])
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
    assert [p.name for p in jobs] == ["0", "1"]


@pytest.mark.slow  # a minute of 2 AVX2 cores: `make test-slow`
def test_unlogged_optimized_metric_fails_an_optimising_sweep_and_warns_otherwise(tmp_path):
    common = ("optimized_metric=nope", "experiment=digits_tiny", "trainer.max_epochs=1", "callbacks=minimal",
              "callbacks.progress_bar=null", f"paths.root_dir={tmp_path}")
    search = _run("-m", "hparams_search=mnist5k_optuna", "hydra.sweeper.n_trials=1", *common,
                  f"hydra.sweep.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert search.returncode != 0  # Optuna must never be handed None
    assert "optimized_metric='nope'" in search.stderr
    assert "val/loss" in search.stderr.split("available metrics:", 1)[1]
    result = json.loads((tmp_path / "o" / "0" / "result.json").read_text())
    assert result["status"] == "failed" and "optimized_metric='nope'" in result["error"]
    assert (tmp_path / "o" / "0" / "checkpoints" / "last.ckpt").is_file()  # its outputs stay
    # A plain sweep optimises nothing: every job runs and keeps its results, with a warning.
    sweep = _run("-m", *common, "schedule=linear", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "optimized_metric='nope' was not logged" in sweep.stdout + sweep.stderr
    assert json.loads((tmp_path / "s" / "0" / "result.json").read_text())["status"] == "ok"
    single = _run(*common, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]  # the run's outputs stand; only a warning
    assert "optimized_metric='nope' was not logged" in single.stdout + single.stderr


def test_a_short_sweep_runs_every_job(tmp_path):
    """The command a new user tries: 1 epoch, validation every 5, the default callbacks."""
    env_cwd = tmp_path  # outputs/ lands here (paths.root_dir defaults to the working directory)
    proc = _run("-m", "data=digits", "trainer.max_epochs=1", "schedule=linear,cosine,sigmoid", cwd=env_cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweeps = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    for job in ("0", "1", "2"):
        result = json.loads((sweeps[0] / job / "result.json").read_text())
        assert result["status"] == "ok", result
        assert "val/loss" in result["metrics"] and "eval/fid" in result["metrics"]
        assert result["steps"] == result["planned_steps"] == 25
    summary = (sweeps[0] / "summary.md").read_text()
    assert "3 jobs" in summary and "3 ok" in summary and "25/25" in summary


def test_a_failing_multirun_job_is_reported_and_the_others_keep_their_results(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _run("-m", "experiment=digits_tiny", "trainer.max_epochs=1", "callbacks=minimal",
                "callbacks.progress_bar=null", "optim.lr=-1,0.002", f"hydra.sweep.dir={sweep_dir}",
                f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0  # the sweep as a whole reports the failure
    assert "optim.lr=-1.0 is not allowed" in proc.stderr
    assert not (sweep_dir / "0" / "checkpoints").exists()  # job 0 failed before training
    assert (sweep_dir / "1" / "checkpoints" / "last.ckpt").is_file()  # job 1 still ran to the end
    assert (sweep_dir / "1" / "csv" / "metrics.csv").is_file()
    # Every job left its outcome, and the sweep's summary (written by the Hydra callback
    # after each job, as Hydra skips on_multirun_end once a job failed) lists both.
    failed = json.loads((sweep_dir / "0" / "result.json").read_text())
    assert failed["status"] == "failed" and "optim.lr=-1.0" in failed["error"] and failed["metrics"] == {}
    ok = json.loads((sweep_dir / "1" / "result.json").read_text())
    assert ok["status"] == "ok" and "optim.lr=0.002" in ok["overrides"] and math.isfinite(ok["metrics"]["val/loss"])
    with open(sweep_dir / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["optim.lr"], r["status"]) for r in rows] == [("0", "-1", "failed"), ("1", "0.002", "ok")]
    assert float(rows[1]["val/loss"]) == pytest.approx(ok["metrics"]["val/loss"])
    summary = (sweep_dir / "summary.md").read_text()
    assert "2 jobs" in summary and "1 failed, 1 ok" in summary and "| optim.lr |" in summary


def test_a_restarted_sweep_skips_the_jobs_that_finished(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "experiment=digits_tiny", "trainer.max_epochs=1", "callbacks=minimal", "callbacks.progress_bar=null",
            "resume=auto", f"hydra.sweep.dir={sweep_dir}", f"paths.root_dir={tmp_path}"]
    first = _run(*args, "optim.lr=0.002,0.001", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(sweep_dir / "1")  # the sweep was stopped before its second job ran
    kept = {path: path.stat().st_mtime_ns for path in (sweep_dir / "0").rglob("*") if path.is_file()
            and path.suffix != ".log" and ".hydra" not in path.parts}  # Hydra rewrites its own record of the job
    again = _run(*args, "optim.lr=0.002,0.001", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished already (result.json: ok); not trained again" in (sweep_dir / "0" / "train.log").read_text()
    assert [path for path, mtime in kept.items() if path.stat().st_mtime_ns != mtime] == []  # job 0 untouched
    assert json.loads((sweep_dir / "1" / "result.json").read_text())["status"] == "ok"
    rows = list(csv.DictReader((sweep_dir / "summary.csv").read_text().splitlines()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]

    # Another sweep pointed at the same directory: job 0 holds other overrides and is refused, unchanged.
    other = _run(*args, "optim.lr=0.003,0.001", cwd=tmp_path)
    assert other.returncode != 0 and "holds a finished run of other overrides" in other.stderr
    assert [path for path, mtime in kept.items() if path.stat().st_mtime_ns != mtime] == []


def _job(sweep, name, overrides, result=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if result is not None:
        (job / "result.json").write_text(json.dumps({"overrides": overrides, **result}))


def test_collect_tables_every_job_sorted_with_the_missing_and_failed_ones(tmp_path, capsys):
    from difflab.cli import collect

    _job(tmp_path, "0", ["schedule=linear", "seed=1"], {"status": "ok", "seconds": 9.0,
                                                        "metrics": {"val/loss": 0.5, "lr-AdamW": 1e-3}})
    _job(tmp_path, "1", ["schedule=cosine", "seed=1"], {"status": "ok", "seconds": 8.0,
                                                        "metrics": {"val/loss": 0.25, "lr-AdamW": 2e-3}})
    _job(tmp_path, "2", ["schedule=sigmoid", "seed=1"], {"status": "failed", "seconds": 1.0, "metrics": {},
                                                         "error": "RuntimeError: boom\ntraceback"})
    _job(tmp_path, "10", ["schedule=bogus", "seed=1"])  # killed: no result.json
    (tmp_path / "notajob").mkdir()
    collect.main([str(tmp_path), "--sort", "val/loss"])
    printed = capsys.readouterr().out
    with open(tmp_path / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["schedule"], r["status"]) for r in rows] == [
        ("1", "cosine", "ok"), ("0", "linear", "ok"), ("2", "sigmoid", "failed"), ("10", "bogus", "missing")]
    assert rows[2]["error"] == "RuntimeError: boom"
    header, table = (tmp_path / "summary.md").read_text().split("\n\n", 1)
    assert "4 jobs" in header and "2 ok, 1 failed, 1 missing" in header
    # Columns: the override that varies (not seed), status, time, val/ and eval/ metrics, errors.
    assert table.splitlines()[0] == "| job | schedule | status | seconds | val/loss | error |"
    assert table in printed


def test_collect_without_jobs_says_so(tmp_path):
    from difflab.cli import collect

    with pytest.raises(SystemExit, match="holds no job directories"):
        collect.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no sweep directory"):
        collect.main([str(tmp_path / "nope")])
