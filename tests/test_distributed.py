"""torch.distributed helpers: seeds, partitions, per-seed noise, and 2-process gloo runs of the statistic
reduction and branch-parallel (row-parallel) sampling, checked against single-process computations."""

import os

import numpy as np
import pytest
import torch
from gloo import run_ranks

from epd_solver import distributed as du
from epd_solver.denoisers import CFGDenoiser, as_denoiser
from epd_solver.epd import EPDParams, sample_epd
from epd_solver.metrics import FeatureStats, frechet_distance
from epd_solver.problems import digits_mixture
from epd_solver.sampling import get_sampler
from epd_solver.schedules import polynomial

F64 = torch.float64


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -- single-process pieces ---------------------------------------------------------------------------------

def test_parse_seeds():
    assert du.parse_seeds("0-3, 10 ,12-13") == [0, 1, 2, 3, 10, 12, 13]
    assert du.parse_seeds("7") == [7] and du.parse_seeds([4, 2]) == [4, 2]
    assert len(du.parse_seeds("0-49999")) == 50000
    for bad, what in [("5-3", "reversed"), ("0-3,2", "more than once"), ("-1", "bad seed"), ("a", "bad seed"),
                      ("", "empty"), ("1,,2", "bad seed"), ([1.5], "integers"), (str(2**63), "must lie")]:
        with pytest.raises(ValueError, match=what):
            du.parse_seeds(bad)
    assert du.format_seeds(du.parse_seeds("0-3,10,12-13")) == "0-3,10,12-13"


@pytest.mark.parametrize("n,batch,world", [(64, 8, 1), (64, 8, 2), (64, 64, 2), (21, 8, 2), (3, 8, 2), (100, 7, 3)])
def test_partition_follows_edm_tensor_split(n, batch, world):
    seeds = list(range(1000, 1000 + n))
    # EDM generate.py: tensor_split into ceil(n / (batch W)) W batches, rank r takes r, r + W, ...
    splits = torch.as_tensor(seeds).tensor_split(-(-n // (batch * world)) * world)
    for r in range(world):
        mine = du.partition_seeds(seeds, batch, world, r)
        assert mine == [t.tolist() for t in splits[r::world] if len(t)]
        assert all(1 <= len(b) <= batch for b in mine)
    assert sorted(s for r in range(world) for b in du.partition_seeds(seeds, batch, world, r) for s in b) == seeds
    with pytest.raises(ValueError, match="batch"):
        du.partition_seeds(seeds, 0, world, 0)


def test_noise_depends_only_on_the_seed():
    shape = (1, 3, 2)
    both = du.noise_for_seeds([5, 3], shape, F64)
    assert both.shape == (2, 1, 3, 2) and both.dtype == F64
    assert torch.equal(both[0], du.noise_for_seeds([5], shape, F64)[0])
    assert torch.equal(both[1], du.noise_for_seeds([9, 3, 4], shape, F64)[1])
    # EDM's StackedRandomGenerator: row i is randn from a generator seeded with seed i.
    assert torch.equal(both[1], torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64))
    assert not torch.equal(both[0], both[1])
    with pytest.raises(ValueError):
        du.noise_for_seeds([0], (0, 2))


def test_row_split():
    assert du.row_split(15, 2) == [8, 7] and du.row_split(2, 4) == [1, 1, 0, 0] and du.row_split(0, 2) == [0, 0]
    assert all(sum(du.row_split(r, w)) == r for r in range(20) for w in range(1, 5))


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert du.init("cpu") == torch.device("cpu")
    assert not du.is_initialized() and du.rank() == 0 and du.world_size() == 1 and du.is_main()
    with du.rank0_first():
        pass
    gm = digits_mixture()
    x = torch.randn(4, 64, dtype=F64, generator=torch.Generator().manual_seed(0))
    wrapped = du.RowParallelDenoiser(gm)
    assert torch.equal(wrapped(x, torch.full((4,), 2.0, dtype=F64)), gm(x, torch.full((4,), 2.0, dtype=F64)))
    assert wrapped.collectives == 0 and wrapped.sigma_max == gm.sigma_max


def test_init_rejects_an_incomplete_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        du.init("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        du.init("cpu")
    assert not du.is_initialized()


# -- 2-process gloo runs -------------------------------------------------------------------------------------

SPLITS = {"uneven": (37, 63), "one_empty": (100, 0)}


def features() -> np.ndarray:
    rng = np.random.default_rng(11)
    return 3.0 + rng.standard_normal((100, 6)) @ rng.standard_normal((6, 6))


def epd_cases():
    """(name, params, batch): K = 3 with B = 5 gives calls of 5 and 15 rows (uneven splits 3/2, 8/7)."""
    sig = polynomial(5, 0.002, 80.0)
    r = [[0.2, 0.5, 0.8], [0.1, 0.45, 0.9], [0.3, 0.6, 0.7], [0.25, 0.5, 0.75]]
    lam = [[0.2, 0.3, 0.5], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]]
    c = [[1.02, 0.98, 1.0], [1.0, 1.03, 0.97], [0.99, 1.0, 1.01], [1.0, 1.0, 1.04]]
    a = [[0.97, 1.0, 1.02], [1.01, 0.99, 1.0], [1.0, 1.03, 0.98], [1.0, 1.0, 1.0]]
    epd = EPDParams.from_values(r, lam, c, a, sigmas=sig)
    sig4 = polynomial(4, 0.002, 80.0)
    plugin = EPDParams.from_values([[0.3, 0.7]] * 3, [[0.4, 0.6]] * 3, sigmas=sig4, afs=True, plugin_order=3)
    return [("epd", epd, 5), ("epd_plugin", plugin, 3)]


class RowCounter:
    """The mixture denoiser, recording the rows of each call it receives."""

    def __init__(self, model):
        self.model, self.rows = model, []
        self.sigma_min, self.sigma_max = model.sigma_min, model.sigma_max

    def __call__(self, x, sigma, **cond):
        self.rows.append(x.shape[0])
        return self.model(x, sigma, **cond)


def labelled(gm):
    """A conditional denoiser: the mixture's estimate scaled by 1 + label / 10 (per row)."""
    return as_denoiser(lambda x, sigma, label: gm(x, sigma) * (1 + label[:, None] / 10), 0.002, 80.0, "labelled")


def cfg_inputs():
    x = 80 * torch.randn(3, 64, dtype=F64, generator=torch.Generator().manual_seed(7))
    return x, {"label": torch.tensor([1.0, 2.0, 3.0], dtype=F64)}, polynomial(4, 0.002, 80.0)


def _worker(rank: int, out: str) -> dict:
    results = {"rank": du.rank(), "world": du.world_size()}
    marker = os.path.join(out, "made_by_rank0")
    with du.rank0_first():  # rank 1 enters only after rank 0 has left the block
        results["marker_seen"] = os.path.exists(marker)
        if rank == 0:
            open(marker, "w").close()
    results["from_rank0"] = du.broadcast_object(f"hello from {rank}")
    f = features()
    for name, (n0, _) in SPLITS.items():
        part = f[:n0] if rank == 0 else f[n0:]
        stats = FeatureStats()
        if len(part):
            stats.update(part)
        stats.all_reduce()
        results[f"stats_{name}"] = (stats.n, stats.mean(), stats.cov())
    gm = digits_mixture()
    for name, params, b in epd_cases():
        x = 80 * torch.randn(b, 64, dtype=F64, generator=torch.Generator().manual_seed(b))
        counter = RowCounter(gm)
        model = du.RowParallelDenoiser(counter)
        y, info = sample_epd(model, x, params.sigmas, params, disable=True, return_info=True)
        results[f"epd_{name}"] = (y, info.nfe.para_nfe, info.nfe.evaluations, model.collectives, counter.rows)
    x, cond, sig = cfg_inputs()
    euler = get_sampler("euler")
    uncond = {"label": torch.tensor(0.0, dtype=F64)}
    outer = du.RowParallelDenoiser(CFGDenoiser(labelled(gm), 2.5, uncond))
    results["cfg_outer"] = (euler(outer, x, sig, cond, None, True), outer.collectives)
    inner = du.RowParallelDenoiser(labelled(gm))
    results["cfg_inner"] = (euler(CFGDenoiser(inner, 2.5, uncond), x, sig, cond, None, True), inner.collectives)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dist"))


def test_two_processes_joined(two_ranks):
    assert [(r["rank"], r["world"]) for r in two_ranks] == [(0, 2), (1, 2)]
    assert [r["marker_seen"] for r in two_ranks] == [False, True]  # rank 0 went first
    assert [r["from_rank0"] for r in two_ranks] == ["hello from 0"] * 2


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_feature_stats_all_reduce_equals_single_process(two_ranks, split):
    f = features()
    single = FeatureStats().update(f)
    mu_np, cov_np = f.mean(0), np.cov(f, rowvar=False)
    ref = (np.zeros(6), np.eye(6))
    for r in two_ranks:
        n, mu, cov = r[f"stats_{split}"]
        assert n == 100
        assert rel(mu, single.mean()) <= 1e-12 and rel(cov, single.cov()) <= 1e-12
        assert rel(mu, mu_np) <= 1e-12 and rel(cov, cov_np) <= 1e-12
        fd = frechet_distance(mu, cov, *ref)
        assert abs(fd - frechet_distance(mu_np, cov_np, *ref)) <= 1e-12 * fd


@pytest.mark.parametrize("case", [0, 1])
def test_branch_parallel_epd_equals_single_process_batched(two_ranks, case):
    name, params, b = epd_cases()[case]
    x = 80 * torch.randn(b, 64, dtype=F64, generator=torch.Generator().manual_seed(b))
    counter = RowCounter(digits_mixture())
    single, info = sample_epd(counter, x, params.sigmas, params, return_info=True)
    outs = [r[f"epd_{name}"] for r in two_ranks]
    for y, para, evals, collectives, rows in outs:
        assert rel(y, single) <= 1e-10
        assert (para, evals) == (info.nfe.para_nfe, info.nfe.evaluations)
        assert collectives == para  # one all_gather per sequential round
    assert torch.equal(outs[0][0], outs[1][0])  # every rank holds the same result
    # The work is split: rank r evaluated its row_split share of each single-process call.
    for r, (_, _, _, _, rows) in enumerate(outs):
        assert rows == [du.row_split(n, 2)[r] for n in counter.rows if du.row_split(n, 2)[r]]
    k = params.k
    assert max(counter.rows) == b * k


@pytest.mark.parametrize("where", ["cfg_outer", "cfg_inner"])
def test_row_parallel_under_classifier_free_guidance(two_ranks, where):
    x, cond, sig = cfg_inputs()
    gm = digits_mixture()
    single = get_sampler("euler")(CFGDenoiser(labelled(gm), 2.5, {"label": torch.tensor(0.0, dtype=F64)}),
                                  x, sig, cond)
    for r in two_ranks:
        y, collectives = r[where]
        assert rel(y, single) <= 1e-10
        assert collectives == len(sig) - 1  # one per Euler step, wrapped outside or inside the CFG adapter
