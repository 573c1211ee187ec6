"""Conditional distillation (issue 18): each trajectory's condition row follows its global seed, so batch size,
resuming and 1 vs 2 processes give the same tables; the conditional teacher equals a per-sample loop."""

import pytest
import torch
from gloo import run_ranks

from epd_solver.denoisers import CFGDenoiser
from epd_solver.distillation import DistillRun, distill
from epd_solver.distillation.conditions import Conditions, ConditionsError, condition_rows
from epd_solver.distillation.noise import SeedRange
from epd_solver.distillation.teacher import TeacherSpec, run_teacher, teacher_grid
from epd_solver.problems import digits_cond_mixture

LABELS = {"class_labels": torch.arange(10)}
# full-batch L-BFGS (not progressive: its first rounds use a batch-sized subset): the batch size then only
# chunks the loss, so tables must agree to rounding across batch sizes
OPTS = dict(schedule="time_uniform", trajectories=13, val_trajectories=8, lbfgs_rounds=2, lbfgs_iterations=3,
            select_noises=0, teacher_points=1, progressive=False, compare=False, cache=False, progress=False)


def guided():
    return CFGDenoiser(digits_cond_mixture(), 2.0, {"class_labels": torch.tensor([10])})


def tables(params):
    return torch.cat([v.reshape(-1) for v in params.natural(torch.float64)])


def test_rows_follow_the_seed_and_are_balanced():
    rows = condition_rows(SeedRange(1_000_000_000, 30), 10)
    assert rows.tolist() == list(range(10)) * 3
    # a shard or another batch of the same seeds gets the same rows
    assert condition_rows(SeedRange(1_000_000_007, 5), 10).tolist() == rows[7:12].tolist()
    with pytest.raises(ConditionsError, match="same number of rows"):
        Conditions({"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(ConditionsError, match="both in conditions"):
        Conditions(LABELS, {"class_labels": torch.tensor([1])})
    with pytest.raises(ConditionsError, match="0 dimensions"):
        Conditions({"class_labels": torch.tensor(3)})
    with pytest.raises(ConditionsError, match="gmm:digits-cond is class-conditional: pass conditions="):
        distill(guided(), "epd", 3, **OPTS)  # before any model call


def test_conditional_teacher_equals_a_per_sample_loop():
    run = DistillRun(guided(), "epd", 3, **{k: v for k, v in OPTS.items() if k != "compare"}, conditions=LABELS)
    seeds = SeedRange(run.train_seeds.start + 2, 7)
    spec = TeacherSpec.make("dpm_2", 1)
    batched = run.teacher_states(spec, seeds)
    fine = teacher_grid(run.sigmas, spec, run.schedule, run.schedule_kwargs)
    x0 = run.starts(seeds)
    for j, seed in enumerate(seeds.seeds()):
        label = torch.tensor([seed % 10])
        alone, _ = run_teacher(guided(), x0[j:j + 1], fine, spec, {"class_labels": label})
        torch.testing.assert_close(batched[j:j + 1], alone, rtol=1e-12, atol=1e-12)
    # and the labels matter: one broadcast label gives other states
    broadcast, _ = run_teacher(guided(), x0, fine, spec, {"class_labels": torch.tensor([0])})
    assert (broadcast - batched).abs().max() > 0.1


def test_batch_size_does_not_change_the_tables():
    a = distill(guided(), "epd", 3, batch=4, conditions=LABELS, **OPTS)
    b = distill(guided(), "epd", 3, batch=13, conditions=LABELS, **OPTS)
    torch.testing.assert_close(tables(a), tables(b), rtol=0, atol=1e-9)
    assert a.meta["training"]["best_val_rmse"] < 0.9 * a.meta["training"]["init_val_rmse"]
    single = distill(guided(), "epd", 3, batch=4, extra_args={"class_labels": torch.tensor([3])}, **OPTS)
    assert (tables(single) - tables(a)).abs().max() > 1e-4  # the per-trajectory labels reached the training
    rec = a.meta["conditioning"]
    assert rec["keys"] == ["class_labels"] and rec["conditions"] == 10 and rec["guidance_scale"] == 2.0
    assert rec["assignment"] == "seed % n" and rec["uncond_keys"] == ["class_labels"]
    assert rec["digest"] == Conditions(LABELS).digest


def test_resume_gives_the_same_tables(tmp_path):
    whole = distill(guided(), "epd", 3, batch=4, conditions=LABELS, **OPTS)

    class Killed(Exception):
        pass

    def kill(it, info):
        if it == 3:
            raise Killed

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Killed):
        distill(guided(), "epd", 3, batch=4, conditions=LABELS, checkpoint=ckpt, on_iteration=kill, **OPTS)
    resumed = distill(guided(), "epd", 3, batch=4, conditions=LABELS, checkpoint=ckpt, resume=True, **OPTS)
    assert resumed.meta["training"]["resumed_from"] == 3
    torch.testing.assert_close(tables(resumed), tables(whole), rtol=0, atol=1e-12)


def _worker(rank: int, out: str):
    return tables(distill(guided(), "epd", 3, batch=4, conditions=LABELS, **OPTS))


def test_two_processes_equal_one(tmp_path):
    ranks = run_ranks(_worker, tmp_path)
    single = tables(distill(guided(), "epd", 3, batch=4, conditions=LABELS, **OPTS))
    for t in ranks:
        assert (t - single).abs().max() <= 1e-6


def test_verdict_reports_the_worst_condition(tmp_path):
    lines = []
    p = distill(guided(), "epd", 3, batch=13, conditions=LABELS, log=lines.append,
                **dict(OPTS, compare=True, val_trajectories=20))
    v = p.meta["validation"]
    per = v["per_condition"]
    assert sorted(per["ratios"], key=int) == [str(c) for c in range(10)] and set(per["counts"].values()) == {2}
    assert per["worst_ratio"] == max(per["ratios"].values())
    assert v["reference"] == "exact"  # a guided mixture keeps its exact end points
    verdict = [line for line in lines if line.startswith("validation (")]
    assert len(verdict) == 1 and f"worst of 10 conditions: row {per['worst_condition']}" in verdict[0]


# -- command line -------------------------------------------------------------------------------------------
def cli(*argv):
    from epd_solver.cli import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize("flags, message", [
    (["--class-labels", "3-1"], "the range 3-1 runs backwards"),
    (["--class-labels", "0-12"], r"--class-labels \[10, 11, 12\] outside gmm:digits-cond's classes 0-9"),
    ([], "is class-conditional \\(classes 0-9\\): pass --class-labels"),
    (["--class-labels", "1,,2"], "is not a label or a range"),
    (["--class-labels", "0-9", "--guidance-scale", "2", "--null-label", "3"], "--null-label 3 is also among"),
])
def test_cli_named_errors_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "samples"
    assert cli("sample", "--model", "gmm:digits-cond", "--solver", "euler", "--steps", 3, "--seeds", "0-3",
               "--out", out, *flags) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not out.exists()
    table = tmp_path / "t.safetensors"
    assert cli("distill", "--model", "gmm:digits-cond", "--nfe", 3, "--out", table, *flags) == 2
    assert __import__("re").search(message, capsys.readouterr().err) and not table.exists()


def test_cli_unconditional_model_refuses_labels(tmp_path, capsys):
    assert cli("sample", "--model", "gmm:digits", "--solver", "euler", "--steps", 3, "--seeds", "0-1", "--out",
               tmp_path / "s", "--class-labels", "1") == 2
    assert "gmm:digits is not class-conditional" in capsys.readouterr().err


def test_cli_samples_per_seed_labels_and_refuses_another_guidance(tmp_path, capsys):
    import numpy as np

    from epd_solver.epd import sample_epd
    from epd_solver.distributed import noise_for_seeds

    params = distill(guided(), "epd", 3, batch=13, conditions={"class_labels": torch.tensor([2, 5, 7])}, **OPTS)
    path = tmp_path / "t.safetensors"
    params.save(path)
    base = ["sample", "--model", "gmm:digits-cond", "--solver", "epd", "--params", path, "--seeds", "4-9",
            "--format", "npy", "--dtype", "float64", "--class-labels", "2,5,7"]
    assert cli(*base, "--out", tmp_path / "w3", "--guidance-scale", 3) == 2
    assert "distilled at guidance 2, not --guidance-scale 3" in capsys.readouterr().err
    assert cli(*base, "--out", tmp_path / "w1") == 2  # no --guidance-scale: guidance 1
    assert cli(*base, "--out", tmp_path / "w2", "--guidance-scale", 2, "--quiet") == 0
    seeds = list(range(4, 10))
    x = noise_for_seeds(seeds, (64,), torch.float64) * 80.0
    labels = torch.tensor([[2, 5, 7][s % 3] for s in seeds])
    ref = sample_epd(guided(), x, params.sigmas, params, extra_args={"class_labels": labels})
    got = np.stack([np.load(tmp_path / "w2" / f) for f in sorted(p.name for p in (tmp_path / "w2").glob("*.npy"))])
    names = sorted(p.name for p in (tmp_path / "w2").glob("*.npy"))
    order = [int("".join(ch for ch in n if ch.isdigit())) for n in names]
    np.testing.assert_allclose(got, ref[[seeds.index(s) for s in order]].numpy(), rtol=0, atol=1e-10)
    assert cli(*base, "--out", tmp_path / "w3b", "--guidance-scale", 3, "--allow-guidance-mismatch", "--quiet") == 0


def test_cli_distill_records_labels_and_guidance(tmp_path, capsys):
    from epd_solver.epd import EPDParams

    out = tmp_path / "t.safetensors"
    assert cli("distill", "--model", "gmm:digits-cond", "--nfe", 3, "--out", out, "--class-labels", "0-4,7",
               "--guidance-scale", 2, "--trajectories", 13, "--val-trajectories", 12, "--lbfgs-rounds", 2,
               "--lbfgs-iterations", 3, "--select-noises", 0, "--teacher-points", 1, "--schedule", "time_uniform",
               "--no-progressive", "--no-cache", "--quiet", "--allow-worse") == 0
    assert "worst of 6 conditions" in capsys.readouterr().out
    rec = EPDParams.load(out).meta["conditioning"]
    assert rec["conditions"] == 6 and rec["guidance_scale"] == 2.0 and rec["keys"] == ["class_labels"]
    assert rec["digest"] == Conditions({"class_labels": torch.tensor([0, 1, 2, 3, 4, 7])}).digest
    # the same table from the API: the command line adds nothing of its own
    api = distill(guided(), "epd", 3, batch=OPTS.get("batch", 128), conditions={"class_labels": torch.tensor(
        [0, 1, 2, 3, 4, 7])}, **dict(OPTS, val_trajectories=12))
    torch.testing.assert_close(tables(EPDParams.load(out)), tables(api), rtol=0, atol=1e-6)
