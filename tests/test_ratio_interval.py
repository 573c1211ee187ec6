"""The validation verdict's uncertainty: a paired percentile bootstrap of the RMSE ratio, checked against
scipy.stats.bootstrap and against cases with a known answer."""

import numpy as np
import pytest
import scipy.stats
import torch

from epd_solver.distillation.validate import ratio_interval


def _scipy_interval(a, b, n=20000):
    res = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: np.sqrt(x.mean(axis) / y.mean(axis)), paired=True,
                                vectorized=True, n_resamples=n, method="percentile", confidence_level=0.95,
                                random_state=np.random.default_rng(1))
    return res.confidence_interval.low, res.confidence_interval.high


def test_interval_matches_scipy_and_widens_with_rare_large_errors():
    g = torch.Generator().manual_seed(0)
    bulk_a = torch.rand(512, generator=g, dtype=torch.float64) * 1e-4
    bulk_b = torch.rand(512, generator=g, dtype=torch.float64) * 2e-4
    lo, hi = ratio_interval(bulk_a, bulk_b, draws=20000)
    s_lo, s_hi = _scipy_interval(bulk_a.numpy(), bulk_b.numpy())
    assert (lo, hi) == pytest.approx((s_lo, s_hi), abs=0.01)
    assert hi < 1  # a clear win: 0.71 expected
    # three samples in another mode (error 0.1 instead of ~1e-4) make the same comparison inconclusive
    rare_a = bulk_a.clone()
    rare_a[:3] = 0.1
    rare_b = bulk_b.clone()
    rare_b[3:6] = 0.1
    lo, hi = ratio_interval(rare_a, rare_b, draws=20000)
    s_lo, s_hi = _scipy_interval(rare_a.numpy(), rare_b.numpy())
    assert (lo, hi) == pytest.approx((s_lo, s_hi), abs=0.03)
    assert lo < 1 < hi and hi - lo > 0.5


def test_interval_of_a_fixed_ratio_is_that_ratio():
    b = torch.rand(100, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    lo, hi = ratio_interval(0.25 * b, b)
    assert lo == pytest.approx(0.5, rel=1e-12) and hi == pytest.approx(0.5, rel=1e-12)


def test_interval_refuses_bad_input():
    with pytest.raises(ValueError, match="one length"):
        ratio_interval(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="level"):
        ratio_interval(torch.ones(3), torch.ones(3), level=1.0)
