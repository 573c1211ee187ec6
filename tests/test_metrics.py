"""Fréchet distance and FID plumbing, checked against scipy.linalg.sqrtm, closed forms and numpy."""

import numpy as np
import pytest
import scipy.linalg
import torch

from epd_solver.metrics import (FeatureStats, InceptionFeatures, compute_stats, fid_from_stats, frechet_distance,
                                frechet_distance_stats, load_reference, pixel_features)


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def scipy_frechet(mu1, s1, mu2, s2):
    """Independent oracle: the textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean).real)


def rel_err(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b))


@pytest.mark.parametrize("d", [2, 7, 24])
def test_frechet_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) <= 1e-10 * abs(expected)
    # Same covariance, different means: the trace term vanishes.
    assert frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_frechet_closed_forms():
    d = 5
    mu1, mu2 = np.arange(d, dtype=float), np.full(d, 0.5)
    # Isotropic: |mu1 - mu2|^2 + d (s1 - s2)^2 for Sigma = s^2 I.
    s1, s2 = 1.7, 0.4
    fd = frechet_distance(mu1, s1**2 * np.eye(d), mu2, s2**2 * np.eye(d))
    assert fd == pytest.approx(np.sum((mu1 - mu2) ** 2) + d * (s1 - s2) ** 2, rel=1e-12)
    # Diagonal, including singular (zero-variance) directions: sum (sqrt(a) - sqrt(b))^2.
    a = np.array([0.0, 2.0, 0.0, 3.0, 0.25])
    b = np.array([1.0, 0.0, 0.0, 3.0, 4.0])
    fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)


def test_frechet_singular_rotated_covariances():
    # Rank-2 covariances in d = 6 with a shared random rotation: closed form from the diagonal case.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a = np.array([2.0, 0.5, 0, 0, 0, 0])
    b = np.array([0.0, 1.5, 3.0, 0, 0, 0])
    fd = frechet_distance(np.zeros(6), q @ np.diag(a) @ q.T, np.zeros(6), q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)


def test_streaming_stats_match_numpy():
    rng = np.random.default_rng(0)
    feats = 3.0 + rng.standard_normal((120, 16)) @ rng.standard_normal((16, 16))
    first, second = FeatureStats(), FeatureStats()
    for chunk in np.split(feats[:71], [7, 8, 58]):  # batches of 7, 1, 50, 13
        first.update(torch.from_numpy(chunk))
    second.update(feats[71:])  # numpy input works too
    stats = first.merge(second)
    assert stats.n == 120
    assert rel_err(stats.mean(), feats.mean(axis=0)) <= 1e-12
    assert rel_err(stats.cov(), np.cov(feats, rowvar=False)) <= 1e-12


def test_stats_npz_round_trip_and_overwrite(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((40, 4)) + 1.0
    stats = FeatureStats().update(feats)
    path = tmp_path / "stats.npz"
    stats.save_npz(path)
    with np.load(path) as data:  # EDM's reference format
        assert rel_err(data["mu"], feats.mean(axis=0)) <= 1e-12
        assert rel_err(data["sigma"], np.cov(feats, rowvar=False)) <= 1e-12
    with pytest.raises(FileExistsError, match="overwrite=True"):
        stats.save_npz(path)
    more = rng.standard_normal((10, 4))
    FeatureStats().update(more).save_npz(path, overwrite=True)
    restored = FeatureStats.load_npz(path).merge(FeatureStats().update(feats))
    both = np.concatenate([more, feats])
    assert restored.n == 50
    assert rel_err(restored.cov(), np.cov(both, rowvar=False)) <= 1e-12


def test_reference_validation(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="sigma must have shape"):
        load_reference(bad)
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(ValueError, match="'sigma'"):
        load_reference(bad)
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "absent.npz")
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))  # EDM reference: no 'n'
    with pytest.raises(ValueError, match="load_reference"):
        FeatureStats.load_npz(ref)
    stats = FeatureStats().update(np.random.default_rng(3).standard_normal((10, 2)))
    with pytest.raises(ValueError, match="different feature extractors"):
        fid_from_stats(stats, ref)


def test_all_reduce_without_process_group_is_identity():
    feats = np.random.default_rng(4).standard_normal((9, 3))
    stats = FeatureStats().update(feats).all_reduce()
    assert stats.n == 9 and rel_err(stats.mean(), feats.mean(axis=0)) <= 1e-15


def test_sample_size_bias_is_small():
    rng = np.random.default_rng(5)
    d, n = 8, 20000
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = q * np.linspace(0.5, 2.0, d)  # Sigma = scale scale^T
    x1, x2 = rng.standard_normal((2, n, d)) @ scale.T
    x3 = 0.3 + rng.standard_normal((n, d)) @ (1.2 * scale).T
    same = frechet_distance_stats(FeatureStats().update(x1), FeatureStats().update(x2))
    different = frechet_distance_stats(FeatureStats().update(x1), FeatureStats().update(x3))
    # Population value for x3: d * 0.3^2 + Tr(Sigma) (1.2 - 1)^2.
    exact = d * 0.09 + np.trace(scale @ scale.T) * 0.04
    assert 0 < same < 0.02 < 0.1 * exact
    assert different == pytest.approx(exact, rel=0.05)


class TinyConvNet(torch.nn.Module):
    """Stand-in for the TorchScript Inception: same call signature, small random conv features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        h = torch.tanh(self.conv(x / 255.0 - 0.5))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


class PixelNet(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return x.flatten(1)


def numpy_png_values(images):
    """EDM's generate.py: (x * 127.5 + 128).clip(0, 255) cast to uint8."""
    return (images.numpy() * np.float32(127.5) + np.float32(128)).clip(0, 255).astype(np.uint8)


def test_inception_features_fid_matches_numpy(tmp_path):
    torch.manual_seed(0)
    net = TinyConvNet().eval()
    path = tmp_path / "inception-stand-in.pt"
    torch.jit.script(net).save(str(path))
    extractor = InceptionFeatures(path, batch_size=16)
    gen = torch.Generator().manual_seed(1)
    set_a = torch.rand(40, 3, 8, 8, generator=gen) * 2.2 - 1.1  # a little outside [-1, 1]: clipped
    set_b = (torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1) ** 3  # grey images
    stats_a = compute_stats(set_a.split(15), extractor)
    stats_b = compute_stats(set_b, extractor)

    with torch.no_grad():
        feats_a = net(torch.from_numpy(numpy_png_values(set_a)).float()).double().numpy()
        grey = np.repeat(numpy_png_values(set_b), 3, axis=1)
        feats_b = net(torch.from_numpy(grey).float()).double().numpy()
    mu_a, cov_a = feats_a.mean(axis=0), np.cov(feats_a, rowvar=False)
    mu_b, cov_b = feats_b.mean(axis=0), np.cov(feats_b, rowvar=False)
    assert rel_err(stats_a.cov(), cov_a) <= 1e-5  # float32 network, different batch shapes
    expected = scipy_frechet(mu_a, cov_a, mu_b, cov_b)
    assert fid_from_stats(stats_a, stats_b) == pytest.approx(expected, rel=1e-5)
    ref = tmp_path / "ref.npz"
    stats_b.save_npz(ref)
    assert fid_from_stats(stats_a, ref) == pytest.approx(expected, rel=1e-5)


def test_inception_features_quantise_like_saved_pngs(tmp_path):
    path = tmp_path / "pixels.pt"
    torch.jit.script(PixelNet()).save(str(path))
    values = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 6)
    feats = InceptionFeatures(path)(values)
    expected = [0, 0, 64, 128, 255, 255]  # floor(x*127.5 + 128) clipped to [0, 255]
    assert feats.tolist() == [expected * 3]  # grey repeated to 3 channels
    assert pixel_features(values).tolist() == [values.flatten().tolist()]


def test_inception_weights_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        InceptionFeatures(tmp_path / "inception-2015-12-05.pt")
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        InceptionFeatures(None)
