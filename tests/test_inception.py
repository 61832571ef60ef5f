"""Inception-v3 extractor: loading seeded random weights, features of grey and RGB images,
and the errors for missing, undownloadable and wrong weights. Never touches the network:
every test that could download replaces torch-fidelity's download function."""

from __future__ import annotations

import shutil
from urllib.error import URLError

import pytest
import torch
from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

from difflab.metrics.features import ExtractorUnavailableError, Features
from difflab.metrics.inception import WEIGHTS_URL, InceptionExtractor, make_inception_weights

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG_KEY = "metrics.inception_weights"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth")


@pytest.fixture(scope="module")
def extractor(weights):
    return InceptionExtractor(weights, batch_size=2)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub directory under tmp_path, and no real downloads."""
    hub_dir = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    return hub_dir


def images(n: int, channels: int, seed: int, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=generator) * 2 - 1


def check(out: Features, n: int) -> None:
    assert isinstance(out, Features)
    assert out.features.shape == (n, 2048) and out.logits.shape == (n, 1008)
    for tensor in out:
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert torch.isfinite(tensor).all()


def test_attributes(extractor):
    assert extractor.name == "inception-v3-compat"
    assert extractor.feature_dim == 2048


def test_rgb_features_deterministic_and_image_dependent(extractor):
    a, b = images(2, 3, seed=0)
    out = extractor(torch.stack([a, b, a]))  # batch_size 2: two chunks
    check(out, 3)
    assert torch.equal(out.features[0], out.features[2])
    assert not torch.allclose(out.features[0], out.features[1])
    again = extractor(a[None])
    torch.testing.assert_close(again.features[0], out.features[0])
    torch.testing.assert_close(again.logits[0], out.logits[0])


def test_grey_is_repeated_to_rgb(extractor):
    grey = images(2, 1, seed=1, size=28)
    out = extractor(grey)
    check(out, 2)
    assert not torch.allclose(out.features[0], out.features[1])
    torch.testing.assert_close(extractor(grey.expand(-1, 3, -1, -1)).features, out.features)


def test_quantised_like_png(extractor):
    x = torch.tensor([-2.0, -1.0, -0.001, 0.0, 0.5, 1.0, 3.0])
    assert extractor.to_uint8(x).tolist() == [0, 0, 127, 128, 191, 255, 255]


def test_rejects_bad_shapes(extractor):
    with pytest.raises(ValueError, match="1 or 3"):
        extractor(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="float"):
        extractor(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_missing_weights_path(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted although weights_path was given")

    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", no_network)
    missing = tmp_path / "nope.pth"
    with pytest.raises(ExtractorUnavailableError, match=CONFIG_KEY) as error:
        InceptionExtractor(missing)
    assert str(missing) in str(error.value)


def test_no_network_and_empty_cache(hub, monkeypatch):
    def offline(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", offline)
    with pytest.raises(ExtractorUnavailableError) as error:
        InceptionExtractor()
    message = str(error.value)
    assert WEIGHTS_URL == fidelity_inception.URL_INCEPTION_V3
    assert WEIGHTS_URL in message and CONFIG_KEY in message and "extractor=domain" in message
    assert "name resolution" in message  # the cause


def test_weights_found_in_hub_cache(hub, weights, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("downloaded although the weights were in the hub cache")

    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", no_network)
    cached = hub / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights)
    assert InceptionExtractor().weights_file == cached


def test_checkpoint_without_batchnorm_counters_loads(tmp_path, weights):
    """Older checkpoints have no `num_batches_tracked`; torch-fidelity's loader accepts them."""
    state_dict = {k: v for k, v in torch.load(weights, weights_only=True).items() if "num_batches" not in k}
    torch.save(state_dict, tmp_path / "old.pth")
    InceptionExtractor(tmp_path / "old.pth")


def test_corrupt_file(tmp_path, weights):
    corrupt = tmp_path / "corrupt.pth"
    with open(weights, "rb") as source, open(corrupt, "wb") as target:
        shutil.copyfileobj(source, target, length=1 << 16)
        target.truncate(1 << 20)  # cut off: no zip central directory
    with pytest.raises(ExtractorUnavailableError, match="not Inception-v3 weights"):
        InceptionExtractor(corrupt)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ExtractorUnavailableError, match="not Inception-v3 weights"):
        InceptionExtractor(tmp_path / "text.pth")


@pytest.mark.parametrize(
    "state_dict, detail",
    [
        (torch.nn.Linear(4, 2).state_dict(), "missing keys"),
        ({"fc.weight": torch.zeros(10, 2048)}, "size mismatch"),
        ([torch.zeros(3)], "not a state dict"),
        (torch.nn.Linear(4, 2), "weights_only=True"),  # a pickled module is never unpickled
    ],
    ids=["other-model", "wrong-shape", "not-a-dict", "pickled-module"],
)
def test_wrong_weights(tmp_path, state_dict, detail):
    path = tmp_path / "other.pth"
    torch.save(state_dict, path)
    with pytest.raises(ExtractorUnavailableError, match="not Inception-v3 weights") as error:
        InceptionExtractor(path)
    assert detail in str(error.value)


def test_make_weights_is_seeded(tmp_path):
    rng_before = torch.random.get_rng_state()
    a = torch.load(make_inception_weights(tmp_path / "a.pth", seed=3), weights_only=True)
    b = torch.load(make_inception_weights(tmp_path / "b.pth", seed=3), weights_only=True)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
