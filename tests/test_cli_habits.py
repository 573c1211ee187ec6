"""CLI habits on a user's model: AFS by parity, knobs printed, paper-only knobs on request, solver names and
aliases, seed counts, --threads, previews."""

import json

import numpy as np
import pytest
import torch

from epd_solver.cli import main
from epd_solver.distillation.config import make_config
from epd_solver.epd import EPDParams

TINY_DISTILL = ["--trajectories", "16", "--val-trajectories", "8", "--select-noises", "0", "--lbfgs-rounds", "1",
                "--lbfgs-iterations", "2", "--schedule", "time_uniform", "--teacher-points", "1", "--no-cache",
                "--allow-worse", "--quiet"]


def test_afs_follows_the_parity_of_the_nfe_unless_set():
    assert make_config("epd", 4).afs is False and make_config("epd", 4).n_points == 3  # 2 steps x 2 rounds
    assert make_config("epd", 5).afs is True and make_config("epd", 5).n_points == 4  # 3 steps x 2 - 1
    assert make_config("amed", 6, recipe="amed").afs is False
    with pytest.raises(ValueError, match="not reachable"):
        make_config("epd", 4, afs=True)


def test_distill_even_nfe_by_default_prints_the_afs_choice(tmp_path, capsys):
    out, before = tmp_path / "epd4.safetensors", torch.get_num_threads()
    try:
        assert main(["distill", "--model", "gmm:digits", "--nfe", "4", "--out", str(out), "--threads", "2",
                     *TINY_DISTILL]) == 0
        assert torch.get_num_threads() == 2  # distill takes --threads like every command
    finally:
        torch.set_num_threads(before)
    assert "AFS off: Para.NFE 4 is even" in capsys.readouterr().err
    params = EPDParams.load(out)
    assert params.afs is False and params.nfe()["para_nfe"] == 4 and params.sigmas.numel() == 3


def _outputs(folder, seeds):
    return np.stack([np.load(folder / f"{s:06d}.npy") for s in seeds])


def _library_dpmpp_3m(thresholding, seeds):
    from epd_solver.problems import digits_mixture
    from epd_solver.sampling import get_sampler
    from epd_solver.solvers import paper_setting, paper_sigmas

    gm, setting = digits_mixture(), paper_setting("dpmpp_3m", 5)
    sig = paper_sigmas(setting, gm)
    x = torch.stack([torch.randn(64, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                     for s in seeds]) * float(sig[0])
    return get_sampler("dpmpp_3m")(gm, x, sig, disable=True, **{**setting["knobs"],
                                                                  "thresholding": thresholding}).numpy()


SAMPLE = ["sample", "--model", "gmm:digits", "--dtype", "float64", "--quiet", "--solver", "dpmpp_3m", "--nfe", "5",
          "--seeds", "0-3"]


def test_sample_leaves_the_papers_thresholding_off_unless_asked(tmp_path, capsys):
    off, on = _library_dpmpp_3m(False, range(4)), _library_dpmpp_3m(True, range(4))
    assert np.abs(off - on).max() > 0.1  # thresholding matters on this model
    assert main(SAMPLE + ["--out", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    assert "thresholding=False" in printed and "--paper-setting" in printed
    np.testing.assert_allclose(_outputs(tmp_path / "default", range(4)), off, rtol=0, atol=1e-12)
    assert json.loads((tmp_path / "default" / "sample.json").read_text())["knobs"]["thresholding"] is False
    for extra, name in ((["--paper-setting"], "paper"), (["--set", "thresholding=true"], "set")):
        assert main(SAMPLE + extra + ["--out", str(tmp_path / name)]) == 0
        assert "thresholding=True" in capsys.readouterr().out
        np.testing.assert_allclose(_outputs(tmp_path / name, range(4)), on, rtol=0, atol=1e-12)


@pytest.mark.parametrize("extra, message", [
    (["--set", "max_order=2"], "does not take ['max_order']; its knobs: ['afs', 'lower_order_final'"),
    (["--set", "thresholding"], "--set takes KNOB=VALUE"),
    (["--steps", "4", "--paper-setting"], "--paper-setting takes the paper's row at --nfe N"),
])
def test_sample_knob_errors(tmp_path, capsys, extra, message):
    args = [a for a in SAMPLE if a not in ("--nfe", "5")] if "--steps" in extra else SAMPLE
    code = None
    try:
        code = main(args + extra + ["--out", str(tmp_path / "o")])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_bench_report_says_it_runs_the_papers_thresholding(tmp_path):
    from epd_solver.bench import BenchConfig, run_bench

    out = tmp_path / "out"
    cfg = BenchConfig(model="gmm:digits", nfe=(3,), solvers="euler,dpmpp_3m", out=str(out), distill=False,
                      samples=4, cache_dir="", quiet=True, grid_samples=2)
    rows = {r["solver"]: r for r in run_bench(cfg, log=lambda m: None)["rows"]}
    assert rows["dpmpp_3m"]["knobs"]["thresholding"] is True
    text = (out / "results.md").read_text()
    assert "DPM-Solver++(3M) run the paper's setting, dynamic thresholding included" in text
    assert "`--set dpmpp_3m.thresholding=false`" in text and "network in float64" in text


def test_epd_solvers_lists_names_aliases_family_and_rounds(capsys):
    from epd_solver.sampling import list_samplers, sampler_spec

    assert main(["solvers"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    for name in list_samplers():
        spec = sampler_spec(name)
        cells = lines[name].split()
        assert spec.family in cells
        assert ("varies" if spec.rounds_per_step is None else str(spec.rounds_per_step)) in cells
    assert "ddim" in lines["euler"] and "edm" in lines["heun"]


def test_alias_ddim_is_euler_and_unknown_names_get_a_suggestion(tmp_path, capsys):
    base = ["sample", "--model", "gmm:digits", "--dtype", "float64", "--quiet", "--nfe", "3", "--seeds", "n=3"]
    assert main(base + ["--solver", "DDIM", "--out", str(tmp_path / "ddim")]) == 0
    assert main(base + ["--solver", "euler", "--out", str(tmp_path / "euler")]) == 0
    np.testing.assert_array_equal(_outputs(tmp_path / "ddim", range(3)), _outputs(tmp_path / "euler", range(3)))
    assert json.loads((tmp_path / "ddim" / "sample.json").read_text())["solver"] == "euler"
    capsys.readouterr()
    for argv, hint in ((base + ["--solver", "eular", "--out", str(tmp_path / "x")], "did you mean 'euler'?"),
                       (["bench", "--model", "gmm:digits", "--solvers", "euler,ipdnm", "--out", str(tmp_path / "b")],
                        "did you mean 'ipndm'?"),
                       (["distill", "--model", "gmm:digits", "--solver", "epd_plugn", "--out",
                         str(tmp_path / "d.safetensors")], "did you mean 'epd_plugin'"),
                       (["distill", "--model", "gmm:digits", "--solver", "ddim", "--out",
                         str(tmp_path / "d.safetensors")], "is not a learned solver")):
        assert main(argv) == 2
        assert hint in capsys.readouterr().err


def test_seeds_count_form_and_the_note_on_a_bare_number(tmp_path, capsys):
    base = ["sample", "--model", "gmm:digits", "--quiet", "--solver", "euler", "--nfe", "2"]
    assert main(base + ["--seeds", "n=4", "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").glob("*.npy")) == [f"{s:06d}.npy" for s in range(4)]
    assert main(base + ["--seeds", "8", "--out", str(tmp_path / "b")]) == 0
    assert "--seeds 8 is the one seed 8; for 8 samples write n=8" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "b").glob("*.npy")] == ["000008.npy"]
    assert main(base + ["--seeds", "n=x", "--out", str(tmp_path / "c")]) == 2
    assert "a count is written n=COUNT" in capsys.readouterr().err


def test_every_computing_command_takes_threads():
    from epd_solver.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        if name == "solvers":  # a listing: no computation
            continue
        assert any("--threads" in a.option_strings for a in p._actions), name


def test_sample_preview_sheet_and_stack_hold_the_saved_images(tmp_path):
    out = tmp_path / "png"
    assert main(["sample", "--model", "digits", "--quiet", "--solver", "euler", "--nfe", "3", "--seeds", "0-4",
                 "--out", str(out), "--preview", str(tmp_path / "grid.png"), "--stack", str(tmp_path / "all.npz")]) == 0
    from PIL import Image

    files = [np.asarray(Image.open(out / f"{s:06d}.png")) for s in range(5)]
    with np.load(tmp_path / "all.npz") as z:
        np.testing.assert_array_equal(z["seeds"], np.arange(5))
        np.testing.assert_array_equal(z["samples"][:, 0], np.stack(files))
    sheet = np.asarray(Image.open(tmp_path / "grid.png"))
    h, w = files[0].shape
    assert sheet.shape == (2 * h + 1, 3 * w + 2)  # 5 images on a 3-wide grid, 1-pixel gaps
    for i, img in enumerate(files):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(sheet[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w], img)
    assert main(["sample", "--model", "digits", "--quiet", "--solver", "euler", "--nfe", "3", "--seeds", "0-4",
                 "--out", str(out), "--stack", str(tmp_path / "all.npz")]) == 2  # exists, no --force


def test_python_distill_shows_progress_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from epd_solver import distill

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tiny = dict(trajectories=16, val_trajectories=8, select_noises=0, lbfgs_rounds=1, lbfgs_iterations=2,
                schedule="time_uniform", teacher_points=1, cache=False, compare=False)
    for stream, bar in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        distill("gmm:digits", "epd", 3, **tiny)
        assert ("it/s" in stream.getvalue() or "s/it" in stream.getvalue()) is bar, stream.getvalue()[-300:]


def test_bench_set_on_a_learned_row_says_where_its_afs_comes_from(tmp_path, capsys):
    assert main(["bench", "--model", "gmm:digits", "--nfe", "4", "--solvers", "epd", "--no-distill", "--set",
                 "epd.afs=false", "--out", str(tmp_path / "b"), "--samples", "4", "--cache-dir", ""]) == 2
    assert "its grid, AFS and knobs come from its parameter file" in capsys.readouterr().err


def test_bench_report_on_a_user_model_has_no_cifar10_section(tmp_path):
    from epd_solver.bench import BenchConfig, run_bench

    for model, out, cifar in (("tiny_models:tiny_conv", tmp_path / "user", False),
                              ("gmm:digits", tmp_path / "gmm", True)):
        run_bench(BenchConfig(model=model, nfe=(5,), solvers="euler,ipndm", out=str(out), distill=False, samples=4,
                              cache_dir="", ref_steps=8, quiet=True, grid_samples=2), log=lambda m: None)
        text = (out / "results.md").read_text()
        assert "**RMSE** at NFE 5" in text
        assert ("CIFAR-10 FID at NFE 5" in text) is cifar
    run_bench(BenchConfig(model="gmm:digits", nfe=(3,), solvers="euler", out=str(tmp_path / "n3"), distill=False,
                          samples=4, cache_dir="", quiet=True, grid_samples=2), log=lambda m: None)
    assert "Ordering at NFE 5" not in (tmp_path / "n3" / "results.md").read_text()  # no NFE 5 column


def test_distill_force_restarts_cleanly_over_a_stale_checkpoint(tmp_path, capsys):
    out = tmp_path / "epd4.safetensors"
    stale = tmp_path / "epd4.safetensors.ckpt"
    stale.write_bytes(b"an interrupted run's checkpoint")
    argv = ["distill", "--model", "gmm:digits", "--nfe", "4", "--out", str(out), *TINY_DISTILL]
    assert main(argv) == 2  # neither --resume nor --force: the checkpoint is kept and the error says both
    err = capsys.readouterr().err
    assert "pass --resume to continue it, or --force to start over" in err and stale.read_bytes().startswith(b"an ")
    assert main(argv + ["--force"]) == 0
    assert "--force: removed the checkpoint" in capsys.readouterr().err
    assert EPDParams.load(out).nfe()["para_nfe"] == 4
