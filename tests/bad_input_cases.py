"""The bad-input matrix: every CLI and config group given what a user gets wrong, each case the
command line, the words its one-paragraph message must hold, and the world it runs in (an
earlier run, a cache, damaged files). `test_bad_input.py` runs them; README "Bad input" tables them."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY = ("experiment=digits_tiny", "trainer.max_epochs=1", "callbacks=minimal")


@dataclass(frozen=True)
class Case:
    id: str          # what is wrong
    cli: str         # difflab.cli.<cli>
    args: tuple      # the command line; {name} is a path of the world
    expect: str      # words the message must hold
    env: tuple = ()  # extra environment, (name, value) pairs


CASES = [
    # data
    Case("folder-missing", "train", (*TINY, "data=folder", "data.path={missing}", "data.image_size=8",
                                     "data.channels=1"), "does not exist or is not a directory"),
    Case("folder-empty", "train", (*TINY, "data=folder", "data.path={empty}", "data.image_size=8", "data.channels=1"),
         "contains no images"),
    Case("folder-no-path", "train", (*TINY, "data=folder"), "needs data.path"),
    Case("folder-corrupt-image", "train", (*TINY, "data=folder", "data.path={corrupt}", "data.image_size=8",
                                           "data.channels=1"), "cannot read image"),
    Case("folder-mixed-layout", "train", (*TINY, "data=folder", "data.path={mixed}", "data.image_size=8",
                                          "data.channels=1"), "mixes 1 top-level images with class subfolders"),
    Case("folder-nan-pixels", "train", (*TINY, "data=folder", "data.path={nan}", "data.image_size=8",
                                        "data.channels=1"), "NaN or infinite pixels"),
    Case("folder-out-of-range-pixels", "train", (*TINY, "data=folder", "data.path={range}", "data.image_size=8",
                                                 "data.channels=1"), "outside 0-1, 0-255 and 0-65535"),
    Case("folder-channels-2", "train", (*TINY, "data=folder", "data.path={rgb}", "data.image_size=8",
                                        "data.channels=2"), "data.channels"),
    Case("unknown-dataset", "train", (*TINY, "data=mnistt"), "data=mnistt is not an option of the data group"),
    Case("download-offline", "train", (*TINY, "data=cifar10", "data.data_dir={empty}/cifar"),
         "or train offline with data=mnist5k"),
    # config
    Case("unknown-group-option", "train", (*TINY, "schedule=cosin"), "did you mean schedule=cosine?"),
    Case("unknown-key", "train", (*TINY, "trainer.max_epoch=3"), "did you mean trainer.max_epochs?"),
    Case("unknown-top-level-key", "train", (*TINY, "sead=3"), "did you mean seed?"),
    Case("wrong-type", "train", (*TINY, "optim.lr=fast"), "optim.lr: Value 'fast'"),
    Case("bad-override-syntax", "train", (*TINY, "model.channel_mults=[1,2"), "could not be parsed"),
    Case("out-of-range", "train", (*TINY, "sampler=ddim", "sampler.eta=1.5"), "sampler.eta"),
    Case("negative-lr", "train", (*TINY, "optim.lr=-1"), "optim.lr=-1.0 is not allowed"),
    Case("unknown-precision", "train", (*TINY, "trainer.precision=fp8"), "trainer.precision='fp8'"),
    Case("velocity-off-flow", "train", (*TINY, "schedule=cosine", "objective=velocity"), "needs schedule=flow"),
    Case("resume-typo", "train", (*TINY, "resume=yes"), "resume='yes' is not allowed"),
    Case("ect-without-init", "train", (*TINY, "experiment=mnist5k_ect"), "init_from"),
    Case("unwritable-run-dir", "train", (*TINY, "hydra.run.dir={afile}/run"), "cannot write the run directory"),
    # checkpoints
    Case("resume-garbage", "train", (*TINY, "ckpt_path={garbage}"), "could not read"),
    Case("resume-other-model", "train", (*TINY, "model.base_channels=32", "ckpt_path={last}"),
         "model.base_channels: checkpoint 16, now 32"),
    Case("init-from-autoencoder", "train", (*TINY, "init_from={autoencoder}"), "autoencoder"),
    Case("sample-missing-ckpt", "sample", ("ckpt={missing}",), "does not exist"),
    Case("sample-no-ckpt", "sample", (), "ckpt"),
    Case("sample-pickled-object", "sample", ("ckpt={pickled}",), "a safe load refuses"),
    Case("sample-autoencoder-ckpt", "sample", ("ckpt={autoencoder}",), "autoencoder"),
    Case("sample-class-on-unconditional", "sample", ("ckpt={ema}", "class_label=3"), "unconditional"),
    Case("sample-superres-wrong-size", "sample", ("ckpt={ema}", "mode=superres", "factor=2", "input={wrong_png}"),
         "the input images are 5x5 but this model makes 8x8"),
    Case("sample-unknown-mask", "sample", ("ckpt={ema}", "mode=inpaint", "mask=centre"), "unknown mask 'centre'"),
    Case("evaluate-unknown-sampler", "evaluate", ("ckpt={ema}", "samplers=[ddimm]"),
         "did you mean sampler=ddim?"),
    Case("evaluate-missing-inception-weights", "evaluate", ("ckpt={ema}", "metrics.extractor=inception",
                                                           "metrics.inception_weights={missing}"), "{missing} does not exist"),
    Case("export-garbage", "export", ("ckpt={garbage}",), "could not read"),
    Case("export-no-ckpt", "export", (), "ckpt"),
    Case("ema-sweep-empty-dir", "ema_sweep", ("ckpt_dir={empty}",), "{empty}"),
    Case("ablate-unknown-variant", "ablate", ("only=[nope]",), "nope"),
    # optional extras
    Case("text-extra-missing", "train", ("experiment=mnist5k_text", "text_encoder=wordllama", "first_stage=identity",
                                         "model=unet_tiny", "data=digits", "trainer.max_epochs=1", "callbacks=minimal"),
         "pip install -e '.[text]'", env=(("DIFFLAB_BLOCK", "wordllama"),)),
    Case("wandb-extra-missing", "train", (*TINY, "logger=wandb"), "pip install -e '.[wandb]'",
         env=(("DIFFLAB_BLOCK", "wandb"),)),
]


def build_world(root: Path) -> dict[str, Path]:
    """The files the cases point at; the earlier run is trained by the caller (`earlier`)."""
    paths = {name: root / name for name in ("empty", "corrupt", "mixed", "nan", "range", "rgb", "block")}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(digit).save(paths["corrupt"] / "good.png")
    (paths["corrupt"] / "bad.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(digit).save(paths["mixed"] / "top.png")
    (paths["mixed"] / "sub").mkdir(exist_ok=True)
    Image.fromarray(digit).save(paths["mixed"] / "sub" / "inner.png")
    nan = np.zeros((8, 8), dtype=np.float32)
    nan[1, 1] = np.nan
    Image.fromarray(nan, mode="F").save(paths["nan"] / "nan.tif")
    Image.fromarray(np.full((8, 8), 1e6, dtype=np.float32), mode="F").save(paths["range"] / "big.tif")
    Image.fromarray(np.stack([digit] * 3, axis=-1)).save(paths["rgb"] / "rgb.png")
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(root / "wrong.png")
    (root / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 64)
    torch.save({"model": os.PathLike}, root / "pickled.pt")  # a class: a safe load refuses it
    torch.save({"format": "difflab.autoencoder/1", "run_config": {}, "state_dict": {}}, root / "autoencoder.pt")
    (root / "afile").write_text("a file where a folder should be")
    # An optional extra that is not installed: a module of that name on the path that fails to import.
    for name in ("wordllama", "wandb"):
        (paths["block"] / f"{name}.py").write_text(f'raise ModuleNotFoundError("No module named {name!r}")\n')
    earlier = root / "outputs" / "train" / "runs" / "earlier"
    return {**paths, "missing": root / "no-such-thing", "wrong_png": root / "wrong.png",
            "garbage": root / "garbage.pt", "pickled": root / "pickled.pt", "autoencoder": root / "autoencoder.pt",
            "afile": root / "afile", "earlier": earlier, "ema": earlier / "checkpoints" / "ema.pt",
            "last": earlier / "checkpoints" / "last.ckpt", "cache": root / "cache"}


def command(case: Case, paths: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """The case's command line (paths filled in, runs under the world's outputs/) and environment."""
    names = {name: str(path) for name, path in paths.items()}
    args = [arg.format(**names) for arg in case.args]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["DIFFLAB_CACHE"] = names["cache"]
    env["OMP_NUM_THREADS"] = "1"
    for key, value in case.env:
        if key == "DIFFLAB_BLOCK":  # shadow the installed module with one that fails to import
            env["PYTHONPATH"] = os.pathsep.join([names["block"], env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        else:
            env[key] = value
    root = paths["earlier"].parents[3]
    return [sys.executable, "-m", f"difflab.cli.{case.cli}", *args, f"paths.root_dir={root}"], env
