"""The registered learned samplers: NFE accounting of the paper, trailing zero, registry, model checks."""

import pytest
import torch

from epd_solver.denoisers import CFGDenoiser, EDMDenoiser
from epd_solver import sampling
from epd_solver.epd import (EPDParams, EPDTables, ParamsMismatchError, sample_amed, sample_amed_plugin, sample_epd,
                            sample_epd_plugin, sample_epd_solver)
from epd_solver.problems import digits_mixture
from epd_solver.schedules import time_uniform

F64 = torch.float64
# the paper: (Para.NFE, N, evaluations per sample with K = 2, with CFG), AFS on
SPEC_TABLE = [(3, 3, 5, 10), (5, 4, 8, 16), (7, 5, 11, 22), (9, 6, 14, 28)]


def params_for(n, afs, k=2, **kw):
    tables = EPDTables(n - 1, k, "ordered", init="randn", seed=n)
    return EPDParams.from_tables(tables, sigmas=time_uniform(n), afs=afs, **kw)


def labelled_model():
    means = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=F64)

    def fn(x, sigma, class_labels):
        s2 = sigma[:, None] ** 2
        return (x + s2 * means[class_labels]) / (1 + s2)

    return EDMDenoiser(fn, 0.002, 80.0, name="labelled")


@pytest.mark.parametrize("para,n,evals,with_cfg", SPEC_TABLE)
def test_nfe_matches_the_spec_table(para, n, evals, with_cfg):
    gmm = digits_mixture()
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=F64)
    p = params_for(n, afs=True)
    assert (p.nfe()["para_nfe"], p.nfe()["evaluations"]) == (para, evals)
    _, info = sample_epd(gmm, x, p.sigmas, p, return_info=True)
    assert (info.nfe.para_nfe, info.nfe.evaluations, info.solver) == (para, evals, "epd")
    # without AFS: one more evaluation, 2(N-1) rounds and 3(N-1) evaluations
    q = params_for(n, afs=False)
    _, info = sample_epd(gmm, x, q.sigmas, q, return_info=True)
    assert (info.nfe.para_nfe, info.nfe.evaluations) == (para + 1, evals + 1) == (2 * (n - 1), 3 * (n - 1))
    assert (q.nfe()["para_nfe"], q.nfe()["evaluations"]) == (para + 1, evals + 1)
    # classifier-free guidance doubles the network rows, not the rounds
    cfg = CFGDenoiser(labelled_model(), 2.0, {"class_labels": torch.tensor([3])})
    _, info = sample_epd(cfg, x, p.sigmas, p, {"class_labels": torch.tensor([0, 1])}, return_info=True)
    assert (info.nfe.para_nfe, info.nfe.evaluations, info.nfe.network_rows) == (para, evals, with_cfg)


def test_trailing_zero_denoises_once_more():
    gmm = digits_mixture()
    x = 80 * torch.randn(3, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    p = params_for(4, afs=True)
    end, info = sample_epd(gmm, x, p.sigmas, p, return_info=True)
    with_zero = torch.cat([p.sigmas, torch.zeros(1, dtype=F64)])
    out, info0 = sample_epd(gmm, x, with_zero, p, return_info=True)
    expected = gmm(end, torch.full((3,), float(p.sigmas[-1]), dtype=F64))
    assert (out - expected).abs().max() <= 1e-12
    assert (info0.nfe.para_nfe, info0.nfe.evaluations) == (info.nfe.para_nfe + 1, info.nfe.evaluations + 1)


def test_registry_and_sampler_kinds():
    # looked up without importing the baselines package (epd_solver.solvers), which these tests do not need
    registered = {n: sampling._REGISTRY[n] for n in ("epd", "epd_plugin", "amed", "amed_plugin")}
    assert all(spec.learned and spec.rounds_per_step == 2 for spec in registered.values())
    fns = {"epd": sample_epd_solver, "epd_plugin": sample_epd_plugin, "amed": sample_amed,
           "amed_plugin": sample_amed_plugin}
    assert all(registered[n].fn is fns[n] for n in fns)
    gmm = digits_mixture()
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(3), dtype=F64)
    for solver, k, order in (("epd", 2, None), ("epd_plugin", 2, 3), ("amed", 1, None), ("amed_plugin", 1, 4)):
        p = params_for(5, afs=True, k=k, solver=solver, plugin_order=order)
        direct, info = fns[solver](gmm, x, p.sigmas, params=p, return_info=True)
        assert info.solver == solver and torch.equal(direct, sample_epd(gmm, x, p.sigmas, p))
        wrong = "amed" if solver != "amed" else "epd"
        with pytest.raises(ParamsMismatchError, match="solver kind"):
            fns[wrong](gmm, x, p.sigmas, params=p)
    with pytest.raises(TypeError, match="params"):
        sample_epd_solver(gmm, x, time_uniform(5))
    with pytest.raises(TypeError, match="params"):
        sample_epd(gmm, x, time_uniform(5))
    with pytest.raises(TypeError, match="unknown options"):
        sample_epd_solver(gmm, x, time_uniform(5), params=params_for(5, True), afs=True)


def test_callback_sees_every_step_and_the_afs_estimate():
    gmm = digits_mixture()
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(4), dtype=F64)
    p = params_for(5, afs=True)
    seen = []
    sample_epd(gmm, x, p.sigmas, p, callback=seen.append)
    assert [e["i"] for e in seen] == [0, 1, 2, 3]
    assert [float(e["sigma"]) for e in seen] == p.sigmas[:-1].tolist()
    s0 = float(p.sigmas[0])
    assert (seen[0]["denoised"] - (x - s0 * x / (1 + s0**2) ** 0.5)).abs().max() <= 1e-12
    d1 = gmm(seen[1]["x"], torch.full((2,), float(p.sigmas[1]), dtype=F64))
    assert (seen[1]["denoised"] - d1).abs().max() <= 1e-12


def test_model_kind_and_guidance_are_checked():
    gmm = digits_mixture()
    x = 80 * torch.randn(2, 64, dtype=F64)
    p = params_for(4, afs=True, model_kind="flow")
    with pytest.raises(ParamsMismatchError, match="flow"):
        sample_epd(gmm, x, p.sigmas, p)
    p = params_for(4, afs=True, guidance_scale=3.0)
    cfg = CFGDenoiser(labelled_model(), 2.0, {"class_labels": torch.tensor([3])})
    with pytest.raises(ParamsMismatchError, match="guidance"):
        sample_epd(cfg, x, p.sigmas, p, {"class_labels": torch.tensor([0, 1])})


def test_float32_sampling_tracks_float64():
    gmm = digits_mixture()
    x = 80 * torch.randn(4, 64, generator=torch.Generator().manual_seed(5), dtype=F64)
    p = params_for(5, afs=True)
    ref = sample_epd(gmm, x, p.sigmas, p)
    out = sample_epd(gmm, x.float(), p.sigmas.float(), p)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-3 * ref.abs().max()
