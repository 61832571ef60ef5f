"""Sample-quality metrics: scores against independent float64 references, the offline domain
extractor (trained, seeded, cached) and cached reference features of real data."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

import difflab.metrics.domain as domain
from difflab.data.datamodule import ImageDataModule
from difflab.metrics.domain import DomainClassifierConfig, domain_extractor
from difflab.metrics.features import ExtractorUnavailableError, Features
from difflab.metrics.reference import reference_features
from difflab.metrics.scores import (
    class_accuracy,
    class_coverage,
    class_entropy,
    fid,
    fid_statistics,
    inception_score,
    kid,
    precision_recall,
    score_samples,
)


@pytest.fixture(scope="module")
def one_blas_thread():
    """KID's kernel matrices go through numpy's OpenBLAS, whose threads make it ~30x slower
    on 2 busy shared cores; one thread, like `one_thread` does for torch."""
    with threadpool_limits(limits=1):
        yield


pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")

# 100 steps reach ~0.97 validation accuracy on digits in ~3 s (the default 200 take twice as
# long for the same accuracy); tests about caching and seeding use TINY, accuracy irrelevant.
DIGITS_CONFIG = DomainClassifierConfig(steps=100)
TINY = DomainClassifierConfig(steps=20)


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def correlated(n, d, seed, shift=0.0):
    """Gaussian features with a random non-isotropic covariance and a random mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    return torch.randn(n, d, generator=g) @ mix + torch.randn(d, generator=g) * 0.5 + shift


# --------------------------------------------------------------------------------------
# Independent float64 references
# --------------------------------------------------------------------------------------


def np_fid(x, y):
    """Frechet distance with scipy's matrix square root (torch-fidelity uses eigenvalues)."""
    x, y = x.double().numpy(), y.double().numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def cubic_kernel(a, b):
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def np_mmd2(x, y, biased=False):
    """MMD^2 with the cubic kernel: the unbiased U-statistic (diagonals of K_xx, K_yy dropped)
    or, with `biased`, the V-statistic ||mean embedding difference||^2 (always >= 0)."""
    kxx, kyy, kxy = cubic_kernel(x, x), cubic_kernel(y, y), cubic_kernel(x, y)
    m = x.shape[0]
    if biased:
        return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def np_kid(fake, real, subsets, size, seed):
    """KID over the same random subsets torch-fidelity draws: fake first, then real, from one
    RandomState(seed)."""
    fake, real = fake.double().numpy(), real.double().numpy()
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        f = fake[rng.choice(len(fake), size, replace=False)]
        r = real[rng.choice(len(real), size, replace=False)]
        values.append(np_mmd2(f, r))
    return float(np.mean(values)), float(np.std(values))


def np_inception_score(logits):
    """exp E_x[KL(p(y|x) || p(y))] over one split."""
    logits = logits.double().numpy()
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(0))
    return float(np.exp((p * (log_p - log_marginal)).sum(1).mean()))


def trace_scale(x, y):
    return float(np.trace(np.cov(x.double().numpy(), rowvar=False)) + np.trace(np.cov(y.double().numpy(),
                                                                                       rowvar=False)))


# --------------------------------------------------------------------------------------
# FID / KID
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(500, 16), (20, 32)])  # full-rank and rank-deficient covariance
def test_fid_of_a_set_against_itself_is_zero(n, d):
    x = correlated(n, d, seed=n)
    # FID is a difference of O(trace) terms: 1e-6 of the trace scale is far above float64
    # round-off (measured ~1e-14 full rank, ~5e-9 with 12 zero eigenvalues, where the square
    # roots of round-off-sized eigenvalues of S^2 add up) and far below any real distance.
    assert abs(fid(x, x)) < 1e-6 * trace_scale(x, x)


def test_fid_matches_scipy_sqrtm_reference():
    # Different sizes, means and covariances; one pair nearly equal, one far apart.
    pairs = [(correlated(400, 12, 1), correlated(300, 12, 2)),
             (correlated(400, 12, 3), correlated(350, 12, 3, shift=0.05) * 1.01),
             (gaussian(200, 8, 4), gaussian(260, 8, 5, shift=2.0, scale=3.0))]
    for x, y in pairs:
        expected = np_fid(x, y)
        # Eigenvalue vs sqrtm route in float64: both exact to ~1e-13 of the trace scale;
        # 1e-6 of it (relative and absolute) is generous yet catches any formula slip
        # (e.g. a missing factor 2, a biased covariance: N=200 gives a 0.5% change).
        assert abs(fid(x, y) - expected) <= 1e-6 * trace_scale(x, y)
        assert fid(x, y) == pytest.approx(expected, rel=1e-6)
        assert fid(x, y) == pytest.approx(fid(y, x), rel=1e-9)  # symmetric
    assert expected > 50  # the far pair is far: the references are not all ~0


def test_fid_statistics_are_float64_mean_and_unbiased_covariance():
    x = correlated(50, 6, 7)
    stats = fid_statistics(x)
    assert stats["mu"].dtype == np.float64 and stats["sigma"].dtype == np.float64
    np.testing.assert_allclose(stats["mu"], x.double().mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(x.double().numpy(), rowvar=False, ddof=1), rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(ValueError):
        fid_statistics(x[:1])
    with pytest.raises(ValueError):
        fid_statistics(x[0])


def test_kid_matches_numpy_reference_on_full_sets():
    fake, real = correlated(150, 16, 11, shift=0.2), correlated(150, 16, 12)
    mean, std = kid(fake, real, subsets=3, subset_size=150, seed=5)
    expected = np_mmd2(fake.double().numpy(), real.double().numpy())
    # Kernel values are O(1-10): float64 sums of 150^2 of them err by ~1e-13, so 1e-6
    # relative (1e-9 absolute near zero) only allows round-off; KID here is ~0.1.
    assert mean == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert expected > 1e-2
    # Full-size subsets are permutations of the sets, and MMD^2 ignores order: no spread.
    assert std < 1e-9 * abs(mean)


def test_kid_matches_numpy_reference_on_random_subsets():
    fake, real = correlated(120, 10, 13, shift=0.3), correlated(90, 10, 14)
    mean, std = kid(fake, real, subsets=7, subset_size=40, seed=3)
    expected_mean, expected_std = np_kid(fake, real, subsets=7, size=40, seed=3)
    assert mean == pytest.approx(expected_mean, rel=1e-6, abs=1e-9)  # round-off only, as above
    assert std == pytest.approx(expected_std, rel=1e-6, abs=1e-9)
    assert expected_std > 1e-3  # the subsets really differ: the RNG sequence was matched
    # subset_size beyond the smaller set is capped to it (here 90), not an error.
    capped = kid(fake, real, subsets=2, subset_size=1000, seed=3)
    assert capped[0] == pytest.approx(np_kid(fake, real, subsets=2, size=90, seed=3)[0], rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError):
        kid(fake[:1], real)


def test_fid_and_kid_grow_with_the_shift_and_precision_drops():
    real = gaussian(500, 16, 0)
    shifts = [0.0, 0.25, 0.5, 1.0]
    fids, kids, precisions = [], [], []
    for i, shift in enumerate(shifts):
        fake = gaussian(500, 16, 100 + i, shift=shift)
        fids.append(fid(fake, real))
        kids.append(kid(fake, real, subsets=2, subset_size=500)[0])
        precisions.append(precision_recall(fake, real)[0])
    # Measured: FID 0.36, 1.3, 4.4, 16.3 (||shift||^2 = 0, 1, 4, 16 plus ~0.3 sampling bias);
    # KID 0.001, 0.22, 1.0, 7.4. Each step is many times the noise at N=500.
    assert fids == sorted(fids) and fids[-1] > 10 * fids[1]
    assert kids == sorted(kids) and kids[-1] > 10 * kids[1]
    # Unshifted: ~0.8 of fake samples lie in the real k-NN balls; shift 1 per dim: ~0.2.
    assert precisions[0] > 0.6 and precisions[-1] < 0.5 * precisions[0]
    far = gaussian(500, 16, 200, shift=5.0)  # 20 standard deviations away
    assert precision_recall(far, real) == (0.0, 0.0)


def test_precision_and_recall_are_not_swapped():
    real = gaussian(400, 16, 1)
    # A collapsed generator: every fake sample sits in the dense middle of the real data
    # (precision ~1) but covers little of it (recall ~0). Swapped arguments invert this.
    precision, recall = precision_recall(gaussian(400, 16, 2, scale=0.3), real)
    assert precision > 0.95 and recall < 0.1
    with pytest.raises(ValueError):
        precision_recall(real[:3], real, k=3)


def test_kid_is_unbiased_while_the_biased_estimator_is_not():
    values, biased = [], []
    for pair in range(20):
        x, y = gaussian(200, 16, 1000 + 2 * pair), gaussian(200, 16, 1001 + 2 * pair)
        values.append(kid(x, y, subsets=1, subset_size=200)[0])
        biased.append(np_mmd2(x.double().numpy(), y.double().numpy(), biased=True))
    values, biased = np.array(values), np.array(biased)
    standard_error = values.std(ddof=1) / math.sqrt(len(values))
    # Same distribution: E[KID] = 0 exactly, so the mean of 20 draws lies within 3 standard
    # errors of 0 (a ~0.3% tail for an unbiased estimator) and single draws take both signs.
    assert abs(values.mean()) < 3 * standard_error
    assert (values < 0).any() and (values > 0).any()
    # The V-statistic is a squared RKHS norm: always positive, mean far above its noise.
    biased_error = biased.std(ddof=1) / math.sqrt(len(biased))
    assert (biased > 0).all() and biased.mean() > 10 * biased_error


# --------------------------------------------------------------------------------------
# Inception score and class statistics
# --------------------------------------------------------------------------------------


def one_hot_logits(labels, num_classes, confidence=30.0):
    """Logits whose softmax puts 1 - ~1e-12 on `labels` (e^-30 ~ 1e-13 per other class)."""
    return torch.nn.functional.one_hot(labels, num_classes).float() * confidence


def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
    k = 10
    logits = one_hot_logits(torch.arange(2000) % k, k)
    # One split holds exactly 200 per class: IS = exp(H(y)) = K up to the ~1e-12 softmax tail.
    assert inception_score(logits, splits=1)[0] == pytest.approx(k, rel=1e-6)
    # Ten shuffled splits of 200 have multinomial class counts: exp(H) of each falls short of
    # K by ~(K-1)/(2*200) = 2.3% on average, never above K (IS <= K), never near 0.9 K.
    mean, std = inception_score(logits, splits=10)
    assert 0.95 * k < mean <= k + 1e-6 and 0 < std < 0.1 * k


def test_inception_score_of_identical_predictions_is_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 10, generator=g).expand(300, 10) * 3
    # p(y|x) = p(y) for every sample: every KL is exactly 0 up to round-off.
    mean, std = inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-9) and std < 1e-9


def test_inception_score_matches_numpy_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 7, generator=g) * 2
    # float64 on both sides: agreement to round-off, 1e-9 relative leaves a wide margin.
    assert inception_score(logits, splits=1)[0] == pytest.approx(np_inception_score(logits), rel=1e-9)
    assert 1.0 < np_inception_score(logits) < 7.0


def test_class_coverage_and_entropy():
    k = 10
    balanced = one_hot_logits(torch.arange(500) % k, k)
    assert class_coverage(balanced) == 1.0 and class_entropy(balanced) == pytest.approx(1.0, abs=1e-12)
    collapsed = one_hot_logits(torch.full((500,), 3), k)
    assert class_coverage(collapsed) == pytest.approx(1 / k) and class_entropy(collapsed) == 0.0
    # Five classes dropped, five kept evenly: half covered, entropy log 5 / log 10.
    half = one_hot_logits(torch.arange(500) % 5 * 2, k)
    assert class_coverage(half) == pytest.approx(0.5)
    assert class_entropy(half) == pytest.approx(math.log(5) / math.log(10), rel=1e-12)
    # A class with under half its fair share (n/K = 10 here, this one 4) is not covered.
    labels = torch.cat([torch.arange(96) % 9, torch.full((4,), 9)])
    assert class_coverage(one_hot_logits(labels, k)) == pytest.approx(0.9)


def test_class_accuracy():
    labels = torch.arange(40) % 4
    predicted = labels.clone()
    predicted[:10] = (predicted[:10] + 1) % 4  # the first 10 of 40 are wrong
    assert class_accuracy(one_hot_logits(predicted, 4), labels) == pytest.approx(0.75)
    assert class_accuracy(one_hot_logits(labels, 4), labels) == 1.0


# --------------------------------------------------------------------------------------
# score_samples
# --------------------------------------------------------------------------------------


def feature_set(n, seed, shift=0.0, k=5):
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randn(n, 12, generator=g) + shift, torch.randn(n, k, generator=g) * 3)


def test_score_samples_returns_every_score():
    fake, real = feature_set(120, 1, shift=0.3), feature_set(200, 2)
    labels = torch.arange(120) % 5
    kw = dict(kid_subsets=5, kid_subset_size=100, seed=4)
    scores = score_samples(fake, real, labels, **kw)
    assert set(scores) == {"fid", "kid", "kid_std", "precision", "recall", "is", "is_std", "class_coverage",
                           "class_entropy", "class_accuracy"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values())
    # Each score is the standalone function's value on the same inputs (same seed).
    assert scores["fid"] == pytest.approx(fid(fake.features, real.features), rel=1e-12)
    assert (scores["kid"], scores["kid_std"]) == pytest.approx(kid(fake.features, real.features, 5, 100, 4))
    assert (scores["precision"], scores["recall"]) == pytest.approx(precision_recall(fake.features, real.features))
    assert (scores["is"], scores["is_std"]) == pytest.approx(inception_score(fake.logits, 10, 4))
    assert scores["class_accuracy"] == pytest.approx(class_accuracy(fake.logits, labels))
    # Without labels no class accuracy; without logits no classifier scores at all.
    assert "class_accuracy" not in score_samples(fake, real, **kw)
    no_logits = score_samples(Features(fake.features), real, labels, **kw)
    assert set(no_logits) == {"fid", "kid", "kid_std", "precision", "recall"}


def test_score_samples_uses_given_real_stats():
    fake, real = feature_set(100, 3, shift=0.5), feature_set(150, 4)
    kw = dict(kid_subsets=2, kid_subset_size=100)
    plain = score_samples(fake, real, **kw)
    assert score_samples(fake, real, real_stats=fid_statistics(real.features), **kw)["fid"] == plain["fid"]
    # And they are really used (not recomputed): stats of another set give that set's FID.
    other = feature_set(150, 5, shift=2.0).features
    with_other = score_samples(fake, real, real_stats=fid_statistics(other), **kw)
    assert with_other["fid"] == pytest.approx(fid(fake.features, other), rel=1e-12)
    assert with_other["fid"] > 2 * plain["fid"]


# --------------------------------------------------------------------------------------
# Domain extractor
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return ImageDataModule("digits")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory, one_thread, one_blas_thread):
    return tmp_path_factory.mktemp("domain-cache")


@pytest.fixture(scope="module")
def digits_extractor(digits, digits_cache):
    return domain_extractor(digits, digits_cache, DIGITS_CONFIG)


def forbid_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the domain classifier was retrained instead of loaded from the cache")

    monkeypatch.setattr(domain, "train_domain_classifier", fail)


def count_training(monkeypatch):
    calls = []
    train = domain.train_domain_classifier

    def counted(*args, **kwargs):
        calls.append(args[-1] if len(args) > 5 else kwargs.get("config"))
        return train(*args, **kwargs)

    monkeypatch.setattr(domain, "train_domain_classifier", counted)
    return calls


def state(extractor):
    return {k: v.clone() for k, v in extractor.classifier.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_domain_extractor_trains_on_digits(digits, digits_cache, digits_extractor):
    extractor = digits_extractor
    val = digits.split("val")
    # Measured 0.97 with 100 steps; 0.9 leaves room for other torch builds / BLAS round-off.
    assert extractor.val_accuracy >= 0.9
    out = extractor(val.images)
    assert out.features.shape == (len(val.images), DIGITS_CONFIG.feature_dim) == (180, 128)
    assert out.logits.shape == (180, 10)
    assert out.features.dtype == out.logits.dtype == torch.float32
    assert (out.features >= 0).all()  # the feature layer ends in a ReLU
    # The stored accuracy is the extractor's own accuracy on the validation split.
    accuracy = (out.logits.argmax(1) == val.labels).double().mean().item()
    assert accuracy == pytest.approx(extractor.val_accuracy, abs=1e-12)
    # Eval mode: the same images give the same features however they are batched.
    torch.testing.assert_close(extractor(val.images[:7]).features, out.features[:7], rtol=1e-5, atol=1e-5)
    assert [p.name for p in (digits_cache / "extractors").iterdir()] == [f"{extractor.name}.pt"]


def test_domain_extractor_ignores_the_callers_reduced_precision(digits, digits_extractor, tmp_path):
    """Inside a bf16 run (autocast, float32_matmul_precision=high) the classifier trains and
    extracts in exact float32: the same weights and features as outside."""
    images = digits.split("val").images[:32]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = domain_extractor(digits, tmp_path, DIGITS_CONFIG)
            features = inside(images)
        assert torch.get_float32_matmul_precision() == "medium"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_same_weights(state(inside), state(digits_extractor))
    assert features.features.dtype == torch.float32
    torch.testing.assert_close(features.features, digits_extractor(images).features, rtol=0, atol=0)


def test_domain_extractor_loads_from_cache(digits, digits_cache, digits_extractor, monkeypatch):
    forbid_training(monkeypatch)
    rng_before = torch.random.get_rng_state()
    again = domain_extractor(digits, digits_cache, DIGITS_CONFIG)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # loading draws no random numbers
    assert again.name == digits_extractor.name and again.val_accuracy == digits_extractor.val_accuracy
    assert_same_weights(state(again), state(digits_extractor))
    images = digits.split("val").images
    assert torch.equal(again(images).features, digits_extractor(images).features)


def test_domain_extractor_min_accuracy(digits, digits_cache, digits_extractor, monkeypatch):
    forbid_training(monkeypatch)  # the check applies to the cached classifier too
    reached = digits_extractor.val_accuracy
    assert domain_extractor(digits, digits_cache, DIGITS_CONFIG, min_accuracy=reached).val_accuracy == reached
    with pytest.raises(ExtractorUnavailableError, match="validation accuracy"):
        domain_extractor(digits, digits_cache, DIGITS_CONFIG, min_accuracy=reached + 1e-3)


def test_domain_training_is_reproducible_and_leaves_global_rng_alone(digits, tmp_path, monkeypatch):
    calls = count_training(monkeypatch)
    rng_before = torch.random.get_rng_state()
    first = domain_extractor(digits, tmp_path / "a", TINY)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # training draws from its own seeds
    with torch.no_grad():  # as inside a callback or an evaluation loop: training must still work
        second = domain_extractor(digits, tmp_path / "b", TINY)
    assert len(calls) == 2
    assert first.name == second.name and first.val_accuracy == second.val_accuracy
    assert_same_weights(state(first), state(second))
    # Not vacuous: another seed gives other weights (and another cache file).
    other = domain_extractor(digits, tmp_path / "a", DomainClassifierConfig(steps=20, seed=1))
    assert other.name != first.name
    assert not torch.equal(state(other)["head.1.weight"], state(first)["head.1.weight"])


def test_corrupt_domain_cache_is_retrained(digits, tmp_path, monkeypatch):
    calls = count_training(monkeypatch)
    original = domain_extractor(digits, tmp_path, TINY)
    path = tmp_path / "extractors" / f"{original.name}.pt"
    path.write_bytes(b"\x80\x02 not a torch file")
    rebuilt = domain_extractor(digits, tmp_path, TINY)
    assert len(calls) == 2
    assert_same_weights(state(rebuilt), state(original))
    forbid_training(monkeypatch)  # the rewritten file is good again
    assert_same_weights(state(domain_extractor(digits, tmp_path, TINY)), state(original))


def test_domain_cache_is_per_config(digits, tmp_path, monkeypatch):
    calls = count_training(monkeypatch)
    a = domain_extractor(digits, tmp_path, TINY)
    b = domain_extractor(digits, tmp_path, DomainClassifierConfig(steps=21))
    assert len(calls) == 2 and [c.steps for c in calls] == [20, 21]
    assert a.name != b.name
    assert sorted(p.name for p in (tmp_path / "extractors").iterdir()) == sorted([f"{a.name}.pt", f"{b.name}.pt"])
    # A file under b's name that holds a's classifier (key mismatch) is retrained, not trusted.
    b_weights = state(b)
    (tmp_path / "extractors" / f"{b.name}.pt").write_bytes((tmp_path / "extractors" / f"{a.name}.pt").read_bytes())
    again = domain_extractor(digits, tmp_path, DomainClassifierConfig(steps=21))
    assert len(calls) == 3
    assert_same_weights(state(again), b_weights)


def test_single_class_dataset_has_no_domain_extractor(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # a flat folder: one class
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / f"{i}.png")
    datamodule = ImageDataModule("folder", path=str(images), image_size=8, channels=1)
    assert datamodule.num_classes == 1
    forbid_training(monkeypatch)
    with pytest.raises(ExtractorUnavailableError, match="class"):
        domain_extractor(datamodule, tmp_path / "cache", TINY)
    assert not (tmp_path / "cache").exists()


def test_domain_fid_separates_real_digits_from_noise(digits, digits_extractor):
    train = digits_extractor(digits.split("train").images).features
    val_images = digits.split("val").images
    val = digits_extractor(val_images).features
    noise_images = torch.rand(val_images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = digits_extractor(noise_images).features
    real_fid, noise_fid = fid(val, train), fid(noise, train)
    # Measured: train vs val ~1.9 (180 val images in 128 dims: mostly small-sample bias),
    # uniform noise vs train ~85. The brief asks for at least a 10x gap.
    assert real_fid < 5.0
    assert noise_fid > 10 * real_fid


@pytest.mark.slow
def test_default_domain_extractor_on_mnist5k_reaches_95_percent(tmp_path):
    datamodule = ImageDataModule("mnist5k")
    extractor = domain_extractor(datamodule, tmp_path)  # the default config, as training uses it
    # Measured 0.992 in ~40 s on one thread; 0.95 is the requirement.
    assert extractor.val_accuracy >= 0.95
    val = datamodule.split("val")
    out = extractor(val.images)
    assert out.features.shape == (len(val.images), DomainClassifierConfig().feature_dim)
    assert out.logits.shape == (len(val.images), 10)


# --------------------------------------------------------------------------------------
# Reference features
# --------------------------------------------------------------------------------------


class CountingExtractor:
    """Wraps an extractor, records the batch sizes it is called with."""

    def __init__(self, inner, name=None):
        self.inner = inner
        self.name = name or inner.name
        self.batches = []

    def __call__(self, images):
        self.batches.append(len(images))
        return self.inner(images)


def test_reference_features_are_cached(digits, digits_extractor, tmp_path):
    counting = CountingExtractor(digits_extractor)
    ref = reference_features(counting, digits, tmp_path, split="val")
    assert counting.batches and sum(counting.batches) == ref.num == 180
    files = list((tmp_path / "reference").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    np.testing.assert_array_equal(ref.stats["mu"], fid_statistics(ref.features.features)["mu"])
    np.testing.assert_array_equal(ref.stats["sigma"], fid_statistics(ref.features.features)["sigma"])
    again_counting = CountingExtractor(digits_extractor)
    again = reference_features(again_counting, digits, tmp_path, split="val")
    assert again_counting.batches == []  # loaded, not recomputed
    assert torch.equal(again.features.features, ref.features.features)
    assert torch.equal(again.features.logits, ref.features.logits)
    assert again.key == ref.key


def test_reference_cache_key_covers_split_n_and_extractor(digits, digits_extractor, tmp_path):
    variants = [("val", 100, digits_extractor.name), ("train", 100, digits_extractor.name),
                ("val", 150, digits_extractor.name), ("val", 100, "another-extractor")]
    features = {}
    for split, n, name in variants:
        counting = CountingExtractor(digits_extractor, name)
        features[split, n, name] = reference_features(counting, digits, tmp_path, split=split, n=n)
        assert sum(counting.batches) == n  # computed, not taken from another variant's file
        assert features[split, n, name].num == n  # the first n images, not a whole last batch
    assert len(list((tmp_path / "reference").iterdir())) == len(variants)
    train, val = features["train", 100, digits_extractor.name], features["val", 100, digits_extractor.name]
    assert not torch.equal(train.features.features, val.features.features)


@pytest.mark.parametrize("n", [181, 1, 0])  # the val split holds 180 images
def test_reference_n_out_of_range_is_an_error(digits, digits_extractor, tmp_path, n):
    counting = CountingExtractor(digits_extractor)
    with pytest.raises(ValueError, match="n="):
        reference_features(counting, digits, tmp_path, split="val", n=n)
    assert counting.batches == [] and not (tmp_path / "reference").exists()


def test_reference_features_are_computed_in_batches(digits, digits_extractor, tmp_path):
    images = digits.split("train").images
    counting = CountingExtractor(digits_extractor)
    ref = reference_features(counting, digits, tmp_path / "all", split="train", batch_size=100)
    assert counting.batches == [100] * 16 + [17]  # ceil(1617 / 100) = 17 calls over the whole split
    whole = digits_extractor(images)
    # Per-image computation in eval mode; only the batch composition differs, which may move
    # the last float32 bits of conv / matmul results: 1e-5 is far below feature scale ~1.
    torch.testing.assert_close(ref.features.features, whole.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.features.logits, whole.logits, rtol=1e-5, atol=1e-5)
    counting = CountingExtractor(digits_extractor)
    first = reference_features(counting, digits, tmp_path / "first", split="train", n=250, batch_size=100)
    assert counting.batches == [100, 100, 50]  # the first n images only
    torch.testing.assert_close(first.features.features, whole.features[:250], rtol=1e-5, atol=1e-5)
