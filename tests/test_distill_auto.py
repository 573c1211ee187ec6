"""``--solver auto``: the candidates within a per-sample budget, the one kept, and the CLI.

Budgets are checked against the counts of ``make_config`` and, for the table returned, by sampling it with the
NFE counter (rounds and evaluations as the model sees them), not by reading its record."""

from __future__ import annotations

import json

import pytest
import torch

from epd_solver.distillation import make_config
from epd_solver.distillation.auto import AutoBudgetError, candidates_for, distill_auto
from epd_solver.epd import EPDParams, sample_epd
from epd_solver.problems.gmm import GaussianMixture


def mixture() -> GaussianMixture:
    """Two well-separated clusters in d = 4: an exact problem (closed-form end points) whose mode choice makes
    the learned families differ."""
    d = 4
    return GaussianMixture([0.4, 0.6], [[1.5, 0, 0, 0], [-1.5, 0.5, 0, 0]], torch.eye(d).expand(2, d, d).clone(),
                           [[0.05] * d, [0.1] * d], name="auto-test")


TINY = dict(trajectories=16, val_trajectories=8, lbfgs_rounds=2, lbfgs_iterations=3, budget="off", select_noises=16,
            schedule="time_uniform", init="deterministic", teacher_points=3, progress=False)


@pytest.mark.parametrize("kind,n", [("evaluations", 1), ("evaluations", 2), ("evaluations", 5), ("evaluations", 8),
                                    ("rounds", 1), ("rounds", 4), ("rounds", 5)])
@pytest.mark.parametrize("afs_allowed", [True, False])
def test_candidates_fit_the_budget_and_are_the_richest_of_their_family(kind, n, afs_allowed):
    cands = candidates_for(**{kind: n}, afs_allowed=afs_allowed)
    for c in cands:
        cfg = make_config(c.solver, c.nfe, k=c.k, afs=c.afs)
        assert (cfg.evaluations, cfg.nfe, cfg.k) == (c.evaluations, c.rounds, c.k)
        assert (cfg.evaluations if kind == "evaluations" else cfg.nfe) <= n
        assert afs_allowed or not cfg.afs
        # no setting of the same family (either AFS) spends more of the budget's unit within it
        for nfe in range(1, n + 1):
            for afs in (True, False):
                try:
                    other = make_config(c.solver, nfe, k=c.k, afs=afs)
                except ValueError:
                    continue
                if afs and not afs_allowed:
                    continue
                spent = other.evaluations if kind == "evaluations" else other.nfe
                mine = c.evaluations if kind == "evaluations" else c.rounds
                assert spent > n or spent <= mine, (c, nfe, afs)
    families = {(c.solver, c.k) for c in cands}
    assert len(families) == len(cands)
    if kind == "rounds":  # a round's branches are one batched call: EPD at K = 2 only
        assert ("epd", 1) not in families


def test_candidates_named_in_the_brief():
    labels = [c.label() for c in candidates_for(evaluations=5)]
    assert labels == ["lw at Para.NFE 5 (5 evaluations)", "epd K=2 at Para.NFE 3 (5 evaluations)",
                      "epd K=1 at Para.NFE 5 (5 evaluations)", "epd_lw K=2 at Para.NFE 3 (5 evaluations)"]
    labels = [c.label() for c in candidates_for(rounds=5)]
    assert labels == ["lw at Para.NFE 5 (5 evaluations)", "epd K=2 at Para.NFE 5 (8 evaluations)",
                      "epd_lw K=2 at Para.NFE 5 (8 evaluations)"]
    assert candidates_for(evaluations=1, afs_allowed=False) == []


@pytest.mark.parametrize("kwargs,match", [
    ({}, "needs a per-sample budget"), ({"evaluations": 5, "rounds": 5}, "not both"),
    ({"evaluations": 0}, "positive integer"), ({"rounds": 2.5}, "positive integer"),
    ({"evaluations": 5, "k": 3}, "chooses each candidate's k"), ({"rounds": 5, "nfe": 5}, "drop --nfe"),
])
def test_bad_budgets_are_named(kwargs, match):
    with pytest.raises(AutoBudgetError, match=match):
        candidates_for(**kwargs)


def _check_rmse(model, params):
    """The table's RMSE on the check set rebuilt here: its seeds and reference (DPM-Solver++(3M) on 21 polynomial
    rho 7 points), sampled by the public samplers."""
    from epd_solver.distillation.datasets import CHECK_SEED_BASE
    from epd_solver.distillation.noise import SeedRange, start_states
    from epd_solver.sampling import get_sampler
    from epd_solver.schedules import get_sigmas

    x = start_states(80.0, (4,), SeedRange(CHECK_SEED_BASE, TINY["select_noises"] // 2))
    y = get_sampler("dpmpp_3m")(model, x, get_sigmas("polynomial", 21, 0.002, 80.0, rho=7.0))
    return float((sample_epd(model, x, params.sigmas, params) - y).pow(2).mean().sqrt())


def _sampled(model, params):
    """(rounds, evaluations) per sample counted by the NFE counter while sampling the table."""
    x = 80.0 * torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, info = sample_epd(model, x, params.sigmas, params, return_info=True)
    return info.nfe.para_nfe, info.nfe.evaluations


@pytest.mark.parametrize("kind,n", [("evaluations", 5), ("rounds", 5)])
def test_distill_auto_keeps_the_lowest_check_error_within_the_budget(tmp_path, kind, n):
    model = mixture()
    lines = []
    p = distill_auto(model, **{kind: n}, cache_dir=tmp_path, log=lines.append, **TINY)
    rounds, evaluations = _sampled(model, p)
    assert (rounds, evaluations) == (p.nfe()["para_nfe"], p.nfe()["evaluations"])
    assert (evaluations if kind == "evaluations" else rounds) <= n
    a = p.meta["auto"]
    assert (a["budget"], a["n"], a["metric"]) == (kind, n, "check")
    rows = a["candidates"]
    assert [(r["solver"], r["k"], r["nfe"]) for r in rows] == \
        [(c.solver, c.k, c.nfe) for c in candidates_for(**{kind: n})]
    best = min(rows, key=lambda r: r["check_rmse"])
    assert best["chosen"] and sum(r["chosen"] for r in rows) == 1
    assert (p.solver, p.k, p.nfe()["para_nfe"]) == (best["solver"], best["k"], best["nfe"])
    # the recorded error is the winner's own check-set verdict, on the same noises as every candidate's
    assert best["check_rmse"] == p.meta["validation"]["check"]["student_rmse"]
    assert best["check_rmse"] == pytest.approx(_check_rmse(model, p), rel=1e-9)
    assert len({r["noises"] for r in rows}) == 1
    assert any(line.startswith("auto: chose ") and a["reason"] in line for line in lines)
    for r in rows:  # every candidate within the budget
        assert (r["evaluations"] if kind == "evaluations" else r["rounds"]) <= n
    q = EPDParams.load(p.save(tmp_path / "auto.safetensors"))
    assert q.meta["auto"] == json.loads(json.dumps(a))


# -- CLI ------------------------------------------------------------------------------------------------
def cli(*argv):
    from epd_solver.cli import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize("flags,match", [
    ([], "--solver auto needs a per-sample budget: --evaluations N"),
    (["--evaluations", 5, "--rounds", 5], "one per-sample budget, --evaluations N or --rounds N, not both"),
    (["--evaluations", 5, "--nfe", 5], "--nfe is not allowed with --solver auto"),
    (["--rounds", 5, "--k", 3], "--k is not allowed with --solver auto"),
    (["--rounds", 5, "--afs"], "--afs is not allowed with --solver auto"),
    (["--evaluations", 0], "--evaluations must be a positive integer"),
    (["--evaluations", 1, "--no-afs"], "no learned family fits 1 evaluations per sample"),
])
def test_cli_auto_errors_are_named(tmp_path, capsys, flags, match):
    out = tmp_path / "a.safetensors"
    assert cli("distill", "--model", "gmm:digits", "--solver", "auto", *flags, "--budget", "off", "--out", out) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_cli_budget_flags_belong_to_auto(tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    assert cli("distill", "--model", "gmm:digits", "--solver", "lw", "--evaluations", 5, "--out", out) == 2
    assert "--evaluations / --rounds are the per-sample budget of --solver auto" in capsys.readouterr().err


def test_cli_auto_writes_the_winner_and_sample_takes_its_solver(tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    tiny = ["--trajectories", 16, "--val-trajectories", 8, "--lbfgs-rounds", 2, "--lbfgs-iterations", 3,
            "--budget", "off", "--select-noises", 16, "--schedule", "time_uniform", "--init", "deterministic",
            "--teacher-points", 3, "--quiet", "--cache-dir", tmp_path / "c"]
    assert cli("distill", "--model", "gmm:digits", "--solver", "auto", "--rounds", 4, *tiny, "--allow-worse",
               "--out", out) == 0
    err = capsys.readouterr().err
    p = EPDParams.load(out)
    a = p.meta["auto"]
    assert a["budget"] == "rounds" and a["n"] == 4 and p.nfe()["para_nfe"] <= 4
    assert f"auto: chose {a['reason']}" in err
    winner = a["candidates"][a["chosen"]]
    assert winner["check_rmse"] == min(r["check_rmse"] for r in a["candidates"])
    assert not list(tmp_path.glob("a.safetensors.ckpt*"))  # every candidate's checkpoint removed once written
    samples = tmp_path / "s"
    assert cli("sample", "--model", "gmm:digits", "--params", out, "--seeds", "0-2", "--format", "npy",
               "--dtype", "float64", "--quiet", "--out", samples) == 0
    assert json.loads((samples / "sample.json").read_text())["solver"] == p.solver
    assert cli("sample", "--model", "gmm:digits", "--seeds", "0-2", "--out", tmp_path / "t") == 2
    assert "--solver is required (or --params FILE" in capsys.readouterr().err


def test_a_distillation_budget_that_sizes_the_candidates_apart_pins_one_check_set():
    """The default recipe's distillation budget gives lw (80 L-BFGS iterations a round) fewer trajectories, so a
    smaller selection and check set; the comparison pins every candidate to the largest (one seed range)."""
    from epd_solver.distillation.api import DistillRun
    from epd_solver.distillation.auto import _common_sets
    from epd_solver.problems import digits_mixture

    model, cands = digits_mixture(), candidates_for(evaluations=5)
    sizes = [DistillRun(model, c.solver, c.nfe, budget=700_000, cache=False, **c.options()).cfg.selection_noises
             for c in cands]
    assert len(set(sizes)) > 1
    assert _common_sets(model, cands, "default", {"budget": 700_000, "cache": False}) == \
        {"select_noises": max(sizes)}
    assert _common_sets(model, cands, "default", {"budget": 700_000, "cache": False, "select_noises": 64}) == {}
    assert _common_sets(model, cands, "default", {"budget": "off", "cache": False}) == {}


def test_without_a_check_set_the_validation_error_against_the_exact_end_point_decides(tmp_path):
    model = mixture()
    p = distill_auto(model, evaluations=3, cache_dir=tmp_path, **{**TINY, "select_noises": 0})
    a = p.meta["auto"]
    assert (a["metric"], a["reference"]) == ("validation", "exact")
    assert p.nfe()["evaluations"] <= 3 and _sampled(model, p)[1] <= 3
    best = min(a["candidates"], key=lambda r: r["validation_rmse"])
    assert best["chosen"] and best["validation_rmse"] == p.meta["validation"]["student_rmse_exact"]
