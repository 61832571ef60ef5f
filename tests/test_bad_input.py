"""The bad-input matrix (`bad_input_cases.CASES`, README "Bad input"): each case is a real command
line in its own process. It must exit non-zero with one message of difflab's that holds the
case's words, print no traceback and no Hydra report, and leave the earlier run and the cache as
they were."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from bad_input_cases import CASES, build_world, command
import warm_process


def _state(paths: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """Every file of the earlier run and the cache: its mtime and content hash."""
    files = [p for root in (paths["earlier"], paths["cache"]) for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    paths = build_world(root)
    trained = warm_process.run([sys.executable, "-m", "difflab.cli.train", "experiment=digits_tiny",
                                "trainer.max_epochs=1", "callbacks=minimal", f"hydra.run.dir={paths['earlier']}",
                                f"paths.root_dir={root}"], cwd=root, capture_output=True, text=True, timeout=300,
                               env=command(CASES[0], paths)[1])
    assert trained.returncode == 0, trained.stderr[-3000:]
    (paths["cache"] / "reference-features.pt").write_bytes(b"a cache entry an earlier run wrote")
    return paths


def test_the_matrix_covers_every_cli_and_at_least_30_cases():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)
    assert {case.cli for case in CASES} == {"train", "sample", "evaluate", "export", "ema_sweep", "ablate"}


# One or more cases of each CLI and kind of input in the default suite (each case is a process:
# about 11 s on a 2-core AVX2 CPU); the whole matrix with `make test-slow` / `make test-all`.
QUICK = {"folder-missing", "folder-corrupt-image", "unknown-dataset", "download-offline", "unknown-key",
         "out-of-range", "unknown-precision", "unwritable-run-dir", "resume-other-model", "sample-missing-ckpt",
         "sample-pickled-object", "evaluate-unknown-sampler", "export-garbage", "ema-sweep-empty-dir",
         "ablate-unknown-variant"}


def test_the_quick_cases_are_cases_of_every_cli():
    assert QUICK <= {case.id for case in CASES}
    assert {case.cli for case in CASES if case.id in QUICK} == {case.cli for case in CASES}


@pytest.mark.parametrize("case", [case if case.id in QUICK else pytest.param(case, marks=pytest.mark.slow)
                                  for case in CASES], ids=[case.id for case in CASES])
def test_bad_input_is_one_clear_message_and_touches_nothing(world, case):
    before = _state(world)
    cmd, env = command(case, world)
    proc = warm_process.run(cmd, cwd=world["earlier"].parents[3], env=env, capture_output=True, text=True,
                            timeout=300)
    expect = case.expect.format(**{name: str(path) for name, path in world.items()})
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-3000:]
    # The message is the last paragraph on stderr, from difflab and naming what is wrong.
    message = proc.stderr.strip().split("\n\n")[-1]
    first = next(line for line in message.splitlines() if line.startswith("difflab"))
    assert first.startswith(("difflab-", "difflab:")), message
    assert expect in message, message
    after = _state(world)
    assert {path: after.get(path) for path in before} == before  # new files (a precision probe's cache) may appear
