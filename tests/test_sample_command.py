"""``epd sample``: files by seed, resume without overwriting, PNG mapping, statistics, and 2-process gloo runs
of the command, all checked against single-process sampling computed here."""

import contextlib
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gloo import run_ranks
from PIL import Image

from epd_solver.cli import main
from epd_solver.denoisers import Denoiser
from epd_solver.epd import EPDParams, sample_epd
from epd_solver.metrics import FeatureStats
from epd_solver.problems import digits_mixture
from epd_solver.sampling import get_sampler
from epd_solver.schedules import polynomial
from epd_solver.solvers import paper_setting, paper_sigmas

F64 = torch.float64
GMM = ["sample", "--model", "gmm:digits", "--dtype", "float64", "--quiet"]
BASELINE = ["--solver", "dpmpp_3m", "--nfe", "5", "--paper-setting"]  # paper row: logSNR grid, thresholding
# The bundled U-Net (float32 network) with float64 solver arithmetic, raw outputs.
DIGITS = ["sample", "--model", "digits", "--dtype", "float64", "--format", "npy", "--quiet", "--solver", "euler",
          "--nfe", "5"]


def noise(seeds, shape, dtype=F64):
    """Independent of the library: one generator per seed, as EDM's StackedRandomGenerator."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=dtype) for s in seeds])


def reference_baseline(seeds):
    gm = digits_mixture()
    setting = paper_setting("dpmpp_3m", 5)
    sig = paper_sigmas(setting, gm)
    x = noise(seeds, (64,)) * float(sig[0])
    return get_sampler("dpmpp_3m")(gm, x, sig, None, None, True, **setting["knobs"]).numpy()


def load(out, seeds, ext="npy"):
    return np.stack([np.load(Path(out) / f"{s:06d}.{ext}") for s in seeds])


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def batch_invariant(splits):
    """Whether the mixture denoiser gives the same bits for rows evaluated in chunks of these sizes (MKL's
    GEMM may pick another summation order for some row counts; then samples agree to rounding only)."""
    gm = digits_mixture()
    x = 80 * noise(range(64), (64,))
    for sigma in (80.0, 1.0, 0.01):
        s = torch.full((64,), sigma, dtype=F64)
        full = gm(x, s)
        for size in splits:
            if not torch.equal(torch.cat([gm(a, b) for a, b in zip(x.split(size), s.split(size))]), full):
                return False
    return True


def epd_params(path=None):
    sig = polynomial(4, 0.002, 80.0)
    p = EPDParams.from_values([[0.2, 0.6, 0.9], [0.3, 0.5, 0.7], [0.1, 0.4, 0.8]],
                              [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2]],
                              [[1.02, 1.0, 0.99]] * 3, [[0.98, 1.0, 1.01]] * 3, sigmas=sig)
    if path is not None:
        p.save(path)
    return p


# -- one 2-process gloo run of three commands (the environment torchrun sets) ---------------------------------

def _cli_worker(runs, rank, out):
    with open(os.path.join(out, f"stdout{rank}.txt"), "w") as log, contextlib.redirect_stdout(log):
        codes = [main(a) for a in runs]
    assert codes == [0] * len(runs), codes
    return codes


@pytest.fixture(scope="module")
def two_process_outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    epd_params(tmp / "epd.safetensors")
    runs = [GMM + BASELINE + ["--seeds", "0-63", "--batch", "8", "--out", str(tmp / "b8"), "--threads", "1",
                              "--stats", str(tmp / "b8.npz")],
            GMM + BASELINE + ["--seeds", "0-63", "--batch", "64", "--out", str(tmp / "b64"), "--threads", "1"],
            GMM + ["--solver", "epd", "--params", str(tmp / "epd.safetensors"), "--seeds", "0-6", "--batch", "7",
                   "--out", str(tmp / "bp"), "--threads", "1", "--branch-parallel"]]
    runs += [DIGITS + ["--seeds", "0-63", "--batch", b, "--out", str(tmp / f"digits{b}"), "--threads", "1"]
             for b in ("8", "64")]
    runs.append(DISTILL + ["--out", str(tmp / "dp.safetensors")])  # data-parallel distillation
    run_ranks(functools.partial(_cli_worker, runs), tmp)
    return tmp, (tmp / "stdout0.txt").read_text()


DISTILL = ["distill", "--model", "gmm:digits", "--nfe", "3", "--trajectories", "12", "--batch", "4",
           "--val-trajectories", "8", "--lbfgs-rounds", "1", "--lbfgs-iterations", "4", "--teacher-points", "1",
           "--no-cache", "--quiet", "--allow-worse"]


def test_distill_command_under_two_processes_equals_one_process(two_process_outputs, tmp_path):
    tmp, stdout = two_process_outputs
    assert "data parallel over 2 processes" in stdout
    assert main(DISTILL + ["--out", str(tmp_path / "one.safetensors")]) == 0
    two, one = EPDParams.load(tmp / "dp.safetensors"), EPDParams.load(tmp_path / "one.safetensors")
    assert two.meta["data_parallel"] == {"processes": 2} and one.meta["data_parallel"] == {"processes": 1}
    for a, b in zip(two.natural(), one.natural()):
        assert (a - b).abs().max().item() <= 1e-6


def test_seeds_0_63_identical_for_1_and_2_processes_and_batch_8_and_64(two_process_outputs, tmp_path):
    tmp, stdout = two_process_outputs
    assert "2 processes" in stdout
    seeds = range(64)
    ref = reference_baseline(seeds)  # one single-process batch of 64
    outs = {"2proc_b8": load(tmp / "b8", seeds), "2proc_b64": load(tmp / "b64", seeds)}
    for batch in (8, 64):
        out = tmp_path / str(batch)
        assert main(GMM + BASELINE + ["--seeds", "0-63", "--batch", str(batch), "--out", str(out)]) == 0
        outs[f"1proc_b{batch}"] = load(out, seeds)
    # Batches seen: 64 (reference, 1 proc b64), 8 (b8), 32 (2 procs b64: EDM splits into 2 batches).
    bitwise = batch_invariant([8, 32])
    for name, out in outs.items():
        assert out.dtype == np.float64 and out.shape == (64, 64)
        assert rel(out, ref) <= 1e-12, name
        if bitwise:
            assert np.array_equal(out, ref), name


def test_bundled_model_seeds_0_63_agree_for_1_and_2_processes_and_batch_8_and_64(two_process_outputs, tmp_path):
    from epd_solver.models import load_default_model

    tmp, _ = two_process_outputs
    model = load_default_model()
    setting = paper_setting("euler", 5)
    sig = paper_sigmas(setting, model)
    with torch.no_grad():  # one single-process batch of 64
        ref = get_sampler("euler")(model, noise(range(64), (1, 8, 8)) * 80.0, sig, None, None, True,
                                   **setting["knobs"]).numpy()
    outs = {f"2proc_b{b}": load(tmp / f"digits{b}", range(64)) for b in (8, 64)}
    for b in (8, 64):
        assert main(DIGITS + ["--seeds", "0-63", "--batch", str(b), "--out", str(tmp_path / str(b))]) == 0
        outs[f"1proc_b{b}"] = load(tmp_path / str(b), range(64))
    # Not bitwise: the float32 network's conv/GEMM kernels sum in another order for 8-row batches than for
    # 32 or 64 (measured 7.5e-7 with MKL's AVX-512 kernels, 1.01e-6 with its AVX2 ones: float32 rounding
    # through the network, which is what the bound allows; a float64 network gives identical bits).
    for name, out in outs.items():
        assert out.shape == (64, 1, 8, 8) and rel(out, ref) <= 4e-6, name


def test_distributed_stats_from_the_command_equal_numpy(two_process_outputs):
    tmp, _ = two_process_outputs
    feats = load(tmp / "b8", range(64))
    with np.load(tmp / "b8.npz") as z:
        assert int(z["n"]) == 64
        assert rel(z["mu"], feats.mean(0)) <= 1e-12
        assert rel(z["sigma"], np.cov(feats, rowvar=False)) <= 1e-12


def test_branch_parallel_command_equals_single_process_epd(two_process_outputs):
    tmp, stdout = two_process_outputs
    assert "branch-parallel" in stdout
    p = epd_params()
    single = sample_epd(digits_mixture(), noise(range(7), (64,)) * 80.0, p.sigmas, p, disable=True).numpy()
    assert rel(load(tmp / "bp", range(7)), single) <= 1e-10


# -- single process ------------------------------------------------------------------------------------------

class GaussianImages(Denoiser):
    """Data N(0, v I) on (C, 4, 4) images: D(x; s) = x v / (v + s^2)."""

    kind = "edm"

    def __init__(self, channels, v=2.0):
        super().__init__(0.002, 80.0, f"gauss{channels}")
        self.shape, self.v = (channels, 4, 4), v

    def denoise(self, x, sigma, **cond):
        return x * (self.v / (self.v + sigma**2)).reshape(-1, 1, 1, 1)


def grey_images():
    return GaussianImages(1)


def rgb_images():
    return GaussianImages(3)


@pytest.mark.parametrize("factory,channels", [("grey_images", 1), ("rgb_images", 3)])
def test_png_outputs_map_minus_one_one_to_uint8(tmp_path, factory, channels):
    out = tmp_path / "png"
    assert main(["sample", "--model", f"test_sample_command:{factory}", "--solver", "euler", "--steps", "6", "--seeds",
                 "3,8-9", "--out", str(out), "--dtype", "float64", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000003.png", "000008.png", "000009.png", "sample.json"]
    s = polynomial(7, 0.002, 80.0).numpy()
    v = 2.0
    clipped = set()
    for seed in (3, 8, 9):
        x = noise([seed], (channels, 4, 4))[0].numpy() * s[0]
        for a, b in zip(s[:-1], s[1:]):  # Euler on the Gaussian: x <- x (1 + (b - a) a / (v + a^2))
            x = x * (1 + (b - a) * a / (v + a * a))
        expected = np.floor(np.clip(x * 127.5 + 128, 0, 255)).astype(np.uint8)
        clipped |= set(np.unique(expected)) & {0, 255}
        with Image.open(out / f"{seed:06d}.png") as img:
            assert img.mode == ("L" if channels == 1 else "RGB") and img.size == (4, 4)
            got = np.asarray(img)
        got = got[None] if channels == 1 else got.transpose(2, 0, 1)
        np.testing.assert_array_equal(got, expected)
    assert clipped == {0, 255}  # both ends of the clipping exercised


def test_resume_skips_written_seeds_and_never_overwrites(tmp_path):
    out, stats = tmp_path / "out", tmp_path / "stats.npz"
    args = GMM + BASELINE + ["--out", str(out), "--batch", "4"]
    assert main(args + ["--seeds", "0-9"]) == 0
    first = load(out, range(10))
    (out / "000003.npy").unlink()
    np.save(out / "000005.npy", np.zeros(64))  # a file the user changed: must survive
    assert main(args + ["--seeds", "0-14", "--stats", str(stats)]) == 0
    now = load(out, range(15))
    np.testing.assert_array_equal(now[5], np.zeros(64))
    keep = [i for i in range(10) if i not in (3, 5)]
    np.testing.assert_array_equal(now[keep], first[keep])  # untouched files
    # Seed 3 is redone in a batch of 3 rows instead of 4: equal up to GEMM rounding (see batch_invariant).
    assert rel(now[3], first[3]) <= 1e-12
    assert rel(now[10:], reference_baseline(range(10, 15))) <= 1e-12
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    with np.load(stats) as z:  # statistics of all 15 outputs as saved, old ones read back
        assert int(z["n"]) == 15
        assert rel(z["mu"], now.mean(0)) <= 1e-12 and rel(z["sigma"], np.cov(now, rowvar=False)) <= 1e-12
    # An existing statistics file is kept unless --force.
    before = stats.read_bytes()
    assert main(args + ["--seeds", "0-1", "--stats", str(stats)]) == 2
    assert stats.read_bytes() == before
    assert main(args + ["--seeds", "0-1", "--stats", str(stats), "--force"]) == 0
    assert FeatureStats.load_npz(stats).n == 2
    # Another configuration into the same folder is refused, nothing written.
    assert main(GMM + ["--solver", "heun", "--nfe", "4", "--out", str(out), "--seeds", "20"]) == 2
    assert not (out / "000020.npy").exists()


def test_learned_solver_and_steps_grid(tmp_path):
    params = tmp_path / "p.safetensors"
    p = epd_params(params)
    assert main(GMM + ["--solver", "epd", "--params", str(params), "--nfe", "6", "--seeds", "0-4", "--out",
                       str(tmp_path / "epd")]) == 0
    single = sample_epd(digits_mixture(), noise(range(5), (64,)) * 80.0, p.sigmas, p, disable=True).numpy()
    assert rel(load(tmp_path / "epd", range(5)), single) <= 1e-12
    manifest = json.loads((tmp_path / "epd" / "sample.json").read_text())
    assert manifest["para_nfe"] == 6 and manifest["sigmas"] == p.sigmas.tolist()
    assert main(GMM + ["--solver", "dpmpp_2m", "--steps", "4", "--schedule", "logsnr", "--afs", "--seeds", "2",
                       "--out", str(tmp_path / "steps")]) == 0
    gm = digits_mixture()
    sig = torch.logspace(np.log10(80.0), np.log10(0.002), 5, dtype=F64)
    sig[0], sig[-1] = 80.0, 0.002
    x = get_sampler("dpmpp_2m")(gm, noise([2], (64,)) * 80.0, sig, None, None, True, afs=True)
    assert rel(load(tmp_path / "steps", [2]), x.numpy()) <= 1e-12


@pytest.mark.parametrize("extra,message", [
    (["--solver", "epd", "--nfe", "5"], "--params"),
    (["--solver", "euler", "--nfe", "5", "--params", "p.safetensors"], "training-free"),
    (["--solver", "nosuch", "--nfe", "5"], "unknown solver"),
    (["--solver", "euler", "--nfe", "5", "--seeds", "3-1"], "reversed"),
    (["--solver", "euler", "--nfe", "5", "--format", "png"], "png"),
    (["--solver", "euler"], "--nfe N"),
    (["--solver", "euler", "--nfe", "5", "--batch", "0"], "--batch"),
    (["--solver", "euler", "--nfe", "5", "--afs"], "AFS"),
    (["--solver", "euler", "--nfe", "5", "--schedule", "logsnr"], "fixes the grid"),
    (["--solver", "euler", "--steps", "5", "--schedule", "logsnr", "--rho", "3"], "--rho applies"),
])
def test_bad_input_is_a_named_error(tmp_path, capsys, extra, message):
    args = GMM + ["--out", str(tmp_path / "o")] + extra
    if "--seeds" not in extra:
        args += ["--seeds", "0-1"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any(p.suffix == ".npy" for p in (tmp_path / "o").iterdir())
