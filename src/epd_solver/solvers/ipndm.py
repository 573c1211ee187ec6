"""iPNDM (Zhang & Chen 2023, DEIS paper): fixed equal-step Adams-Bashforth combinations of d in sigma."""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ..contract import register_sampler
from .common import check_max_order, evaluate, report

__all__ = ["sample_ipndm", "ADAMS_BASHFORTH"]

# Coefficients of d_i, d_{i-1}, ... for orders 1..4 (equal-step Adams-Bashforth), kept on non-uniform grids.
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@register_sampler("ipndm", rounds_per_step=1, family="multistep", order=4)
@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args, callback, disable, *, max_order=4, afs=False):
    """iPNDM: x <- x + (t - s) sum_j c_j d_(i-j) with order min(max_order, i+1), no lower-order final step.

    The coefficients are the equal-step ones even on non-uniform grids (as DEIS and the AMED code; the
    variable-step ``ipndm_v`` is worse at low NFE). ``afs=True`` puts d_0 = x_0/sqrt(1+sigma_0^2) in the
    history. N steps cost N NFE (N - 1 with AFS).
    """
    check_max_order("ipndm", max_order, 4)
    hist: list[torch.Tensor] = []  # d at sigma_i, sigma_{i-1}, ...
    for i in trange(len(sigmas) - 1, disable=disable):
        s, t = sigmas[i], sigmas[i + 1]
        denoised, d = evaluate(model, x, s, extra_args, afs=afs and i == 0)
        report(callback, x, i, s, denoised)
        hist = [d] + hist[:max_order - 1]
        coeffs = ADAMS_BASHFORTH[min(max_order, i + 1)]
        x = x + (t - s) * sum(c * dj for c, dj in zip(coeffs, hist))
    return x
