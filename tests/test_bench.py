"""`epd bench` on a tiny configuration: files and columns, RMSE / FID against independent computations,
refusals (missing Inception weights, non-empty --out), the parameter-file path for learned rows."""

import csv
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from epd_solver.bench import BenchConfig, run_bench
from epd_solver.bench.report import CSV_COLUMNS, ordering_vs_paper
from epd_solver.bench.runner import parse_override
from epd_solver.cli import main
from epd_solver.epd import EPDParams
from epd_solver.problems import digits_mixture, exact_endpoint
from epd_solver.sampling import get_sampler
from epd_solver.schedules import polynomial, time_uniform

SAMPLES, SEED = 8, 3


def noise(n, seed, d=64):
    """The documented start noise: sample i is 80 * randn from its own generator seeded seed + i."""
    return 80.0 * torch.stack([torch.randn(d, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
                               for i in range(n)])


def epd_file(folder, nfe, k=2):
    steps = (nfe + 1) // 2  # Para.NFE = 2 steps - 1 with AFS
    r = torch.linspace(0.2, 0.7, k).expand(steps, k)
    params = EPDParams.from_values(r, torch.full((steps, k), 1.0 / k), sigmas=time_uniform(steps + 1, 0.002, 80.0),
                                   afs=True, model_id="gmm:digits")
    return str(params.save(folder / f"epd-nfe{nfe}.safetensors"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    files = [epd_file(root, n) for n in (3, 5)]
    cfg = BenchConfig(model="gmm:digits", nfe=(3, 5), solvers="euler,ipndm,paradigms,epd", out=str(root / "out"),
                      params=tuple(files), distill=False, samples=SAMPLES, seed=SEED, cache_dir=str(root / "cache"),
                      grid_samples=4, quiet=True)
    result = run_bench(cfg, log=lambda m: None)
    return cfg, result, root


def test_bench_writes_table_files(bench):
    cfg, result, root = bench
    out = root / "out"
    for name in ("results.csv", "results.json", "results.md", "error_vs_nfe.png", "grids/epd.png",
                 "grids/all_nfe5.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == CSV_COLUMNS
    assert sorted((r["solver"], int(r["nfe"])) for r in rows) == sorted(
        (s, n) for s in ("euler", "ipndm", "paradigms", "epd") for n in (3, 5))
    by = {(r["solver"], int(r["nfe"])): r for r in rows}
    # the paper: K = 2 with AFS spends 5 / 8 evaluations per sample at Para.NFE 3 / 5.
    assert [float(by[("epd", n)]["evaluations"]) for n in (3, 5)] == [5.0, 8.0]
    assert [int(by[("epd", n)]["para_nfe"]) for n in (3, 5)] == [3, 5]
    assert by[("epd", 5)]["params_source"].startswith("file ")
    assert [float(by[("ipndm", n)]["evaluations"]) for n in (3, 5)] == [3.0, 5.0]
    assert int(by[("paradigms", 5)]["para_nfe"]) <= 5
    md = (out / "results.md").read_text()
    assert "| Method | NFE 3 | NFE 5 |" in md and "***Single-step***" in md and "***Parallel***" in md
    assert f"| EPD-Solver | {float(by[('epd', 3)]['rmse']):.4g} (5) | {float(by[('epd', 5)]['rmse']):.4g} (8) |" in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["samples"] == SAMPLES and len(saved["rows"]) == 8 and saved["environment"]["torch_threads"] >= 1


def test_bench_rmse_equals_independent_computation(bench):
    _, result, _ = bench
    gm = digits_mixture()
    x0 = noise(SAMPLES, SEED)
    exact = exact_endpoint(gm, x0, 80.0, 0.002).numpy()
    # iPNDM row at NFE 5: polynomial rho = 7, 6 points, no AFS.
    out = get_sampler("ipndm")(gm, x0, polynomial(6, 0.002, 80.0, 7.0), max_order=4).numpy()
    expected = np.sqrt(np.mean((out - exact) ** 2))
    row = next(r for r in result["rows"] if r["solver"] == "ipndm" and r["nfe"] == 5)
    assert row["rmse"] == pytest.approx(expected, rel=1e-6)
    # Fréchet distance against the mixture's exact moments, from the dense covariances (law of total covariance).
    w, mu_k, cov_k = gm.weights.numpy(), gm.means.numpy(), gm.covariances().numpy()
    mu = w @ mu_k
    cov = np.einsum("k,kde->de", w, cov_k) + np.einsum("k,kd,ke->de", w, mu_k - mu, mu_k - mu)
    m, c = out.mean(0), np.cov(out, rowvar=False)
    fd = np.sum((m - mu) ** 2) + np.trace(c + cov - 2 * scipy.linalg.sqrtm(c @ cov).real)
    assert row["fd"] == pytest.approx(fd, rel=1e-6)


def test_bench_reference_cache_reused(bench):
    cfg, result, root = bench
    again = run_bench(BenchConfig(**{**cfg.__dict__, "solvers": "ipndm", "nfe": (5,), "out": None}), log=lambda m: None)
    assert again["reference"]["cached"] and not result["reference"]["cached"]
    first = next(r for r in result["rows"] if r["solver"] == "ipndm" and r["nfe"] == 5)
    assert again["rows"][0]["rmse"] == first["rmse"]


class TinyConvNet(torch.nn.Module):
    """Stand-in for the TorchScript Inception (same call signature), as in test_metrics.py."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        h = torch.tanh(self.conv(x / 255.0 - 0.5))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def test_bench_fid_with_standin_extractor(tmp_path):
    torch.manual_seed(0)
    net = TinyConvNet().eval()
    weights = tmp_path / "inception.pt"
    torch.jit.script(net).save(str(weights))

    def features(flat):  # EDM's PNG quantisation, grey repeated to 3 channels, computed here with numpy
        png = (flat.numpy().reshape(-1, 1, 8, 8) * np.float32(127.5) + np.float32(128)).clip(0, 255).astype(np.uint8)
        with torch.no_grad():
            return net(torch.from_numpy(np.repeat(png, 3, axis=1)).float()).double().numpy()

    ref = features(noise(50, 100) / 80.0)  # any reference set: its statistics go in as an EDM .npz
    ref_mu, ref_sigma = ref.mean(0), np.cov(ref, rowvar=False)
    np.savez(tmp_path / "ref.npz", mu=ref_mu, sigma=ref_sigma)
    cfg = BenchConfig(model="gmm:digits", nfe=(3,), solvers="euler", out=str(tmp_path / "out"), distill=False,
                      samples=SAMPLES, seed=SEED, cache_dir=str(tmp_path / "cache"), inception_weights=str(weights),
                      fid_ref=str(tmp_path / "ref.npz"), quiet=True)
    row = run_bench(cfg, log=lambda m: None)["rows"][0]
    x = get_sampler("euler")(digits_mixture(), noise(SAMPLES, SEED), polynomial(4, 0.002, 80.0, 7.0))
    f = features(x)
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    fid = np.sum((mu - ref_mu) ** 2) + np.trace(sigma + ref_sigma - 2 * scipy.linalg.sqrtm(sigma @ ref_sigma).real)
    assert row["fid"] == pytest.approx(fid, rel=1e-5, abs=1e-9)
    assert "| DDIM |" in (tmp_path / "out" / "results.md").read_text().split("## FID")[1]


def test_bench_fid_without_weights_is_a_clear_error(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    code = main(["bench", "--model", "gmm:digits", "--out", str(tmp_path / "out"), "--fid-ref",
                 str(tmp_path / "ref.npz"), "--samples", "4", "--quiet"])
    assert code == 2
    assert "--inception-weights" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        run_bench(BenchConfig(model="gmm:digits", out=None, inception_weights=str(tmp_path / "missing.pt")))


def test_bench_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    code = main(["bench", "--model", "gmm:digits", "--out", str(tmp_path), "--samples", "4", "--quiet"])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_ordering_against_paper_chain():
    rows = [{"solver": s, "nfe": 5, "rmse": v} for s, v in
            [("epd", 0.1), ("amed", 0.3), ("ipndm", 0.2), ("dpmpp_3m", 0.4), ("unipc", 0.5), ("euler", 0.45)]]
    o = ordering_vs_paper(rows, 5)
    assert [s for s, _ in o["ranking"]] == ["epd", "ipndm", "amed", "dpmpp_3m", "euler", "unipc"]
    assert o["violations"] == ["AMED-Solver 0.3 is not below iPNDM 0.2", "UniPC 0.5 is not below DDIM 0.45"]


def test_parse_override():
    assert parse_override("dpmpp_3m.thresholding=false") == ("dpmpp_3m", "thresholding", False)
    assert parse_override("unipc.variant=bh1") == ("unipc", "variant", "bh1")
    with pytest.raises(ValueError, match="SOLVER.KNOB=VALUE"):
        parse_override("thresholding=false")


def first_pixels():
    """A user feature extractor for --features (module:function returning a callable)."""
    return lambda x: x.reshape(x.shape[0], -1)[:, :6]


def test_bench_fd_with_user_features(tmp_path):
    from epd_solver.bench.quality import DATA_SEED, MIXTURE_DATA_SAMPLES

    cfg = BenchConfig(model="gmm:digits", nfe=(3,), solvers="euler", out=None, distill=False, samples=SAMPLES,
                      seed=SEED, cache_dir=str(tmp_path), features=f"{__name__}:first_pixels", quiet=True)
    row = run_bench(cfg, log=lambda m: None)["rows"][0]
    gm = digits_mixture()
    data = gm.sample_data(MIXTURE_DATA_SAMPLES, generator=torch.Generator().manual_seed(DATA_SEED)).numpy()[:, :6]
    x = get_sampler("euler")(gm, noise(SAMPLES, SEED), polynomial(4, 0.002, 80.0, 7.0)).numpy()[:, :6]
    m1, c1, m2, c2 = x.mean(0), np.cov(x, rowvar=False), data.mean(0), np.cov(data, rowvar=False)
    fd = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert row["fd"] == pytest.approx(fd, rel=1e-6)


def test_params_dir_matches_model_id_solver_and_nfe(tmp_path):
    from epd_solver.bench.learned import ParamsSource

    mine = epd_file(tmp_path, 3)
    other = EPDParams.load(epd_file(tmp_path, 5))
    other.meta["model_id"] = "another-model"
    (tmp_path / "epd-nfe5.safetensors").unlink()
    other.save(tmp_path / "other.safetensors")
    source = ParamsSource(digits_mixture(), "gmm:digits", dirs=[tmp_path], distill=False, log=lambda m: None)
    params, how = source.get("epd", 3)
    assert how == f"file {mine}" and params.nfe()["para_nfe"] == 3
    assert source.get("epd", 5) == (None, "no parameter file (distillation disabled)")
    assert source.get("amed", 3)[0] is None
    with pytest.raises(ValueError, match="another-model"):
        ParamsSource(digits_mixture(), "gmm:digits", files=[tmp_path / "other.safetensors"], distill=False)


def test_paradigms_fixed_grid_by_set(bench):
    cfg, result, root = bench
    fixed = BenchConfig(**{**cfg.__dict__, "solvers": "paradigms", "nfe": (3,), "out": None,
                           "overrides": {"paradigms": {"base_steps": 12}}})
    row = run_bench(fixed, log=lambda m: None)["rows"][0]
    gm = digits_mixture()
    x0 = noise(SAMPLES, SEED)
    out, info = get_sampler("paradigms")(gm, x0, polynomial(13, 0.002, 80.0, 7.0), window=12, tolerance=0.1,
                                         max_passes=3, return_info=True)
    exact = exact_endpoint(gm, x0, 80.0, 0.002)
    assert row["rmse"] == pytest.approx(float((out - exact).pow(2).mean().sqrt()), rel=1e-6)
    assert (row["para_nfe"], row["evaluations"], row["n_points"]) == (3, info.nfe.evaluations, 13)
    bad = BenchConfig(**{**fixed.__dict__, "overrides": {"paradigms": {"max_passes": 2}}})
    with pytest.raises(ValueError, match="base_steps, window and tolerance"):
        run_bench(bad, log=lambda m: None)


def test_bench_float32_module_runs_its_network_in_float32(tmp_path):
    """A `module:function` nn.Module with float32 parameters: the bench calls its network in float32 and
    solves in float64; the Euler row equals an independent Euler loop on the same network and grid."""
    from tiny_models import TinyConvDenoiser

    cfg = BenchConfig(model="tiny_models:tiny_conv", nfe=(3,), solvers="euler", out=str(tmp_path / "out"),
                      distill=False, samples=4, seed=1, cache_dir=str(tmp_path / "cache"), ref_steps=8, quiet=True)
    result = run_bench(cfg, log=lambda m: None)
    assert result["network_dtype"] == "float32"
    (ref_file,) = (tmp_path / "cache").glob("reference-*.npz")
    ref = torch.from_numpy(np.load(ref_file)["x"])
    net = TinyConvDenoiser()
    ramp = torch.linspace(0, 1, 4, dtype=torch.float64)  # the paper's DDIM grid at NFE 3: EDM's rho = 7, 4 points
    sigmas = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    x = 80.0 * torch.stack([torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(1 + i),
                                        dtype=torch.float64) for i in range(4)])
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            d = (x - net(x.float(), s.float().expand(4)).double()) / s
            x = x + d * (s_next - s)
    (row,) = result["rows"]
    assert row["evaluations"] == 3
    assert row["rmse"] == pytest.approx(float((x - ref).pow(2).mean().sqrt()), rel=1e-6)


def test_bench_even_nfe_with_a_file_and_no_distill(tmp_path):
    """--nfe 4: the EPD row runs its even-NFE file (AFS off, from the file), the AMED row without a file is
    skipped with a note instead of failing the run."""
    steps = 2
    params = EPDParams.from_values(torch.linspace(0.2, 0.7, 2).expand(steps, 2), torch.full((steps, 2), 0.5),
                                   sigmas=time_uniform(steps + 1, 0.002, 80.0), afs=False, model_id="gmm:digits")
    path = str(params.save(tmp_path / "epd-nfe4.safetensors"))
    cfg = BenchConfig(model="gmm:digits", nfe=(4,), solvers="amed,epd", out=None, params=(path,), distill=False,
                      samples=4, seed=0, cache_dir="", quiet=True)
    rows = {r["solver"]: r for r in run_bench(cfg, log=lambda m: None)["rows"]}
    assert rows["amed"]["rmse"] is None and "no parameter file" in rows["amed"]["note"]
    assert rows["epd"]["para_nfe"] == 4 and rows["epd"]["evaluations"] == 6 and rows["epd"]["afs"] is False
    x = get_sampler("epd")(digits_mixture(), noise(4, 0), params.sigmas, disable=True, params=params)
    ref = exact_endpoint(digits_mixture(), noise(4, 0), 80.0, 0.002, rtol=1e-10, atol=1e-10)
    assert rows["epd"]["rmse"] == pytest.approx(float((x - ref).pow(2).mean().sqrt()), rel=1e-5)
