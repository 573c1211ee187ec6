"""`epd demo --conditional` at tiny sizes: its table against an independent recomputation with k-diffusion."""

import json
import math

import pytest
import torch
from oracles import kdiffusion_sampling

from epd_solver.commands.demo_conditional import NOISE_SEED_BASE, demo_conditional
from epd_solver.models import load_cond_model

TINY = dict(schedule="time_uniform", init="deterministic", select_noises=0, trajectories=8, lbfgs_rounds=1,
            lbfgs_iterations=2, val_trajectories=10, compare=False)
SCALE, PER_CLASS, REF_STEPS = 2.0, 2, 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo-cond")
    result = demo_conditional(out, nfe=5, scale=SCALE, per_class=PER_CLASS, ref_steps=REF_STEPS,
                              distill_options=TINY)
    return out, result


def _kdiff_cfg(model, labels):
    """CFG written out by hand around the raw conditional U-Net: D_u + w (D_c - D_u), two separate calls."""
    null = torch.full_like(labels, 10)

    def den(x, sigma):
        d_u = model(x, sigma, class_labels=null)
        d_c = model(x, sigma, class_labels=labels)
        return d_u + SCALE * (d_c - d_u)

    return den


def test_table_row_matches_k_diffusion(demo):
    k_sampling = kdiffusion_sampling()
    out, result = demo
    model = load_cond_model()
    g = torch.Generator().manual_seed(NOISE_SEED_BASE)
    z = torch.randn((PER_CLASS, 1, 8, 8), generator=g, dtype=torch.float64)
    x0 = 80.0 * z.repeat(10, 1, 1, 1)
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    den = _kdiff_cfg(model, labels)
    ref_sig = k_sampling.get_sigmas_karras(REF_STEPS + 1, 0.002, 80.0, rho=7.0, device="cpu")[:-1].double()
    row = next(r for r in result["rows"] if r["solver"] == "euler")
    assert row["setting"]["schedule"] == "polynomial" and row["setting"]["knobs"] == {"afs": False}
    sig = k_sampling.get_sigmas_karras(row["setting"]["n_points"], 0.002, 80.0, rho=7.0, device="cpu")[:-1].double()
    with torch.no_grad():
        ref = k_sampling.sample_heun(den, x0.clone(), ref_sig, disable=True)
        euler = k_sampling.sample_euler(den, x0.clone(), sig, disable=True)
    err = (euler - ref).square()
    assert row["para_nfe"] == 5 and row["evaluations"] == 5
    assert row["rmse"] == pytest.approx(float(err.mean().sqrt()), rel=1e-4)
    per = [float(err[labels == c].mean().sqrt()) for c in range(10)]
    assert row["rmse_per_class"] == pytest.approx(per, rel=1e-4)
    assert row["worst_class"] == max(range(10), key=lambda c: per[c])
    # the written files hold the same numbers
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]
    assert f"| DDIM | 5 | 5 | {row['rmse']:.4f} |" in (out / "results.md").read_text()


def test_epd_row_and_files(demo):
    out, result = demo
    epd = next(r for r in result["rows"] if r["solver"] == "epd")
    assert (epd["para_nfe"], epd["evaluations"]) == (5, 8)  # K = 2 branches: 3 batched rounds of 2
    assert math.isfinite(epd["rmse"]) and epd["rmse"] > 0
    assert [r["rmse"] for r in result["rows"]] == sorted(r["rmse"] for r in result["rows"])
    assert {p.name for p in (out / "grids").iterdir()} == {f"{r['solver']}.png" for r in result["rows"]}
    assert len(list((out / "params").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("argv, message", [
    (["--model", "gmm:digits"], "runs on the bundled digits-cond model"),
    (["--per-class", "0"], "--per-class must be >= 1"),
])
def test_cli_refuses_bad_input_before_work(tmp_path, capsys, argv, message):
    from epd_solver.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--conditional", "--out", str(out)] + argv) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()
