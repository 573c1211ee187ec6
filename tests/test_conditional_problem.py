"""gmm:digits-cond: the class-conditional mixture's denoisers against a brute-force posterior (scipy), CFG
against the closed-form combination, and the guided ODE end point against an independent integrator."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from epd_solver.denoisers import CFGDenoiser
from epd_solver.problems import ConditioningError, exact_endpoint, get_problem


@pytest.fixture(scope="module")
def model():
    return get_problem("gmm:digits-cond")


def brute_posterior_mean(model, x, sigma, label):
    """E[x0 | x] by enumerating the components with scipy densities (null label: all components)."""
    w = model.weights.numpy()
    mus, covs, labels = model.means.numpy(), model.covariances().numpy(), model.labels.numpy()
    keep = np.ones_like(labels, bool) if label == model.null_label else labels == label
    d = x.shape[0]
    logs, means = [], []
    for k in np.flatnonzero(keep):
        c = covs[k] + sigma**2 * np.eye(d)
        logs.append(np.log(w[k]) + multivariate_normal(mus[k], c, allow_singular=False).logpdf(x))
        means.append(mus[k] + covs[k] @ np.linalg.solve(c, x - mus[k]))
    logs = np.array(logs)
    r = np.exp(logs - logs.max())
    r /= r.sum()
    return (r[:, None] * np.array(means)).sum(0)


def test_shape_and_classes(model):
    assert model.num_classes == 10 and model.null_label == 10 and model.shape == (64,)
    assert torch.allclose(model.class_weights().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (model.class_weights() > 0.09).all()  # the digits classes are nearly balanced


@pytest.mark.parametrize("sigma", [0.05, 0.7, 5.0])
def test_conditional_and_unconditional_denoisers_match_scipy(model, sigma):
    g = torch.Generator().manual_seed(3)
    clean = model.sample_data(6, g)
    x = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 7, 9, 10, 10])
    out = model(x, torch.full((6,), sigma, dtype=torch.float64), class_labels=labels)
    for j in range(6):
        ref = brute_posterior_mean(model, x[j].numpy(), sigma, int(labels[j]))
        np.testing.assert_allclose(out[j].numpy(), ref, rtol=1e-7, atol=1e-8)


def test_cfg_is_the_closed_form_combination(model):
    g = torch.Generator().manual_seed(4)
    x = 2.0 * torch.randn(5, 64, generator=g, dtype=torch.float64)
    sigma = torch.full((5,), 2.0, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4, 5])
    guided = CFGDenoiser(model, 3.0, {"class_labels": torch.tensor([10])})(x, sigma, class_labels=y)
    for j in range(5):
        d_c = brute_posterior_mean(model, x[j].numpy(), 2.0, int(y[j]))
        d_u = brute_posterior_mean(model, x[j].numpy(), 2.0, 10)
        np.testing.assert_allclose(guided[j].numpy(), d_u + 3.0 * (d_c - d_u), rtol=1e-7, atol=1e-8)


def test_guided_end_point_matches_an_independent_integrator(model):
    """DOP853 on the guided ODE (per-row labels sliced with its chunks) against k-diffusion's Heun on a fine
    grid; the Heun error shrinks 4x per halving, so both agree to its O(h^2) error."""
    from oracles import kdiffusion_sampling

    ks = kdiffusion_sampling()
    guided = CFGDenoiser(model, 3.0, {"class_labels": torch.tensor([10])})
    x0 = 80.0 * torch.randn(6, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    exact = exact_endpoint(guided, x0, 80.0, 0.002, rtol=1e-10, atol=1e-10, chunk=4, rows={"class_labels": y})
    errs = []
    for steps in (200, 400):
        s = ks.get_sigmas_karras(steps, 0.002, 80.0, 7.0, "cpu").to(torch.float64)[:-1]
        heun = ks.sample_heun(guided, x0.clone(), s, extra_args={"class_labels": y}, disable=True)
        errs.append(float((heun - exact).pow(2).mean().sqrt()))
    assert errs[1] < 5e-4
    assert 2.5 < errs[0] / errs[1] < 6  # second order: the two agree on one end point
    # the labels matter: another class ends elsewhere
    other = exact_endpoint(guided, x0[:2], 80.0, 0.002, rtol=1e-8, atol=1e-8, rows={"class_labels": y[2:4]})
    assert float((other - exact[:2]).pow(2).mean().sqrt()) > 0.1


def test_named_errors(model):
    x = torch.zeros(2, 64, dtype=torch.float64)
    s = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ConditioningError, match="class-conditional: pass class_labels"):
        model(x, s)
    with pytest.raises(ConditioningError, match=r"class labels \[11\] outside this model's classes 0-9"):
        model(x, s, class_labels=torch.tensor([1, 11]))
    with pytest.raises(ConditioningError, match="3 rows, x has 2"):
        model(x, s, class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ConditioningError, match="must be integers"):
        model(x, s, class_labels=torch.tensor([1.0, 2.0]))
