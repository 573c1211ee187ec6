"""UniPC (Zhao et al. 2023, arXiv 2302.04867): UniP-p predictor + UniC-p corrector, data prediction, EDM form."""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from ..contract import call_model, register_sampler
from .common import check_max_order, dynamic_threshold, evaluate, report, step_orders

__all__ = ["sample_unipc", "unipc_coefficients"]

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(rks: torch.Tensor, hh: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, b) of the UniPC linear system: R[m, k] = r_k^m, b_m = g_(m+1) (m+1)! / B(hh), g_1 = expm1(hh)/hh - 1."""
    p = rks.numel()
    big_b = hh if variant == "bh1" else torch.expm1(hh)
    g = torch.expm1(hh) / hh - 1
    rows, b = [], []
    for m in range(1, p + 1):
        rows.append(rks ** (m - 1))
        b.append(g * math.factorial(m) / big_b)
        g = g / hh - 1.0 / math.factorial(m + 1)
    return torch.stack(rows), torch.stack(b)


@register_sampler("unipc", rounds_per_step=1, family="multistep", order=3)
@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args, callback, disable, *, max_order=3, variant="bh2", afs=False,
                 lower_order_final=True, thresholding=False, threshold_ratio=0.995):
    """UniPC-p (UniP-p + UniC-p, B(h) = h for "bh1" or e^h - 1 for "bh2"), data prediction in lambda = -log sigma.

    The corrector runs on every step but the last and uses D at the predicted point, which is also the next
    history value: N steps cost N NFE (N - 1 with ``afs``, which stores D_0 = x_0 - sigma_0 d_0).
    Orders: warm start min(max_order, i+1); ``lower_order_final`` True caps at N - i (AMED code and diffusers
    ``UniPCMultistepScheduler``, which applies it at any step count; an int k caps only when N < k).
    A trailing 0 in ``sigmas`` is a separate first-order step x <- D(x; sigma_last) by the shared wrapper, not
    counted in N (diffusers' ``final_sigmas_type="zero"`` counts its step to 0 in N, so its caps differ).
    ``thresholding`` applies dynamic thresholding to every stored D (off by default).
    """
    check_max_order("unipc", max_order, 3)
    if variant not in VARIANTS:
        raise ValueError(f"unipc: unknown variant {variant!r}; choose one of {VARIANTS}")
    n_steps = len(sigmas) - 1
    orders = step_orders(n_steps, max_order, lower_order_final)
    lambdas = -sigmas.log()

    def stored(denoised):
        return dynamic_threshold(denoised, threshold_ratio) if thresholding else denoised

    denoised, _ = evaluate(model, x, sigmas[0], extra_args, afs)
    hist = [stored(denoised)]  # D at sigma_i, sigma_{i-1}, ...
    for i in trange(n_steps, disable=disable):
        s, t = sigmas[i], sigmas[i + 1]
        report(callback, x, i, s, hist[0])
        p = orders[i]
        h = lambdas[i + 1] - lambdas[i]
        hh = -h
        big_b = hh if variant == "bh1" else torch.expm1(hh)
        rks = torch.stack([(lambdas[i - k] - lambdas[i]) / h for k in range(1, p)] + [torch.ones_like(h)])
        d1s = [(hist[k] - hist[0]) / rks[k - 1] for k in range(1, p)]
        R, b = unipc_coefficients(rks, hh, variant)
        x_base = (t / s) * x - torch.expm1(hh) * hist[0]
        if p == 1:
            x_pred = x_base
        else:
            rho_p = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            x_pred = x_base - big_b * sum(rho_p[k] * d1s[k] for k in range(p - 1))
        if i == n_steps - 1:  # no corrector on the final step: no model call at sigma_N
            x = x_pred
            break
        d_new = stored(call_model(model, x_pred, t, extra_args))
        rho_c = [0.5] if p == 1 else torch.linalg.solve(R, b)
        corr = sum((rho_c[k] * d1s[k] for k in range(p - 1)), rho_c[p - 1] * (d_new - hist[0]))
        x = x_base - big_b * corr
        hist = [d_new] + hist[:max_order - 1]
    return x
