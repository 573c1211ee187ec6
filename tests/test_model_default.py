"""The shipped digits model: metadata, stored fixed-seed values, agreement with the optimal denoiser of the
digits at high noise, and samples that a classifier fitted to the real digits recognises."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import torch

from epd_solver.denoisers import Denoiser
from epd_solver.models import load_default_model
from epd_solver.problems import digits_data
from epd_solver.schedules import polynomial


def heun(model, n: int, steps: int, seed: int) -> torch.Tensor:
    """EDM Heun (no churn) from x = 80 z on the rho = 7 grid of steps + 1 points; [n, 64]."""
    sigmas = polynomial(steps + 1, 0.002, 80.0).tolist()
    x = sigmas[0] * torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t, t_next in zip(sigmas[:-1], sigmas[1:]):
            d = (x - model(x, torch.full((n,), t))) / t
            x_eul = x + (t_next - t) * d
            d2 = (x_eul - model(x_eul, torch.full((n,), t_next))) / t_next
            x = x + (t_next - t) * (d + d2) / 2
    return x.reshape(n, 64)


@pytest.fixture(scope="module")
def model():
    return load_default_model()


def test_metadata_and_size(model):
    assert isinstance(model, Denoiser)
    assert (model.kind, model.name, model.shape) == ("edm", "digits-unet-v1", (1, 8, 8))
    assert (model.sigma_min, model.sigma_max, model.prior_scale) == (0.002, 80.0, 80.0)
    n_params = sum(p.numel() for p in model.net.parameters())
    assert 200_000 < n_params < 1_000_000
    weights = resources.files("epd_solver.data").joinpath("digits_unet.safetensors").read_bytes()
    assert len(weights) < 5 * 2**20


def test_fixed_seed_values_are_stored(model):
    # regression values of this exact file (torch 2.13 CPU); float64 agrees to ~5e-7
    d = model(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
              torch.tensor([0.05, 1.0, 20.0])).reshape(3, -1)
    assert d.sum(1).tolist() == pytest.approx([-8.233073, -24.773056, -24.220448], abs=2e-4)
    assert d.norm(dim=1).tolist() == pytest.approx([7.598926, 4.970324, 4.782229], abs=2e-4)
    s = heun(model, 4, 16, seed=0)
    assert s.sum(1).tolist() == pytest.approx([-18.235117, -22.800217, -30.158513, -19.454163], abs=1e-3)
    assert s.norm(dim=1).tolist() == pytest.approx([6.959918, 6.814272, 7.343284, 6.667812], abs=1e-3)


def test_float64_network_agrees_with_float32(model):
    m64 = load_default_model(torch.float64)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
    out64 = m64(x * sigma.reshape(-1, 1, 1, 1), sigma)
    out32 = model(x * sigma.reshape(-1, 1, 1, 1), sigma)
    assert out32.dtype == torch.float64 and torch.allclose(out64, out32, atol=1e-5)


def test_close_to_the_optimal_denoiser_of_the_digits_at_high_noise(model):
    # At high noise a good model approaches D*(x) = sum_i softmax(-|x - y_i|^2 / 2 sigma^2)_i y_i over the
    # dataset (computed here in closed form); at sigma = 80, D* is the data mean.
    y = digits_data()
    g = torch.Generator().manual_seed(0)
    x0 = y[torch.randint(len(y), (256,), generator=g)]
    rms = lambda a: a.pow(2).mean().sqrt().item()  # noqa: E731
    for sigma in (2.0, 5.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        d_star = torch.softmax(-torch.cdist(x, y) ** 2 / (2 * sigma**2), dim=1) @ y
        d = model(x.reshape(-1, 1, 8, 8), torch.full((256,), sigma)).reshape(256, 64)
        # the model explains most of what separates D* from the plain mean (measured: 0.27 and 0.31)
        assert rms(d - d_star) < 0.4 * rms(d_star - y.mean(0))
    d = model(80 * torch.randn(512, 1, 8, 8, generator=g), torch.full((512,), 80.0)).reshape(512, 64)
    assert rms(d.double().mean(0) - y.mean(0)) < 0.06        # measured 0.034; per-pixel data std is 0.75


def test_samples_look_like_digits(model):
    # scaled-down acceptance (benchmarks/model_quality.py runs 1000 samples at 100 steps): 200 samples,
    # 32 Heun steps; a logistic regression fitted to the real digits is sure (p >= 0.8) of >= 80 % of
    # them and every class makes up >= 5 % (seed 0 gives 0.845 and 0.07)
    from sklearn.linear_model import LogisticRegression

    from epd_solver.problems import digits_labels

    clf = LogisticRegression(max_iter=5000).fit(digits_data().numpy(), digits_labels().numpy())
    s = heun(model, 200, 32, seed=0)
    assert s.min() > -1.3 and s.max() < 1.3
    p = clf.predict_proba(s.double().numpy())
    assert (p.max(1) >= 0.8).mean() >= 0.8
    assert np.bincount(p.argmax(1), minlength=10).min() >= 0.05 * 200
