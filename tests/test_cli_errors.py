"""Expected CLI failures end in one line and a distinct status; files are written as users expect.

One line on stderr and no traceback for bad devices, absurd seed ranges, existing outputs, over-long names
and parameter files of another model; Ctrl-C / SIGTERM print how to continue; atomic writes leave no
temporary file and give files 0666 less the umask.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epd_solver import cli
from epd_solver.epd import EPDParams
from epd_solver.files import STALE_TMP_S, write_atomic

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "epd_solver" / "data" / "params" / "gmm-digits-epd-nfe5.safetensors"


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip()]


def one_line(lines, start, match):
    assert len(lines) == 1, lines
    assert lines[0].startswith(start) and match in lines[0], lines[0]
    assert "Traceback" not in lines[0]


def sample_args(tmp_path, *extra):
    return ("sample", "--model", "gmm:digits", "--solver", "euler", "--steps", "3", "--seeds", "0-1",
            "--out", str(tmp_path / "out"), "--quiet", *extra)


def test_bad_device_is_a_named_error(tmp_path, capsys):
    status, lines = run_cli(capsys, *sample_args(tmp_path, "--device", "bogus"))
    assert status == cli.EXIT_INPUT
    one_line(lines, "epd sample: error:", "--device 'bogus' is not a device")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_absurd_seed_range_is_refused_at_once(tmp_path, capsys):
    started = time.perf_counter()
    args = list(sample_args(tmp_path))
    args[args.index("0-1")] = "0-99999999999"
    status, lines = run_cli(capsys, *args)
    assert status == cli.EXIT_INPUT and time.perf_counter() - started < 5
    one_line(lines, "epd sample: error:", "more than 10,000,000 seeds")


def test_another_models_params_are_refused_by_epd_sample_unless_allowed(tmp_path, capsys):
    params = EPDParams.load(SHIPPED)
    params.meta["model_id"] = "gauss:model"
    other = params.save(tmp_path / "gauss-epd.safetensors")
    base = ("sample", "--model", "gmm:digits", "--solver", "epd", "--params", str(other), "--seeds", "0-1",
            "--quiet")
    status, lines = run_cli(capsys, *base, "--out", str(tmp_path / "a"))
    assert status == cli.EXIT_INPUT
    one_line(lines, "epd sample: error:", "distilled for model 'gauss:model', not 'gmm:digits'")
    assert "--allow-other-model" in lines[0]
    assert not (tmp_path / "a").exists()  # refused before the output folder is made
    status, _ = run_cli(capsys, *base, "--out", str(tmp_path / "b"), "--allow-other-model")
    assert status == 0 and sorted(p.name for p in (tmp_path / "b").glob("*.npy")) == ["000000.npy", "000001.npy"]
    # the override reproduces the file's own model's samples bit for bit
    status, _ = run_cli(capsys, "sample", "--model", "gmm:digits", "--solver", "epd", "--params", str(SHIPPED),
                        "--seeds", "0-1", "--quiet", "--out", str(tmp_path / "c"))
    assert status == 0
    for name in ("000000.npy", "000001.npy"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_existing_outputs_are_not_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep")
    status, lines = run_cli(capsys, "distill", "--model", "gmm:digits", "--solver", "epd", "--nfe", "5",
                            "--out", str(out))
    assert status == cli.EXIT_INPUT
    one_line(lines, "epd distill: error:", "exists; pass --force")
    assert out.read_bytes() == b"keep"


def test_over_long_names_are_one_line(tmp_path, capsys):
    status, lines = run_cli(capsys, *sample_args(tmp_path)[:-3], "--out", str(tmp_path / ("o" * 300)), "--quiet")
    assert status in (cli.EXIT_INPUT, cli.EXIT_FILES)
    one_line(lines, "epd sample: error:", "too long")
    status, lines = run_cli(capsys, "sample", "--model", "gmm:digits", "--solver", "epd", "--params",
                            str(tmp_path / ("p" * 300)), "--seeds", "0", "--out", str(tmp_path / "x"))
    assert status == cli.EXIT_INPUT
    one_line(lines, "epd sample: error:", "cannot read the parameter file")


def test_interrupt_prints_the_command_that_continues(tmp_path, capsys, monkeypatch):
    import epd_solver.commands.distill as distill_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_cmd, "run", interrupted)
    argv = ["distill", "--model", "gmm:digits", "--solver", "epd", "--nfe", "5", "--out", str(tmp_path / "p x")]
    status, lines = run_cli(capsys, *argv)
    assert status == cli.EXIT_INTERRUPTED
    one_line(lines, "epd distill: interrupted;", "to continue from the last checkpoint, run: epd distill")
    assert lines[0].endswith(f"--out '{tmp_path / 'p x'}' --resume")  # quoted, ready to paste


@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_a_killed_sample_run_leaves_no_temporary_file_and_resumes(tmp_path, sig, status, word):
    out = tmp_path / "out"
    argv = ["sample", "--model", "gmm:digits", "--solver", "heun", "--steps", "200", "--seeds", "0-999",
            "--batch", "1", "--out", str(out), "--quiet", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so (as a user's `nohup epd ... &`
    # should): the child gets the default disposition back, as a terminal's foreground command has it.
    proc = subprocess.Popen([sys.executable, "-m", "epd_solver.cli", *argv], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("*.npy")):
        time.sleep(0.05)
    assert list(out.glob("*.npy")), "no sample written within 60 s"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("epd sample: heun")]
    assert proc.returncode == status, err
    one_line(lines, f"epd sample: {word};", "to continue (seeds already written are kept), run: epd sample")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    done = sorted(out.glob("*.npy"))
    assert 0 < len(done) < 1000


def test_atomic_writes_respect_the_umask_and_clean_up(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("a"))
        os.umask(0o077)
        write_atomic(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("b"))
        os.umask(0o002)
        saved = EPDParams.load(SHIPPED).save(tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    assert saved.stat().st_mode & 0o777 == 0o664  # never world-writable unless the umask says so

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    def interrupt(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    for write, error in ((fail, OSError), (interrupt, KeyboardInterrupt)):
        with pytest.raises(error):
            write_atomic(tmp_path / "c.txt", write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "p.safetensors"]
    long_name = "n" * 250 + ".txt"  # the temporary name must still fit the 255-byte limit
    write_atomic(tmp_path / long_name, lambda tmp: Path(tmp).write_text("x"))
    assert (tmp_path / long_name).read_text() == "x"


def test_a_dead_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r.txt.{dead.pid}.abcd.tmp"
    live = tmp_path / f".r.txt.{os.getppid()}.efgh.tmp"  # a running process's write in progress
    fresh = tmp_path / f".r.txt.{dead.pid}.ijkl.tmp"
    for p in (stale, live, fresh):
        p.write_text("partial")
    old = time.time() - 2 * STALE_TMP_S
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    write_atomic(tmp_path / "r.txt", lambda tmp: Path(tmp).write_text("done"))
    assert (tmp_path / "r.txt").read_text() == "done"
    assert not stale.exists() and live.exists() and fresh.exists()


def test_bench_report_files_are_written_atomically(tmp_path, monkeypatch):
    import epd_solver.bench.report as report

    monkeypatch.setattr(report, "markdown", lambda result: "# report\n")
    result = {"rows": [{"model": "m", "solver": "euler", "nfe": 5, "rmse": 0.5, "knobs": {}}]}
    report.write_all(tmp_path, result)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["results.csv", "results.json", "results.md"]  # no temporary file left
    assert (tmp_path / "results.md").read_text() == "# report\n"
    assert "euler" in (tmp_path / "results.csv").read_text()

    def full_disk(path, write, **kw):  # the disk fills while the report is written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_atomic", full_disk)
    with pytest.raises(OSError):
        report.write_all(tmp_path, {"rows": []})
    assert (tmp_path / "results.md").read_text() == "# report\n"  # the old report is intact, not 0 bytes
