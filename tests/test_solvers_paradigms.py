"""ParaDiGMS: Picard iteration over Euler windows converges to sequential Euler; passes and evaluations counted."""

import pytest
import torch

from epd_solver.problems import digits_mixture
from epd_solver.schedules import polynomial
from epd_solver.solvers import sample_euler, sample_paradigms

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(batch=8, seed=0):
    return 80.0 * torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_converges_to_sequential_euler_as_tolerance_goes_to_zero():
    gm, x, sigmas = digits_mixture(), _x(4), polynomial(51)
    seq, seq_info = sample_euler(gm, x, sigmas, disable=True, return_info=True)
    errors, passes = [], []
    for tol in (0.1, 1e-2, 1e-4, 1e-6):
        out, info = sample_paradigms(gm, x, sigmas, disable=True, window=50, tolerance=tol, return_info=True)
        errors.append((out - seq).abs().max().item())
        passes.append(info.nfe.para_nfe)
    # measured: errors 5e-3, 3e-4, 1e-5, 7e-8 with 22, 23, 26, 28 passes (sequential: 50 rounds)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 and errors[0] < 0.05
    assert max(passes) < seq_info.nfe.para_nfe == 50
    exact, info = sample_paradigms(gm, x, sigmas, disable=True, window=50, tolerance=0.0, return_info=True)
    assert (exact - seq).abs().max() <= 1e-12  # only summation order differs
    assert info.nfe.para_nfe == 50  # no early acceptance at tolerance 0: one point per pass


def test_fewer_parallel_rounds_than_sequential_with_a_sliding_window():
    gm, x, sigmas = digits_mixture(), _x(seed=1), polynomial(51)
    out, info = sample_paradigms(gm, x, sigmas, disable=True, window=10, tolerance=0.1, return_info=True)
    _, seq_info = sample_euler(gm, x, sigmas, disable=True, return_info=True)
    assert info.nfe.para_nfe < seq_info.nfe.para_nfe  # measured 21 passes vs 50
    assert info.nfe.evaluations > seq_info.nfe.evaluations  # measured 198 evaluations vs 50


class Recorder:
    """Records rows and sigmas of every call of a wrapped model."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, sigma, **kw):
        self.calls.append((x.shape[0], sigma.clone()))
        return self.model(x, sigma, **kw)


@pytest.mark.parametrize("window", [20, 6])
@pytest.mark.parametrize("nfe", [3, 5, 7, 9])
def test_passes_and_evaluations_per_para_nfe(window, nfe):
    # Tolerance 0 accepts one new point per pass, so pass k evaluates min(window, T - k) points in one call.
    steps, batch = 20, 3
    gm, x, sigmas = Recorder(digits_mixture()), _x(batch), polynomial(steps + 1)
    _, info = sample_paradigms(gm, x, sigmas, disable=True, window=window, tolerance=0.0, max_passes=nfe,
                               return_info=True)
    sizes = [min(window, steps - k) for k in range(nfe)]
    assert info.nfe.para_nfe == nfe == len(gm.calls)
    assert info.nfe.evaluations == sum(sizes)
    assert [rows for rows, _ in gm.calls] == [s * batch for s in sizes]
    for k, (_, sig) in enumerate(gm.calls):  # window-major rows: B copies of sigma_k, then sigma_(k+1), ...
        assert torch.equal(sig, sigmas[k:k + sizes[k]].repeat_interleave(batch))


def test_window_tiles_per_sample_conditioning():
    gm = digits_mixture()
    shift = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=F64)

    def model(x, sigma, shift):
        return gm(x - shift, sigma) + shift

    x, sigmas = _x(4), polynomial(13)
    seq = sample_euler(model, x, sigmas, {"shift": shift}, disable=True)
    out = sample_paradigms(model, x, sigmas, {"shift": shift}, disable=True, window=5, tolerance=0.0)
    assert (out - seq).abs().max() <= 1e-12
    assert (seq - sample_euler(gm, x, sigmas, disable=True)).abs().max() > 0.1


def test_callback_once_per_pass():
    seen = []
    _, info = sample_paradigms(digits_mixture(), _x(2), polynomial(11), callback=seen.append, disable=True,
                               window=4, tolerance=0.0, return_info=True)
    assert len(seen) == info.nfe.para_nfe == 10
    assert [c["i"] for c in seen] == list(range(10))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


@pytest.mark.parametrize("knobs", [{"window": 0}, {"window": 2.5}, {"tolerance": -0.1},
                                   {"tolerance": float("nan")}, {"max_passes": 0}])
def test_bad_knobs(knobs):
    with pytest.raises(ValueError, match="paradigms"):
        sample_paradigms(digits_mixture(), _x(2), polynomial(5), disable=True, **knobs)
