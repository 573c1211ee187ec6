"""Parameterisations of the EPD tables and the released worked example."""

import math

import pytest
import torch

from epd_solver.epd import EPDParams, EPDTables, branch_sigmas
from epd_solver.schedules import time_uniform

F64 = torch.float64
KINDS = ["ordered", "official", "paper"]


def make(kind, steps=4, k=2, **kw):
    return EPDTables(steps, k, kind, sigmas=time_uniform(steps + 1), **kw)


def scramble(tables, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tables.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=F64))
    return tables


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_deterministic_init(kind, k):
    r, lam, c, a = make(kind, k=k).natural()
    expected_r = torch.tensor([j / (k + 1) for j in range(1, k + 1)], dtype=F64)
    assert (r - expected_r).abs().max() <= 1e-15
    assert (lam - 1 / k).abs().max() <= 1e-15
    assert torch.equal(c, torch.ones(4, k, dtype=F64)) and torch.equal(a, torch.ones(4, k, dtype=F64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_end_init(kind, k):
    """init="end": every step but the last mostly at its end, the last near its start (documented values)."""
    r, lam, c, a = (v.detach() for v in make(kind, k=k, init="end").natural())
    if k == 1:
        inner, last, w_inner, w_last = [0.99], [0.25], [1.0], [1.0]
    else:
        inner = [0.5 + 0.49 * j / (k - 1) for j in range(k)]
        last = [0.01 + 0.24 * j / (k - 1) for j in range(k)]
        w_inner = [0.1 / (k - 1)] * (k - 1) + [0.9]
        w_last = [0.8] + [0.2 / (k - 1)] * (k - 1)
    for got, want in ((r[:-1], inner), (r[-1:], last), (lam[:-1], w_inner), (lam[-1:], w_last)):
        assert (got - torch.tensor(want, dtype=F64)).abs().max() <= 1e-12
    assert (c - 1).abs().max() <= 1e-12 and (a - 1).abs().max() <= 1e-12


def test_unknown_init_is_refused():
    from epd_solver.distillation import make_config

    with pytest.raises(ValueError, match="unknown init 'late'"):
        make("ordered", init="late")
    with pytest.raises(ValueError, match="init must be one of .*'end'.*got 'late'"):  # before any teacher runs
        make_config("epd", 5, init="late")
    assert make_config("epd", 5, init="end").init == "end"


def test_ordered_positions_strictly_increase():
    for seed, scale in ((0, 1.0), (1, 5.0), (2, 15.0)):
        r = scramble(make("ordered", steps=6, k=3), scale, seed).natural()[0]
        assert torch.all(r > 0) and torch.all(r < 1)
        assert torch.all(r[:, 1:] > r[:, :-1])


@pytest.mark.parametrize("kind", KINDS)
def test_bounds_hold(kind):
    tables = scramble(make(kind, steps=5, k=3, scale_dir=0.05, scale_time=0.1), 6.0, seed=1)
    r, lam, c, a = tables.natural()
    assert torch.all((r > 0) & (r < 1))
    assert torch.all(lam > 0) and (lam.sum(-1) - 1).abs().max() <= 1e-12
    assert torch.all((c > 0.95) & (c < 1.05)) and (c - 1).abs().max() > 0.03
    if kind == "paper":  # a = (t_{i+1}/t_i)^delta with |delta| < s_t: one direction scale per step
        grid = time_uniform(6)
        delta = a.log() / (grid[1:] / grid[:-1]).log()[:, None]
        assert torch.all(delta.abs() < 0.1) and delta.abs().max() > 0.05
        assert torch.equal(c, c[:, :1].expand_as(c))
    else:
        assert torch.all((a > 0.9) & (a < 1.1)) and (a - 1).abs().max() > 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_zero_scale_disables_the_factor(kind):
    tables = scramble(make(kind, scale_dir=0.0, scale_time=0.0), 3.0)
    _, _, c, a = tables.natural()
    assert torch.equal(c, torch.ones_like(c)) and torch.equal(a, torch.ones_like(a))


def test_paper_variant_parameter_count():
    for k in (1, 2, 3):
        tables = make("paper", steps=5, k=k)
        assert sum(p.numel() for p in tables.parameters()) == 5 * (1 + 3 * k)
    with pytest.raises(ValueError, match="sigmas"):
        EPDTables(4, 2, "paper")


def test_randn_init_is_reproducible_by_seed():
    a = EPDTables(4, 2, "official", init="randn", seed=0)
    b = EPDTables(4, 2, "official", init="randn", seed=0)
    c = EPDTables(4, 2, "official", init="randn", seed=1)
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name])
        assert not torch.equal(p, dict(c.named_parameters())[name])
    # documented draw order: one float64 generator, tables position, weight, direction, time
    g = torch.Generator().manual_seed(0)
    for name in ("position_logits", "weight_logits", "dir_logits", "time_logits"):
        assert torch.equal(getattr(a, name), torch.randn(4, 2, generator=g, dtype=F64))


@pytest.mark.parametrize("kind", KINDS)
def test_natural_values_invert(kind):
    src = scramble(make(kind, steps=4, k=3), 2.0, seed=4)
    with torch.no_grad():
        nat = src.natural()
    back = EPDTables.from_natural(*nat, kind=kind, sigmas=time_uniform(5))
    for u, v in zip(nat, back.natural()):
        assert (u - v).abs().max() <= 1e-12


def test_not_invertible_values_are_named():
    ones = torch.ones(2, 2, dtype=F64)
    half = torch.full((2, 2), 0.5, dtype=F64)
    r = torch.tensor([[0.2, 0.7], [0.3, 0.6]], dtype=F64)
    with pytest.raises(ValueError, match="open interval"):
        EPDTables.from_natural(torch.tensor([[0.0, 1.0]] * 2, dtype=F64), half, ones, ones)
    with pytest.raises(ValueError, match="distinct"):
        EPDTables.from_natural(torch.full((2, 2), 0.4, dtype=F64), half, ones, ones)
    with pytest.raises(ValueError, match="scale_dir"):
        EPDTables.from_natural(r, half, ones * 1.06, ones)
    with pytest.raises(ValueError, match="scale_time"):
        EPDTables.from_natural(r, half, ones, ones * 1.01, scale_time=0.0)
    with pytest.raises(ValueError, match="one direction scale"):
        EPDTables.from_natural(r, half, torch.tensor([[1.0, 1.01]] * 2, dtype=F64), ones, kind="paper",
                               sigmas=time_uniform(3))


# the paper: released CIFAR-10 table, Para.NFE 5 (values rounded to 3 decimals)
R = [[0.033, 0.796], [0.076, 0.632], [0.387, 0.094]]
LAM = [[0.869, 0.131], [0.417, 0.583], [0.224, 0.776]]
C = [[0.997, 0.986], [0.994, 1.007], [1.003, 1.000]]
A = [[0.954, 0.954], [1.045, 1.043], [0.956, 1.018]]
TAU = [[73.74, 11.45], [6.115, 2.392], [0.106, 0.700]]
A_TAU = [[70.36, 10.92], [6.391, 2.495], [0.101, 0.712]]
SUM_LAM_C = [0.996, 1.002, 1.001]


def _printed_half_unit(v):
    """Half a unit in the last digit of a value printed with 4 significant digits (3 decimals below 1)."""
    return 0.5 * 10 ** (math.floor(math.log10(v)) - 3) if v >= 1 else 0.0005


def test_worked_example_of_the_released_table():
    grid = time_uniform(4)
    assert torch.allclose(grid, torch.tensor([80.0, 6.9503, 1.2867, 0.002], dtype=F64), rtol=0, atol=1e-4)
    params = EPDParams.from_values(R, LAM, C, A, sigmas=grid, afs=True, scale_dir=0.05, scale_time=0.05)
    assert params.nfe()["para_nfe"] == 5 and params.nfe()["evaluations"] == 8
    for i in range(3):
        tau, a_tau = branch_sigmas(grid[i], grid[i + 1], params.r[i], params.time_scale[i])
        log_ratio = abs(math.log(float(grid[i + 1] / grid[i])))
        for k in range(2):
            # r is rounded to +-0.0005: tau moves by up to tau * |log ratio| * 0.0005
            for got, want in ((tau[k], TAU[i][k]), (a_tau[k], A_TAU[i][k])):
                tol = float(got) * (0.002 + 0.0005 * log_ratio) + _printed_half_unit(want)
                assert abs(float(got) - want) <= tol, (i, k, float(got), want)
        assert abs(float((params.weights[i] * params.dir_scale[i]).sum()) - SUM_LAM_C[i]) <= 1.5e-3
    # the official parameterisation reaches the table (every scale within 0.05 of 1) and gives it back
    tables = EPDTables.from_natural(R, LAM, C, A, kind="official", scale_dir=0.05, scale_time=0.05)
    for got, want in zip(tables.natural(), (R, LAM, C, A)):
        assert (got - torch.tensor(want, dtype=F64)).abs().max() <= 1e-12
    # ordered positions: the unordered step 2 is sorted jointly with its weights and scales
    ordered = EPDTables.from_natural(R, LAM, C, A, kind="ordered", scale_dir=0.05, scale_time=0.05)
    r, lam, c, a = ordered.natural()
    assert (r[2] - torch.tensor([0.094, 0.387], dtype=F64)).abs().max() <= 1e-12
    assert (lam[2] - torch.tensor([0.776, 0.224], dtype=F64)).abs().max() <= 1e-12
    assert (a[2] - torch.tensor([1.018, 0.956], dtype=F64)).abs().max() <= 1e-12
