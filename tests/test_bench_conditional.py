"""`epd bench` on a class-conditional model with classifier-free guidance (gmm:digits-cond): sample i (seed
seed + i) gets labels[(seed + i) % n], as `epd sample` assigns it, for every solver and the reference. RMSE and
Fréchet distances (overall and per class) against independent computations: k-diffusion's Euler through a CFG
denoiser written out here, the exact end point of that denoiser, and the class moments from the components."""

import numpy as np
import pytest
import scipy.linalg
import torch
from oracles import kdiffusion_sampling

from epd_solver.bench import BenchConfig, run_bench
from epd_solver.cli import main
from epd_solver.commands.conditioning import CLIConditioningError
from epd_solver.epd import EPDParams
from epd_solver.problems import digits_cond_mixture, exact_endpoint
from epd_solver.schedules import time_uniform

SAMPLES, SEED, W = 12, 3, 2.0


def noise(n, seed, d=64):
    return 80.0 * torch.stack([torch.randn(d, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
                               for i in range(n)])


def cfg_by_hand(gm, y):
    """D_u + w (D_c - D_u): the unconditional call with the null label, the conditional one with y."""
    def model(x, sigma):
        d_c = gm(x, sigma, class_labels=y)
        d_u = gm(x, sigma, class_labels=torch.full_like(y, gm.null_label))
        return d_u + W * (d_c - d_u)
    return model


def class_moments(gm, c):
    m = (gm.labels == c).numpy()
    w, mu_k, cov_k = gm.weights.numpy()[m], gm.means.numpy()[m], gm.covariances().numpy()[m]
    w = w / w.sum()
    mu = w @ mu_k
    return mu, np.einsum("k,kde->de", w, cov_k) + np.einsum("k,kd,ke->de", w, mu_k - mu, mu_k - mu)


def fd(x, mu, cov):
    m, c = x.mean(0), np.cov(x, rowvar=False)
    return np.sum((m - mu) ** 2) + np.trace(c + cov - 2 * scipy.linalg.sqrtm(c @ cov).real)


def fd_singular(x, mu, cov):
    """The same distance for singular covariances: Tr sqrtm(C1 C2) = sum of sqrt(eigenvalues of C1 C2) (real, >= 0)."""
    m, c = x.mean(0), np.cov(x, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(c @ cov).real, 0, None)).sum()
    return np.sum((m - mu) ** 2) + np.trace(c) + np.trace(cov) - 2 * root


def config(tmp_path, labels="0-9", w=W, **kw):
    return BenchConfig(**{**dict(model="gmm:digits-cond", nfe=(5,), solvers="euler,ipndm", out=None, distill=False,
                                 samples=SAMPLES, seed=SEED, cache_dir=str(tmp_path / "cache"), grid_samples=4,
                                 quiet=True, class_labels=labels, guidance_scale=w), **kw})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbench")
    cfg = config(root, out=str(root / "out"))
    return cfg, run_bench(cfg, log=lambda m: None), root


def test_rmse_and_frechet_distances_equal_independent_computations(bench):
    _, result, root = bench
    gm = digits_cond_mixture()
    y = torch.tensor([(SEED + i) % 10 for i in range(SAMPLES)])  # epd sample's rule: labels[s % n]
    x0 = noise(SAMPLES, SEED)
    model = cfg_by_hand(gm, y)
    exact = exact_endpoint(model, x0, 80.0, 0.002, rtol=1e-10, atol=1e-10).numpy()
    # DDIM row at Para.NFE 5: the paper's polynomial rho = 7 grid of 6 points; k-diffusion's Euler to sigma_min
    ramp = torch.linspace(0, 1, 6, dtype=torch.float64)
    sigmas = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    out = kdiffusion_sampling().sample_euler(model, x0, sigmas, disable=True).numpy()
    row = next(r for r in result["rows"] if r["solver"] == "euler")
    assert row["rmse"] == pytest.approx(np.sqrt(np.mean((out - exact) ** 2)), rel=1e-6)
    # per class: classes 3 and 4 hold two samples each (seeds 3, 13 and 4, 14)
    for c in (3, 4):
        assert row["fd_per_class"][str(c)] == pytest.approx(fd(out[(y == c).numpy()], *class_moments(gm, c)),
                                                            rel=1e-6)
    assert row["fd_per_class"]["5"] is None  # one sample: no covariance
    # overall: the classes mixed in the samples' label proportions
    counts = {c: int((y == c).sum()) for c in range(10)}
    mus = {c: class_moments(gm, c) for c in range(10)}
    mu = sum(counts[c] / SAMPLES * mus[c][0] for c in range(10))
    second = sum(counts[c] / SAMPLES * (mus[c][1] + np.outer(mus[c][0], mus[c][0])) for c in range(10))
    assert row["fd"] == pytest.approx(fd(out, mu, second - np.outer(mu, mu)), rel=1e-6)
    rec = result["conditioning"]
    assert rec["class_labels"] == list(range(10)) and rec["guidance_scale"] == W and rec["null_label"] == 10
    md = (root / "out" / "results.md").read_text()
    assert "Conditioning: class labels [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in md and "guidance 2, null label 10" in md
    assert "## Fréchet distance per class" in md


def test_reference_cache_keyed_by_labels_and_guidance(bench, tmp_path):
    cfg, first, root = bench
    again = run_bench(config(root, solvers="euler"), log=lambda m: None)
    assert again["reference"]["cached"] and again["rows"][0]["rmse"] == first["rows"][0]["rmse"]
    other_labels = run_bench(config(root, labels="1,3,5", solvers="euler"), log=lambda m: None)
    other_scale = run_bench(config(root, w=3.0, solvers="euler"), log=lambda m: None)
    for r in (other_labels, other_scale):
        assert not r["reference"]["cached"]
        assert r["reference"]["fd"] != first["reference"]["fd"] and r["rows"][0]["rmse"] != first["rows"][0]["rmse"]


def test_conditional_model_without_labels_is_a_named_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--model", "gmm:digits-cond", "--nfe", "5", "--out", str(out)]) == 2
    assert "is class-conditional (classes 0-9): pass --class-labels" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert main(["bench", "--model", "gmm:digits", "--nfe", "5", "--class-labels", "1", "--out", str(out)]) == 2
    assert "gmm:digits is not class-conditional" in capsys.readouterr().err
    assert main(["bench", "--model", "gmm:digits-cond", "--nfe", "5", "--class-labels", "3-1", "--out",
                 str(out)]) == 2
    assert "runs backwards" in capsys.readouterr().err and not out.exists()
    assert main(["bench", "--latency", "--model", "gmm:digits-cond", "--nfe", "5", "--class-labels", "0-9", "--out",
                 str(out)]) == 2
    assert "--latency times unconditional calls: drop --class-labels" in capsys.readouterr().err


def table(tmp_path, w, name):
    """A K = 2 table at Para.NFE 5 that records the guidance scale it was distilled at."""
    steps = 3
    r = torch.linspace(0.2, 0.7, 2).expand(steps, 2)
    p = EPDParams.from_values(r, torch.full((steps, 2), 0.5), sigmas=time_uniform(steps + 1, 0.002, 80.0), afs=True,
                              model_id=f"gmm:digits-cond+cfg{w:g}",
                              conditioning={"guidance_scale": w, "uncond_digest": None})
    return str(p.save(tmp_path / name))


def test_learned_row_from_a_table_at_another_guidance_is_refused(tmp_path):
    from epd_solver.denoisers import CFGDenoiser
    from epd_solver.epd import sample_epd

    with pytest.raises(CLIConditioningError, match="distilled at guidance 3, not --guidance-scale 2.*"
                                                   "--allow-guidance-mismatch"):
        run_bench(config(tmp_path, solvers="epd", params=(table(tmp_path, 3.0, "w3.safetensors"),)),
                  log=lambda m: None)
    path = table(tmp_path, W, "w2.safetensors")
    result = run_bench(config(tmp_path, solvers="epd", params=(path,)), log=lambda m: None)
    row = result["rows"][0]
    assert row["params_source"] == f"file {path}"
    gm = digits_cond_mixture()
    y = torch.tensor([(SEED + i) % 10 for i in range(SAMPLES)])
    x0 = noise(SAMPLES, SEED)
    guided = CFGDenoiser(gm, W, {"class_labels": torch.tensor([10])})
    exact = exact_endpoint(cfg_by_hand(gm, y), x0, 80.0, 0.002, rtol=1e-10, atol=1e-10)
    params = EPDParams.load(path)
    out = sample_epd(guided, x0, params.sigmas, params, extra_args={"class_labels": y})
    assert row["rmse"] == pytest.approx(float((out - exact).pow(2).mean().sqrt()), rel=1e-6)
    mismatch = run_bench(config(tmp_path, solvers="epd", w=3.0, params=(path,), allow_guidance_mismatch=True),
                         log=lambda m: None)
    assert mismatch["rows"][0]["params_source"] == f"file {path}"


def test_bench_with_prompts_equals_kdiffusion_with_the_pipelines_own_embeddings(tmp_path, monkeypatch):
    """A tiny random SD-style pipeline: sample i gets prompts[(seed + i) % n]; the DDIM row and the Heun reference
    recomputed with k-diffusion's samplers, CFG written out and the embeddings from the pipeline's encode_prompt."""
    pytest.importorskip("diffusers")
    from test_prompts import sd_folder

    from epd_solver.integrations.diffusers import load_diffusers_model

    monkeypatch.setenv("EPD_SOLVER_CACHE", str(tmp_path / "cache"))
    folder = sd_folder(tmp_path)
    prompts, negative, w, n, seed = ["red cat", "a dog", "blue sky"], "blurry", 7.5, 4, 5
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    cfg = BenchConfig(model=f"diffusers:{folder}", nfe=(3,), solvers="euler", out=None, distill=False, samples=n,
                      seed=seed, cache_dir=str(tmp_path / "bench"), quiet=True, prompts=str(tmp_path / "p.txt"),
                      negative_prompt=negative, guidance_scale=w, ref_solver="heun", ref_steps=6)
    result = run_bench(cfg, log=lambda m: None)
    assert result["conditioning"]["prompts"] == 3 and result["conditioning"]["negative_prompt"] == negative

    model = load_diffusers_model(folder)
    pipe = model.pipeline
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=[negative] * 3)
    shape = tuple(model.shape)
    x0 = float(getattr(model, "prior_scale", None) or model.sigma_max) * torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64) for i in range(n)])
    lo, hi = float(model.sigma_min), float(model.sigma_max)

    def grid(points):
        ramp = torch.linspace(0, 1, points, dtype=torch.float64)
        return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7

    def rmse_for(order):
        emb = pe[[order[(seed + i) % 3] for i in range(n)]]

        def guided(x, sigma):
            with torch.no_grad():
                d_c = model(x, sigma, encoder_hidden_states=emb).to(torch.float64)
                d_u = model(x, sigma, encoder_hidden_states=ne[:1].expand_as(emb)).to(torch.float64)
            return d_u + w * (d_c - d_u)

        k = kdiffusion_sampling()
        ref = k.sample_heun(guided, x0, grid(7), disable=True)
        out = k.sample_euler(guided, x0, grid(4), disable=True)
        return float((out - ref).pow(2).mean().sqrt())

    assert result["rows"][0]["rmse"] == pytest.approx(rmse_for([0, 1, 2]), rel=1e-9)
    assert abs(rmse_for([2, 1, 0]) - result["rows"][0]["rmse"]) > 1e-3 * result["rows"][0]["rmse"]


def test_digits_cond_unet_frechet_distance_per_class_against_the_labelled_digits():
    """The bundled U-Net: its DDIM row recomputed with k-diffusion (CFG by hand) and compared with scikit-learn's
    digits of each sample's label, per class and mixed in the samples' label proportions."""
    from sklearn.datasets import load_digits

    from epd_solver.resolve import load_model

    cfg = BenchConfig(model="digits-cond", nfe=(3,), solvers="euler", out=None, samples=SAMPLES, seed=SEED,
                      cache_dir="", quiet=True, class_labels="0-9", guidance_scale=W, ref_steps=4)
    row = run_bench(cfg, log=lambda m: None)["rows"][0]
    net = load_model("digits-cond")
    y = torch.tensor([(SEED + i) % 10 for i in range(SAMPLES)])
    ramp = torch.linspace(0, 1, 4, dtype=torch.float64)
    lo, hi = float(net.sigma_min), float(net.sigma_max)
    sigmas = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7

    def guided(x, sigma):
        with torch.no_grad():
            d_c = net(x, sigma, class_labels=y).to(torch.float64)
            d_u = net(x, sigma, class_labels=torch.full_like(y, 10)).to(torch.float64)
        return d_u + W * (d_c - d_u)

    x0 = (noise(SAMPLES, SEED) * float(net.prior_scale) / 80.0).reshape((SAMPLES,) + tuple(net.shape))
    out = kdiffusion_sampling().sample_euler(guided, x0, sigmas, disable=True).reshape(SAMPLES, -1).numpy()
    digits = load_digits()
    data, labels = digits.data / 8.0 - 1.0, digits.target
    moments = {c: (data[labels == c].mean(0), np.cov(data[labels == c], rowvar=False)) for c in range(10)}
    for c in (3, 4):
        assert row["fd_per_class"][str(c)] == pytest.approx(fd_singular(out[(y == c).numpy()], *moments[c]),
                                                            rel=1e-5)
    weights = {c: int((y == c).sum()) / SAMPLES for c in range(10)}
    mu = sum(weights[c] * moments[c][0] for c in range(10))
    second = sum(weights[c] * (moments[c][1] + np.outer(moments[c][0], moments[c][0])) for c in range(10))
    assert row["fd"] == pytest.approx(fd_singular(out, mu, second - np.outer(mu, mu)), rel=1e-5)


def test_learned_row_distilled_on_the_fly_over_the_same_labels(tmp_path, monkeypatch):
    import epd_solver
    from epd_solver.denoisers import CFGDenoiser
    from epd_solver.epd import sample_epd

    seen = {}
    real = epd_solver.distill

    def small(model, **kw):  # the bench's call, with a tiny recipe so the test takes seconds
        seen.update(kw, model=model)
        return real(model, **kw, schedule="time_uniform", trajectories=13, val_trajectories=8, lbfgs_rounds=2,
                    lbfgs_iterations=3, select_noises=0, teacher_points=1, progressive=False, compare=False,
                    cache=False)

    monkeypatch.setattr(epd_solver, "distill", small)
    result = run_bench(config(tmp_path, labels="2,5,7", solvers="epd", nfe=(3,), distill=True,
                              out=str(tmp_path / "out")), log=lambda m: None)
    assert torch.equal(seen["conditions"]["class_labels"], torch.tensor([2, 5, 7]))
    assert seen["model"].scale == W
    saved = EPDParams.load(next((tmp_path / "out" / "params").glob("*.safetensors")))
    assert saved.meta["conditioning"]["guidance_scale"] == W and saved.meta["conditioning"]["conditions"] == 3
    gm = digits_cond_mixture()
    y = torch.tensor([[2, 5, 7][(SEED + i) % 3] for i in range(SAMPLES)])
    x0 = noise(SAMPLES, SEED)
    exact = exact_endpoint(cfg_by_hand(gm, y), x0, 80.0, 0.002, rtol=1e-10, atol=1e-10)
    guided = CFGDenoiser(gm, W, {"class_labels": torch.tensor([10])})
    out = sample_epd(guided, x0, saved.sigmas, saved, extra_args={"class_labels": y})
    assert result["rows"][0]["rmse"] == pytest.approx(float((out - exact).pow(2).mean().sqrt()), rel=1e-6)


def test_command_line_passes_the_conditioning_and_records_it(bench, tmp_path):
    import json

    _, first, root = bench
    out = tmp_path / "cli"
    assert main(["bench", "--model", "gmm:digits-cond", "--class-labels", "0-9", "--guidance-scale", "2", "--nfe", "5",
                 "--solvers", "euler", "--samples", str(SAMPLES), "--seed", str(SEED), "--no-distill",
                 "--cache-dir", str(root / "cache"), "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["reference"]["cached"]  # the same conditioning as the fixture's run: its reference
    assert saved["rows"][0]["rmse"] == next(r["rmse"] for r in first["rows"] if r["solver"] == "euler")
    assert saved["config"]["class_labels"] == "0-9" and saved["config"]["guidance_scale"] == 2.0
    assert saved["conditioning"]["class_labels"] == list(range(10))


def test_float32_module_with_labels_and_guidance(tmp_path):
    """A class-conditional `module:function` nn.Module with float32 parameters: guided, then called in float32;
    the DDIM row equals an Euler loop with CFG written out on the same network."""
    from tiny_models import TinyCondConvDenoiser

    cfg = BenchConfig(model="tiny_models:tiny_cond_conv", nfe=(3,), solvers="euler", out=None, distill=False,
                      samples=5, seed=2, cache_dir=str(tmp_path / "cache"), ref_steps=8, quiet=True,
                      class_labels="0-2", guidance_scale=W)
    result = run_bench(cfg, log=lambda m: None)
    assert result["network_dtype"] == "float32" and result["model"].endswith("+cfg2")
    (ref_file,) = (tmp_path / "cache").glob("reference-*.npz")
    ref = torch.from_numpy(np.load(ref_file)["x"])
    net = TinyCondConvDenoiser()
    y = torch.tensor([(2 + i) % 3 for i in range(5)])
    ramp = torch.linspace(0, 1, 4, dtype=torch.float64)
    sigmas = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    x = 80.0 * torch.stack([torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(2 + i),
                                        dtype=torch.float64) for i in range(5)])
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            sig = s.float().expand(5)
            d_c = net(x.float(), sig, class_labels=y).double()
            d_u = net(x.float(), sig, class_labels=torch.full_like(y, 3)).double()
            x = x + (x - (d_u + W * (d_c - d_u))) / s * (s_next - s)
    assert result["rows"][0]["rmse"] == pytest.approx(float((x - ref).pow(2).mean().sqrt()), rel=1e-6)
