"""The learned-weights family ("lw"): iPNDM at its init, the rollout against a loop written from the formula, its
parameter files (round trip, malformed files refused) and its NFE (one evaluation per step)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from epd_solver.contract import NFECounter
from epd_solver.epd import EPDParams, LWTables, ParamsError, ParamsFileError, lw_rollout, sample_epd, sample_lw
from epd_solver.problems import digits_mixture
from epd_solver.sampling import get_sampler
from epd_solver.schedules import get_sigmas

F64 = torch.float64
GRIDS = [("time_uniform", {}), ("polynomial", {"rho": 7.0}), ("logsnr", {})]


def grid(name, kw, n):
    return get_sigmas(name, n, 0.002, 80.0, **kw)


def noise(b=4, seed=0):
    return 80 * torch.randn(b, 64, generator=torch.Generator().manual_seed(seed), dtype=F64)


def lw_params(n, afs, order=4, init="deterministic", seed=0, scale_time=0.05, sigmas=None):
    sigmas = grid("time_uniform", {}, n) if sigmas is None else sigmas
    tables = LWTables(n - 1, order, scale_time, init, seed)
    return EPDParams.from_tables(tables, sigmas=sigmas, afs=afs, solver="lw", plugin_order=order)


@pytest.mark.parametrize("name,kw", GRIDS)
@pytest.mark.parametrize("afs", [False, True])
def test_untrained_tables_are_the_librarys_ipndm_to_the_bit(name, kw, afs):
    gmm = digits_mixture()
    x = noise()
    for n in (2, 4, 7):
        sig = grid(name, kw, n)
        for order in (1, 2, 3, 4):
            p = lw_params(n, afs, order, sigmas=sig)
            ours = sample_lw(gmm, x, sig, params=p)
            ipndm = get_sampler("ipndm")(gmm, x, sig, afs=afs, max_order=order)
            assert torch.equal(ours, ipndm), (n, order, (ours - ipndm).abs().max())


def reference(model, x, sigmas, w, a, afs):
    """x_{i+1} = x_i + (s_{i+1} - s_i) sum_j w[i][j] d_{i-j}, d_i = (x_i - D(x_i; a_i s_i)) / s_i, written from the
    formula with Python floats."""
    s, w, a = sigmas.tolist(), w.tolist(), [row[0] for row in a.tolist()]
    hist = []
    for i in range(len(s) - 1):
        if afs and i == 0:
            d = x / math.sqrt(1 + s[0] ** 2)
        else:
            d = (x - model(x, torch.full((x.shape[0],), a[i] * s[i], dtype=F64))) / s[i]
        hist.insert(0, d)
        step = torch.zeros_like(x)
        for j in range(min(i + 1, len(w[i]))):
            step = step + w[i][j] * hist[j]
        x = x + (s[i + 1] - s[i]) * step
    return x


@pytest.mark.parametrize("afs", [False, True])
def test_rollout_with_random_tables_equals_the_formula(afs):
    gmm = digits_mixture()
    x = noise(seed=1)
    for n, order, seed in ((3, 4, 0), (5, 2, 1), (7, 4, 2), (6, 3, 3)):
        sig = grid("polynomial", {"rho": 7.0}, n)
        p = lw_params(n, afs, order, "randn", seed, scale_time=0.2, sigmas=sig)
        w, a = p.values()
        assert torch.any(a != 1) and torch.any(w != LWTables(n - 1, order).natural()[0])
        ours = sample_lw(gmm, x, sig, params=p)
        ref = reference(gmm, x, sig, w, a, afs)
        assert (ours - ref).abs().max() <= 1e-12 * ref.abs().max()
        assert torch.equal(sample_epd(gmm, x, sig, p), ours)  # the file's solver kind picks the sampler


def test_rollout_is_differentiable_in_the_tables():
    gmm = digits_mixture()
    x = noise(2, seed=2)
    sig = grid("time_uniform", {}, 4)
    tables = LWTables(3, 4, 0.2, "randn", 5)

    def end(offsets, theta):  # LWTables.natural() at raw tables (offsets, theta)
        w = tables.base + tables.mask * offsets
        a = 1 + tables.scale_time * torch.tanh(theta / tables.scale_time)
        return lw_rollout(gmm, x, sig, w, a)

    inputs = tuple(v.detach().clone().requires_grad_() for v in (tables.weight_offsets, tables.time_logits))
    assert torch.autograd.gradcheck(end, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("afs", [False, True])
def test_one_evaluation_per_step(afs):
    gmm = digits_mixture()
    x = noise(3)
    for n in (3, 6, 9):
        p = lw_params(n, afs, init="randn", seed=n)
        counter = NFECounter(gmm, x.shape[0])
        calls = []
        sample_lw(counter, x, p.sigmas, None, lambda info: calls.append(info["i"]), params=p)
        assert (counter.rounds, counter.rows / x.shape[0]) == (n - 1 - afs, n - 1 - afs)
        assert calls == list(range(n - 1))
        assert (p.nfe()["para_nfe"], p.nfe()["evaluations"]) == (n - 1 - afs, n - 1 - afs)
        _, info = sample_lw(gmm, x, torch.cat([p.sigmas, torch.zeros(1, dtype=F64)]), params=p, return_info=True)
        assert (info.nfe.para_nfe, info.nfe.evaluations) == (n - afs, n - afs)  # + the step to sigma = 0


def test_file_round_trip(tmp_path):
    gmm = digits_mixture()
    p = lw_params(6, True, 3, "randn", 4)
    path = p.save(tmp_path / "lw.safetensors")
    q = EPDParams.load(path)
    assert (q.solver, q.k, q.plugin_order, q.parameterization, q.afs) == ("lw", 1, 3, "additive", True)
    assert set(q.extra) == {"history_weights"} and torch.equal(q.extra["history_weights"], p.extra["history_weights"])
    assert torch.equal(q.time_scale, p.time_scale) and q.nfe() == p.nfe()
    x = noise()
    assert torch.equal(sample_lw(gmm, x, q.sigmas, params=path), sample_lw(gmm, x, p.sigmas, params=p))
    t = q.to_tables()
    assert isinstance(t, LWTables) and all(torch.equal(u, v) for u, v in zip(t.natural(), q.values()))


def write(tmp_path, tensors, header, name="bad.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"epd_solver": json.dumps(header)})
    return path


def parts(p):
    tensors = {n: getattr(p, n) for n in ("r", "weights", "dir_scale", "time_scale", "sigmas")}
    tensors.update(p.extra)
    tensors.update({f"raw.{n}": v for n, v in p.raw.items()})
    return tensors, p.header()


@pytest.mark.parametrize("mutate,match", [
    (lambda t, h: t.update(history_weights=t["history_weights"][:, :2].clone()), "history_weights must have shape"),
    (lambda t, h: t["history_weights"].__setitem__((2, 0), float("nan")), "history_weights contains NaN"),
    (lambda t, h: t.update(extra_table=torch.zeros(3)), "unexpected tensors \\['extra_table'\\]"),
    (lambda t, h: t.pop("history_weights"), "missing tensors \\['history_weights'\\]"),
    (lambda t, h: t["history_weights"].__setitem__((0, 1), 0.5), "j > i"),
    (lambda t, h: t["r"].fill_(0.5), "K = 1, r = 0"),
    (lambda t, h: t["history_weights"].__setitem__((3, 1), 7.0), "raw tables do not reproduce the stored "
                                                                  "history_weights"),
    (lambda t, h: h.update(plugin_order=4), "history_weights must have shape"),
    (lambda t, h: h.update(parameterization="ordered"), "parameterization must be one of \\('additive', 'natural'\\)"),
    (lambda t, h: h.update(solver="epd"), "unexpected tensors \\['history_weights'\\]"),
])
def test_malformed_files_are_refused(tmp_path, mutate, match):
    tensors, header = parts(lw_params(6, True, 3, "randn", 4))
    tensors = {k: v.clone() for k, v in tensors.items()}
    mutate(tensors, header)
    with pytest.raises(ParamsFileError, match=match):
        EPDParams.load(write(tmp_path, tensors, header))


def test_natural_values_without_raw_tables():
    gmm = digits_mixture()
    p = lw_params(5, True, 3, "randn", 7)
    w, a = p.values()
    q = EPDParams.from_values([[0.0]] * 4, [[1.0]] * 4, None, a, sigmas=p.sigmas, afs=True, solver="lw",
                              plugin_order=3, extra={"history_weights": w})
    assert q.parameterization == "natural" and not q.raw
    x = noise()
    assert torch.equal(sample_lw(gmm, x, q.sigmas, params=q), sample_lw(gmm, x, p.sigmas, params=p))


def test_constructor_refuses_wrong_family_tensors():
    p = lw_params(4, False)
    with pytest.raises(ParamsError, match="stores the tensors \\['history_weights'\\]"):
        EPDParams(p.r, p.weights, p.dir_scale, p.time_scale, p.sigmas, solver="lw", plugin_order=4)
    with pytest.raises(ParamsError, match="stores the tensors \\[\\]"):
        EPDParams([[0.5]] * 3, [[1.0]] * 3, [[1.0]] * 3, [[1.0]] * 3, p.sigmas, extra=p.extra)


S = 0.5  # the toy data's standard deviation: N(0, S^2 I), whose ODE flow map is known in closed form


def gauss(x, sigma):
    return x * (S**2 / (S**2 + sigma[:, None] ** 2))


def test_distill_lw_trains_on_the_final_state_and_beats_its_ipndm_start(tmp_path):
    from epd_solver.distillation import distill, make_config
    from epd_solver.distillation.noise import SeedRange, trajectory_noise

    p = distill(gauss, "lw", 4, shape=(4,), sigma_min=0.002, sigma_max=80.0, afs=False, schedule="time_uniform",
                teacher_points=15, trajectories=16, batch=8, val_trajectories=8, lbfgs_rounds=2,
                lbfgs_iterations=10, compare=False, select_noises=0)
    assert (p.solver, p.k, p.steps, p.plugin_order, p.parameterization) == ("lw", 1, 4, 4, "additive")
    assert (p.nfe()["para_nfe"], p.nfe()["evaluations"]) == (4, 4)
    assert p.meta["config"]["loss"] == "final" and p.meta["config"]["optimizer"] == "lbfgs"
    x0 = 80.0 * trajectory_noise((4,), SeedRange(3 * 10**9, 64))  # unseen noises
    exact = x0 * math.sqrt((S**2 + 0.002**2) / (S**2 + 80.0**2))
    err = lambda out: float((out - exact).abs().max() / exact.abs().max())  # noqa: E731
    before = err(get_sampler("ipndm")(gauss, x0, p.sigmas))
    after = err(sample_lw(gauss, x0, p.sigmas, params=p))
    assert after < before / 10, (before, after)
    q = EPDParams.load(p.save(tmp_path / "lw.safetensors"))  # the record (meta.config) agrees with the file
    assert torch.equal(q.extra["history_weights"], p.extra["history_weights"])
    cfg = make_config("lw", 5)
    assert (cfg.k, cfg.scale_dir, cfg.n_points, cfg.evaluations) == (1, 0.0, 5 + cfg.afs + 1, 5)
    with pytest.raises(ValueError, match="default recipe only"):
        make_config("lw", 5, "official")
    with pytest.raises(ValueError, match="K = 1"):
        make_config("lw", 5, k=2)


def test_mutated_lw_files_are_refused_or_load_unchanged(tmp_path):
    """500 seeded mutations of an lw file (metadata values, tensor entries, header and data bytes): every one a
    ParamsFileError or a file whose header and values (history_weights included) are the original's."""
    import random

    import params_fuzz as fuzz

    source = lw_params(6, True, 3, "randn", 4).save(tmp_path / "lw.safetensors")
    data, ref, rng = source.read_bytes(), EPDParams.load(source), random.Random(20)
    path = tmp_path / "m.safetensors"
    counts = {"refused": 0, "loaded": 0}
    for _ in range(500):
        path.write_bytes(fuzz.mutate(data, rng))
        counts[fuzz.check_load(path, ref)] += 1
    assert counts["refused"] > 300 and counts["refused"] + counts["loaded"] == 500, counts


# -- EPD on the learned-weights host ("epd_lw") ----------------------------------------------------------------

def epd_lw_params(n, afs, k=2, order=4, seed=0, host_offsets=None):
    from epd_solver.epd import EPDLWTables

    sig = grid("polynomial", {"rho": 7.0}, n)
    tables = EPDLWTables(n - 1, k, init="randn", seed=seed, order=order, sigmas=sig)
    offsets = torch.zeros(n - 1, order, dtype=F64) if host_offsets is None else host_offsets * tables.host.mask
    tables.host.load_raw_({"weight_offsets": offsets, "time_logits": torch.zeros(n - 1, 1, dtype=F64)})
    return EPDParams.from_tables(tables, sigmas=sig, afs=afs, solver="epd_lw", plugin_order=order)


@pytest.mark.parametrize("afs", [False, True])
def test_epd_lw_at_the_host_init_is_epd_plugin(afs):
    gmm = digits_mixture()
    x = noise(seed=3)
    for n, order in ((3, 2), (5, 3), (6, 4)):
        p = epd_lw_params(n, afs, order=order, seed=n)
        plugin = EPDParams.from_values(p.r, p.weights, p.dir_scale, p.time_scale, sigmas=p.sigmas, afs=afs,
                                       solver="epd_plugin", plugin_order=order)
        ours, info = sample_epd(gmm, x, p.sigmas, p, return_info=True)
        ref = sample_epd(gmm, x, p.sigmas, plugin)
        assert (ours - ref).abs().max() <= 1e-13 * ref.abs().max()
        assert (info.nfe.para_nfe, info.nfe.evaluations) == (2 * (n - 1) - afs, 3 * (n - 1) - afs) \
            == (p.nfe()["para_nfe"], p.nfe()["evaluations"])


def test_epd_lw_with_random_host_weights_equals_the_formula():
    """Branch points along sum_j w[i][j] d_{i-j} (the history of base directions only), one EPD step each
    (``epd_step``, tested against hand-written steps in test_epd_step.py)."""
    from epd_solver.epd import epd_step

    gmm = digits_mixture()
    x0 = noise(seed=4)
    offsets = 0.3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    p = epd_lw_params(6, True, order=4, seed=2, host_offsets=offsets)
    w = p.extra["history_weights"].tolist()
    s = p.sigmas.tolist()
    x, hist = x0, []
    for i in range(5):
        if i == 0:
            d = x / math.sqrt(1 + s[0] ** 2)
        else:
            d = (x - gmm(x, torch.full((x.shape[0],), s[i], dtype=F64))) / s[i]
        hist.insert(0, d)
        direction = sum(w[i][j] * hist[j] for j in range(min(i + 1, 4)))
        x = epd_step(gmm, x, s[i], s[i + 1], p.r[i], p.weights[i], p.dir_scale[i], p.time_scale[i], direction)
    ours = sample_epd(gmm, x0, p.sigmas, p)
    assert (ours - x).abs().max() <= 1e-12 * x.abs().max()


def test_epd_lw_file_round_trip_and_refusals(tmp_path):
    p = epd_lw_params(5, False, order=3, host_offsets=torch.ones(4, 3, dtype=F64))
    q = EPDParams.load(p.save(tmp_path / "e.safetensors"))
    assert (q.solver, q.k, q.plugin_order) == ("epd_lw", 2, 3)
    assert all(torch.equal(u, v) for u, v in zip(q.values(), p.values())) and len(q.values()) == 5
    tensors, header = parts(p)
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["history_weights"] = tensors["history_weights"][:, :2].clone()
    with pytest.raises(ParamsFileError, match="history_weights must have shape"):
        EPDParams.load(write(tmp_path, tensors, header))


def test_distill_epd_lw(tmp_path):
    from epd_solver.distillation import distill

    p = distill(gauss, "epd_lw", 5, shape=(4,), sigma_min=0.002, sigma_max=80.0, schedule="time_uniform",
                teacher_points=7, trajectories=16, batch=8, val_trajectories=8, lbfgs_rounds=1, lbfgs_iterations=5,
                compare=False, select_noises=0)
    assert (p.solver, p.k, p.plugin_order, p.nfe()["para_nfe"], p.nfe()["evaluations"]) == ("epd_lw", 2, 4, 5, 8)
    q = EPDParams.load(p.save(tmp_path / "e.safetensors"))
    x = noise(seed=5)[:, :4]
    assert torch.equal(sample_epd(gauss, x, q.sigmas, q), sample_epd(gauss, x, p.sigmas, p))
