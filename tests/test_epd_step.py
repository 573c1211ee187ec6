"""EPD step, EPD-Plugin and AMED rollouts against k-diffusion, hand-written spec formulas and each other."""

import math

import pytest
import torch

from epd_solver.denoisers import Denoiser, FlowMatchDenoiser
from epd_solver.epd import EPDParams, EPDTables, amed_plugin_rollout, epd_step, rollout, sample_epd
from epd_solver.problems import digits_mixture
from epd_solver.schedules import polynomial, time_uniform
from oracles import kdiffusion_sampling

F64 = torch.float64
TOL = 1e-10


@pytest.fixture(scope="module")
def gmm():
    return digits_mixture()


@pytest.fixture(scope="module")
def x0():
    return 80 * torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=F64)


def random_tables(steps, k, seed, kind="official"):
    with torch.no_grad():
        return [v.detach().clone() for v in EPDTables(steps, k, kind, 0.05, 0.1, init="randn", seed=seed).natural()]


def ones(steps, k):
    return torch.ones(steps, k, dtype=F64)


def D(model, x, sigma):
    return model(x, torch.full((x.shape[0],), float(sigma), dtype=F64))


def ab(d, hist):
    """Hand-written Adams-Bashforth of the paper (hist: oldest first)."""
    q = 1 + len(hist)
    if q == 1:
        return d
    if q == 2:
        return (3 * d - hist[-1]) / 2
    if q == 3:
        return (23 * d - 16 * hist[-1] + 5 * hist[-2]) / 12
    return (55 * d - 59 * hist[-1] + 37 * hist[-2] - 9 * hist[-3]) / 24


# -- reductions to k-diffusion ---------------------------------------------------------------

@pytest.mark.parametrize("grid", [polynomial(5), time_uniform(5)], ids=["polynomial", "time_uniform"])
def test_reductions_to_kdiffusion(gmm, x0, grid):
    kd = kdiffusion_sampling()
    s = grid.numel() - 1
    cases = [
        (torch.zeros(s, 1), torch.ones(s, 1), kd.sample_euler),
        (torch.full((s, 1), 0.5), torch.ones(s, 1), kd.sample_dpm_2),
        (torch.tensor([[0.0, 1.0]] * s), torch.full((s, 2), 0.5), kd.sample_heun),
    ]
    for r, lam, ref_fn in cases:
        ref = ref_fn(gmm, x0, grid, s_churn=0.0)
        out = sample_epd(gmm, x0, grid, EPDParams.from_values(r, lam, sigmas=grid))
        assert (out - ref).abs().max() <= TOL, ref_fn.__name__
        assert ref.abs().max() > 0.5  # a real trajectory, not a collapse to 0


def test_afs_first_step_then_kdiffusion(gmm, x0):
    """AFS replaces d_0: hand-computed first DPM-2 step with d_0 = x/sqrt(1+t0^2), then k-diffusion."""
    grid = polynomial(5)
    t0, t1 = grid[0], grid[1]
    d0 = x0 / math.sqrt(1 + float(t0) ** 2)
    mid = math.sqrt(float(t0) * float(t1))
    u = x0 + (mid - t0) * d0
    x1 = x0 + (t1 - t0) * (u - D(gmm, u, mid)) / mid
    ref = kdiffusion_sampling().sample_dpm_2(gmm, x1, grid[1:])
    params = EPDParams.from_values(torch.full((4, 1), 0.5), torch.ones(4, 1), sigmas=grid, afs=True)
    out, info = sample_epd(gmm, x0, grid, params, return_info=True)
    assert (out - ref).abs().max() <= TOL
    assert info.nfe.para_nfe == 7 and info.nfe.evaluations == 7


# -- the step formula by hand ---------------------------------------------------------------

def test_one_step_equals_spec_formula(gmm):
    grid = polynomial(5)
    t1, t2 = float(grid[1]), float(grid[2])
    g = torch.Generator().manual_seed(3)
    x = gmm.means[:4] + t1 * torch.randn(4, 64, generator=g, dtype=F64)
    r, lam = [0.2, 0.7, 0.45], [0.3, 0.5, 0.2]
    c, a = [1.02, 0.97, 1.01], [0.95, 1.04, 1.0]
    d = (x - D(gmm, x, t1)) / t1
    acc = torch.zeros_like(x)
    for rk, lk, ck, ak in zip(r, lam, c, a):
        tau = math.exp((1 - rk) * math.log(t1) + rk * math.log(t2))
        xk = x + (tau - t1) * d
        gk = (xk - D(gmm, xk, ak * tau)) / tau
        acc = acc + lk * ck * gk
    expected = x + (t2 - t1) * acc
    for strategy in ("batched", "sequential"):
        out = epd_step(gmm, x, t1, t2, *(torch.tensor(v, dtype=F64) for v in (r, lam, c, a)), d, strategy=strategy)
        assert (out - expected).abs().max() <= TOL
        assert (epd_step(gmm, x, t1, t2, r, lam, c, a, d, strategy=strategy) - expected).abs().max() <= TOL
    tables = [torch.tensor([v], dtype=F64) for v in (r, lam, c, a)]
    assert (rollout(gmm, x, grid[1:3], *tables) - expected).abs().max() <= TOL


def test_epd_step_rejects_bad_input(gmm):
    x = torch.randn(2, 64, dtype=F64)
    row = torch.tensor([0.5])
    with pytest.raises(ValueError, match="strategy"):
        epd_step(gmm, x, 2.0, 1.0, row, row * 2, row * 2, row * 2, x, strategy="parallel")
    with pytest.raises(ValueError, match="same length"):
        epd_step(gmm, x, 2.0, 1.0, torch.tensor([0.2, 0.8]), row * 2, row * 2, row * 2, x)
    with pytest.raises(ValueError, match="direction"):
        epd_step(gmm, x, 2.0, 1.0, row, row * 2, row * 2, row * 2, x[:1])
    with pytest.raises(ValueError, match="positive"):
        epd_step(gmm, x, 2.0, 0.0, row, row * 2, row * 2, row * 2, x)
    grid = polynomial(4)
    with pytest.raises(ValueError, match="shape"):
        rollout(gmm, x, grid, torch.rand(2, 2), *[torch.ones(3, 2)] * 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rollout(gmm, x, grid, torch.full((3, 1), 1.5), *[torch.ones(3, 1)] * 3)
    with pytest.raises(ValueError, match="trailing 0"):
        rollout(gmm, x, torch.cat([grid, torch.zeros(1, dtype=F64)]), *[torch.ones(4, 1)] * 4)


# -- symmetries and self-consistency --------------------------------------------------------------------

def test_permuting_branches_jointly_changes_nothing(gmm, x0):
    grid = time_uniform(5)
    r, lam, c, a = random_tables(4, 3, seed=5)
    perm = torch.tensor([2, 0, 1])
    base = rollout(gmm, x0, grid, r, lam, c, a, afs=True)
    permuted = rollout(gmm, x0, grid, r[:, perm], lam[:, perm], c[:, perm], a[:, perm], afs=True)
    assert (base - permuted).abs().max() <= TOL
    other = rollout(gmm, x0, grid, r[:, perm], lam, c, a, afs=True)  # positions alone do matter
    assert (base - other).abs().max() > 1e-3


def test_equal_positions_collapse_to_one_branch(gmm, x0):
    grid = polynomial(5)
    r1 = torch.tensor([[0.3], [0.6], [0.1], [0.8]], dtype=F64)
    lam2 = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.35, 0.65]], dtype=F64)
    one = rollout(gmm, x0, grid, r1, ones(4, 1), ones(4, 1), ones(4, 1))
    two = rollout(gmm, x0, grid, r1.expand(4, 2), lam2, ones(4, 2), ones(4, 2))
    assert (one - two).abs().max() <= TOL


def test_plugin_with_order_one_is_epd(gmm, x0):
    grid = time_uniform(6)
    tables = random_tables(5, 2, seed=2)
    epd = sample_epd(gmm, x0, grid, EPDParams.from_values(*tables, sigmas=grid, afs=True))
    plug = sample_epd(gmm, x0, grid, EPDParams.from_values(*tables, sigmas=grid, afs=True, plugin_order=1))
    assert (epd - plug).abs().max() <= TOL
    plug3 = rollout(gmm, x0, grid, *tables, afs=True, plugin_order=3)
    assert (epd - plug3).abs().max() > 1e-3  # the AB direction does move the branch points


def test_plugin_steps_follow_adams_bashforth_by_hand(gmm, x0):
    """the paper at i = 2 (q = 3) and i = 3 (q = 4): branch points along AB of the base directions."""
    grid = time_uniform(6)
    r, lam, c, a = random_tables(5, 2, seed=7)
    _, states = rollout(gmm, x0, grid, r, lam, c, a, afs=True, plugin_order=4, return_states=True)
    xs = [x0] + states
    ds = [x0 / math.sqrt(1 + float(grid[0]) ** 2)]  # AFS value is the first history entry
    ds += [(xs[i] - D(gmm, xs[i], grid[i])) / grid[i] for i in (1, 2, 3)]
    for i in (2, 3):
        t, tn = float(grid[i]), float(grid[i + 1])
        b = ab(ds[i], ds[:i])
        acc = 0
        for k in range(2):
            tau = t ** (1 - float(r[i, k])) * tn ** float(r[i, k])
            xk = xs[i] + (tau - t) * b
            acc = acc + lam[i, k] * c[i, k] * (xk - D(gmm, xk, a[i, k] * tau)) / tau
        assert (xs[i] + (tn - t) * acc - xs[i + 1]).abs().max() <= TOL


def test_amed_solver_is_the_k1_step(gmm, x0):
    """AMED-Solver: x + c (t - s) d(x~, a s_mid) with divisor s_mid; AFS at step 0."""
    grid = time_uniform(5)
    r = torch.tensor([[0.05], [0.4], [0.6], [0.3]], dtype=F64)
    c = torch.tensor([[1.01], [0.99], [1.0], [1.005]], dtype=F64)
    a = torch.tensor([[0.9], [1.1], [1.0], [0.97]], dtype=F64)
    x = x0
    for i in range(4):
        s, t = float(grid[i]), float(grid[i + 1])
        d = x / math.sqrt(1 + s * s) if i == 0 else (x - D(gmm, x, s)) / s
        mid = s ** (1 - float(r[i, 0])) * t ** float(r[i, 0])
        u = x + (mid - s) * d
        x = x + float(c[i, 0]) * (t - s) * (u - D(gmm, u, float(a[i, 0]) * mid)) / mid
    params = EPDParams.from_values(r, ones(4, 1), c, a, sigmas=grid, afs=True, solver="amed")
    assert (sample_epd(gmm, x0, grid, params) - x).abs().max() <= TOL


def test_amed_plugin_by_hand(gmm, x0):
    """AMED-Plugin over iPNDM (max order 4): one AB history through grid and inserted points."""
    grid = polynomial(5)
    r = torch.tensor([[0.5], [0.3], [0.7], [0.45]], dtype=F64)
    c = torch.tensor([[1.01], [0.99], [1.003], [0.995]], dtype=F64)
    a = torch.tensor([[1.0], [1.1], [0.9], [1.05]], dtype=F64)
    x, hist = x0, []
    for i in range(4):
        s, t = float(grid[i]), float(grid[i + 1])
        d = x / math.sqrt(1 + s * s) if i == 0 else (x - D(gmm, x, s)) / s
        mid = s ** (1 - float(r[i, 0])) * t ** float(r[i, 0])
        x_mid = x + (mid - s) * ab(d, hist[-3:])
        hist.append(d)
        d_mid = (x_mid - D(gmm, x_mid, float(a[i, 0]) * mid)) / mid
        x = x_mid + float(c[i, 0]) * (t - mid) * ab(d_mid, hist[-3:])
        hist.append(d_mid)
    params = EPDParams.from_values(r, ones(4, 1), c, a, sigmas=grid, afs=True, solver="amed_plugin", plugin_order=4)
    out, info = sample_epd(gmm, x0, grid, params, return_info=True)
    assert (out - x).abs().max() <= TOL
    assert (info.nfe.para_nfe, info.nfe.evaluations) == (7, 7)
    with pytest.raises(ValueError, match="K = 1"):
        amed_plugin_rollout(gmm, x0, grid, *random_tables(4, 2, seed=0))


# -- conditioning: batched == sequential == one sample at a time -------------------------

class CondDenoiser(Denoiser):
    """Posterior mean of N(m(cond), I) data plus a nonlinearity; m depends on labels and text per row."""

    kind = "edm"

    def __init__(self, dim=6, classes=5, emb=4):
        super().__init__(0.002, 80.0, "cond-test")
        g = torch.Generator().manual_seed(11)
        self.class_means = torch.randn(classes, dim, generator=g, dtype=F64)
        self.text_proj = torch.randn(emb, dim, generator=g, dtype=F64)
        self.pooled_proj = torch.randn(emb, dim, generator=g, dtype=F64)

    def denoise(self, x, sigma, class_labels=None, encoder_hidden_states=None, added_cond_kwargs=None):
        n = x.shape[0]
        m = torch.zeros_like(x)
        if class_labels is not None:
            assert class_labels.shape == (n,), "labels must come one per row"
            m = m + self.class_means[class_labels]
        if encoder_hidden_states is not None:
            assert encoder_hidden_states.shape[0] == n
            m = m + torch.tanh(encoder_hidden_states.mean(1)) @ self.text_proj
        if added_cond_kwargs is not None:
            pooled = added_cond_kwargs["text_embeds"]
            assert pooled.shape[0] == n
            m = m + torch.sin(pooled) @ self.pooled_proj
        s2 = sigma[:, None] ** 2
        return (x + s2 * m) / (1 + s2) + 0.05 * torch.tanh(x) * sigma[:, None] / (1 + s2)


def _conditions(b):
    g = torch.Generator().manual_seed(4)
    labels = {"class_labels": torch.tensor([3, 0, 4][:b])}
    text = {"encoder_hidden_states": torch.randn(b, 7, 4, generator=g, dtype=F64),
            "added_cond_kwargs": {"text_embeds": torch.randn(b, 4, generator=g, dtype=F64)}}
    return {"labels": labels, "text": text}


def _rows(cond, i):
    return {k: _rows(v, i) if isinstance(v, dict) else v[i: i + 1] for k, v in cond.items()}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", ["labels", "text"])
@pytest.mark.parametrize("plugin_order", [None, 3])
def test_batched_equals_sequential_with_conditioning(k, kind, plugin_order):
    model = CondDenoiser()
    grid = polynomial(5)
    b = 3
    x = 80 * torch.randn(b, 6, generator=torch.Generator().manual_seed(k), dtype=F64)
    cond = _conditions(b)[kind]
    tables = random_tables(4, k, seed=k)
    kw = dict(afs=True, plugin_order=plugin_order, extra_args=cond)
    batched = rollout(model, x, grid, *tables, strategy="batched", **kw)
    sequential = rollout(model, x, grid, *tables, strategy="sequential", **kw)
    assert (batched - sequential).abs().max() <= TOL
    for i in range(b):  # each row must have seen its own conditioning
        alone = rollout(model, x[i: i + 1], grid, *tables, afs=True, plugin_order=plugin_order,
                        extra_args=_rows(cond, i))
        assert (batched[i: i + 1] - alone).abs().max() <= TOL
    unconditional = rollout(model, x, grid, *tables, afs=True, plugin_order=plugin_order)
    assert (batched - unconditional).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["batched", "sequential"])
def test_wrong_size_conditioning_is_refused(strategy):
    model = CondDenoiser()
    grid = polynomial(4)
    x = torch.randn(3, 6, dtype=F64)
    tables = random_tables(3, 2, seed=0)
    with pytest.raises(ValueError, match="class_labels"):
        rollout(model, x, grid, *tables, extra_args={"class_labels": torch.tensor([0, 1])}, strategy=strategy)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        rollout(model, x, grid, *tables, extra_args={"encoder_hidden_states": torch.zeros(4, 7, 4, dtype=F64)},
                strategy=strategy)


# -- AFS guard and gradients ----------------------------------------------------------------------------

def test_afs_refused_for_flow_matching():
    flow = FlowMatchDenoiser(lambda x, t: 0.5 * x, time_scale=1000.0)
    grid = torch.linspace(1.0, 0.01, 4, dtype=F64)
    x = torch.randn(2, 5, dtype=F64)
    tables = [torch.full((3, 1), 0.5, dtype=F64)] + [ones(3, 1)] * 3
    with pytest.raises(ValueError, match="flow"):
        rollout(flow, x, grid, *tables, afs=True)
    with pytest.raises(ValueError, match="flow"):
        sample_epd(flow, x, grid, EPDParams.from_values(tables[0], tables[1], sigmas=grid, afs=True))
    assert torch.isfinite(rollout(flow, x, grid, *tables, afs=False)).all()


@pytest.mark.parametrize("which", ["epd", "amed_plugin"])
def test_rollout_gradients_match_finite_differences(gmm, which):
    grid = time_uniform(4)
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(9), dtype=F64)
    k = 2 if which == "epd" else 1
    tables = EPDTables(3, k, "ordered", 0.05, 0.05, init="randn", seed=1)
    target = gmm.means[:2]
    run = rollout if which == "epd" else amed_plugin_rollout
    order = 3 if which == "epd" else 4

    def loss(x=x):
        return ((run(gmm, x, grid, *tables.natural(), afs=True, plugin_order=order) - target) ** 2).sum()

    xg = x.clone().requires_grad_(True)
    value = loss(xg)
    value.backward()
    eps = 1e-4
    unit = torch.zeros_like(x)
    unit[1, 5] = eps
    with torch.no_grad():
        fd = (loss(x + unit) - loss(x - unit)) / (2 * eps)
    assert abs(float(xg.grad[1, 5]) - float(fd)) <= 1e-5 * max(1.0, abs(float(fd)))
    for name, idx in (("position_logits", (1, 0)), ("weight_logits", (2, 0)), ("dir_logits", (0, 0)),
                      ("time_logits", (1, 0))):
        p = getattr(tables, name)
        assert p.grad is not None and torch.isfinite(p.grad).all()
        eps = 1e-5
        with torch.no_grad():
            p[idx] += eps
            up = loss()
            p[idx] -= 2 * eps
            down = loss()
            p[idx] += eps
        fd = (up - down) / (2 * eps)
        assert abs(float(p.grad[idx]) - float(fd)) <= 1e-5 * max(1.0, abs(float(fd))), name
