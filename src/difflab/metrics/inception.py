"""Inception-v3 features for the standard FID / IS protocol, through torch-fidelity.

`InceptionExtractor` wraps torch-fidelity's `FeatureExtractorInceptionV3` (the
TensorFlow-compatible port used by the published FID numbers) and returns the 2048-d
pool features and the 1008 unbiased logits for images in [-1, 1].

The weights (~95 MB) come from `metrics.inception_weights=/path/to/file.pth`, or, when no
path is given, from torch-fidelity's release URL through the torch hub cache. Whenever they
are not available, an `ExtractorUnavailableError` says how to get them. Weights are always
read here with `torch.load(..., weights_only=True)`; torch-fidelity's own loader unpickles
with `weights_only=False` and is never handed a user file.

`make_inception_weights` writes a seeded random state dict of the right architecture, for
tests and for checking a set-up without the real file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

from difflab.metrics.features import ExtractorUnavailableError, Features, full_precision

__all__ = ["ExtractorUnavailableError", "Features", "InceptionExtractor", "make_inception_weights"]

NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"  # pool features: FID, KID, precision / recall
LOGITS_LAYER = "logits_unbiased"  # classifier logits without bias: Inception Score
WEIGHTS_URL: str = fidelity_inception.URL_INCEPTION_V3


class _Inception(fidelity_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with its weight loading moved out of the constructor.

    The parent `__init__` builds the layers, then loads weights from a path (unpickling with
    `weights_only=False`) or from the network. Here it is given an empty in-memory state dict
    and the one `load_state_dict` call it makes is skipped, so the layers keep their random
    initialisation; real weights are loaded afterwards with the ordinary `load_state_dict`.
    """

    _building = True  # class default, read while the parent constructor runs

    def __init__(self) -> None:
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        super().__init__(NAME, [FEATURE_LAYER, LOGITS_LAYER], feature_extractor_weights_path=empty)
        self._building = False

    def load_state_dict(self, state_dict, *args, **kwargs):
        if self._building:
            return None
        return super().load_state_dict(state_dict, *args, **kwargs)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"


def _load_error(error: BaseException) -> str:
    """The informative line of a `torch.load` error. Weights-only unpickling failures start with
    a generic paragraph (suggesting `weights_only=False`); the reason follows its marker."""
    marker = "WeightsUnpickler error:"
    message = str(error)
    if marker in message:
        reason = [line.strip() for line in message.split(marker, 1)[1].splitlines() if line.strip()]
        if reason:
            return f"torch.load(weights_only=True) refused it: {reason[0].split('. ')[0]}"
    return _first_line(error)


# Where to put a downloaded weights file, in every message.
HOW_TO = ("pass metrics.inception_weights=/path/to/file.pth (difflab-evaluate; callbacks.fid.inception_weights "
          "in training), or use the offline extractor=domain.")


def _not_inception(path: Path, detail: str) -> ExtractorUnavailableError:
    return ExtractorUnavailableError(
        f"{path} is not Inception-v3 weights for torch-fidelity ({detail}). Download {WEIGHTS_URL} "
        f"and {HOW_TO}"
    )


def _hub_cache_file() -> Path:
    """Where `torch.hub.load_state_dict_from_url` keeps torch-fidelity's weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(WEIGHTS_URL).path)


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickled objects that are not tensors, ...
        raise _not_inception(path, _load_error(error)) from error
    if not isinstance(state_dict, Mapping):
        raise _not_inception(path, f"it holds a {type(state_dict).__name__}, not a state dict")
    return state_dict


def _download_state_dict() -> Mapping[str, torch.Tensor]:
    """Fetch the weights into the hub cache, as torch-fidelity would, with a clear error offline."""
    try:
        return fidelity_inception.load_state_dict_from_url(
            WEIGHTS_URL, map_location="cpu", progress=True, weights_only=True
        )
    except OSError as error:  # URLError, HTTPError, timeouts, SSL and file-system errors
        raise ExtractorUnavailableError(
            f"Inception-v3 weights are needed for the standard FID protocol, but they could not be "
            f"downloaded ({_first_line(error)}). On a machine with network, download {WEIGHTS_URL} "
            f"and {HOW_TO}"
        ) from error
    except Exception as error:  # downloaded, but torch.load rejected it
        raise _not_inception(_hub_cache_file(), _load_error(error)) from error


def _resolve_state_dict(weights_path: str | os.PathLike | None) -> tuple[Mapping[str, torch.Tensor], Path]:
    """The state dict and the file it came from; no network access when a path is given."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ExtractorUnavailableError(
                f"Inception-v3 weights file {path} does not exist. Download {WEIGHTS_URL} and pass "
                f"{HOW_TO[len('pass '):]}"
            )
        return _read_state_dict(path), path
    cached = _hub_cache_file()
    if cached.is_file():
        return _read_state_dict(cached), cached
    return _download_state_dict(), cached


def _load_into(model: _Inception, state_dict: Mapping[str, torch.Tensor], source: Path) -> None:
    try:
        # strict=False so that missing / unexpected keys can be reported briefly below; shape
        # mismatches still raise. BatchNorm fills in `num_batches_tracked` for old checkpoints.
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise _not_inception(source, details[0] if details else _first_line(error)) from error
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys, e.g. {result.missing_keys[0]!r}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys, e.g. {result.unexpected_keys[0]!r}")
    if problems:
        raise _not_inception(source, "; ".join(problems))


class InceptionExtractor(torch.nn.Module):
    """Inception-v3 pool features [N, 2048] and logits [N, 1008] of images in [-1, 1].

    Images are quantised to uint8 exactly as when saved as PNG, so features of generated
    tensors match features of the same samples read back from disk. Grey images are
    repeated to three channels. torch-fidelity resizes to 299x299 internally.

    Args:
        weights_path: torch-fidelity's Inception-v3 weights (`metrics.inception_weights`).
            None: use the torch hub cache, downloading into it if the file is not there yet.
        device: where the network runs; outputs are always on the CPU.
        batch_size: images per forward pass.

    Raises:
        ExtractorUnavailableError: the weights are missing, cannot be downloaded or are not
            Inception-v3 weights; the message says what to do.
    """

    name: str = NAME  # cache key of reference statistics
    feature_dim: int = 2048
    num_classes: int = 1008

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        state_dict, source = _resolve_state_dict(weights_path)
        model = _Inception()
        _load_into(model, state_dict, source)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.weights_file = source
        self.model = model.to(self.device).eval()

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] floats -> uint8 [0, 255], rounded as when writing a PNG."""
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Features:
        """Features of a [N, 1 or 3, H, W] float batch in [-1, 1]."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected images of shape [N, 1 or 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype}")
        with full_precision():
            return self._extract(images)

    def _extract(self, images: torch.Tensor) -> Features:
        features, logits = [], []
        for chunk in images.split(self.batch_size):
            pixels = self.to_uint8(chunk.detach()).to(self.device)
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, 3, -1, -1)
            pool, unbiased = self.model(pixels)
            features.append(pool.float().cpu())
            logits.append(unbiased.float().cpu())
        if not features:  # N == 0
            return Features(torch.zeros(0, self.feature_dim), torch.zeros(0, self.num_classes))
        return Features(torch.cat(features), torch.cat(logits))


def make_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a seeded, randomly initialised state dict with exactly the keys and shapes that
    torch-fidelity's Inception-v3 expects. Features from it are meaningless; it exercises the
    loading and forward path without the real weights. Returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = _Inception()
        # PyTorch's default initialisation shrinks activations layer by layer (pool features
        # ~1e-8 after 90-odd convolutions); He initialisation keeps them of order one.
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
                torch.nn.init.zeros_(module.bias)
        state_dict = model.state_dict()
    torch.save(state_dict, path)
    return path
