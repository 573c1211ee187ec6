"""Latency plumbing: the timer, measured NFE counts of the timed runs, the CLI mode and the GPU script on a CPU."""

import importlib.util
import json
import time
from pathlib import Path

import pytest

from epd_solver.bench.latency import latency_markdown, measure_latency, time_fn
from epd_solver.cli import main
from epd_solver.problems import digits_mixture

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_gpu.py"


def test_time_fn_measures_wall_clock():
    calls = []
    times = time_fn(lambda: (calls.append(1), time.sleep(0.01)), "cpu", warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3
    assert all(9.0 <= t < 1000.0 for t in times)  # 10 ms sleeps, in milliseconds


def test_measure_latency_counts_and_table():
    records = measure_latency(digits_mixture(), (64,), [2], [1, 2], [5], warmup=0, repeats=1)
    calls = {r["k"]: r for r in records if r["kind"] == "call"}
    assert {k: r["rows"] for k, r in calls.items()} == {1: 2, 2: 4}
    runs = {(r["solver"], r["k"]): r for r in records if r["kind"] == "sample"}
    # the paper at Para.NFE 5 with AFS: K = 1 -> 5, K = 2 -> 8 evaluations per sample; iPNDM 5 calls.
    assert {key: (r["para_nfe"], r["evaluations"]) for key, r in runs.items()} == {
        ("ipndm", 1): (5, 5.0), ("epd", 1): (5, 5.0), ("epd", 2): (5, 8.0)}
    text = latency_markdown(records)
    assert "| 2 | 5 |" in text and "B x 2 rows (K = 2)" in text and "EPD K = 2" in text


def test_cli_latency_mode(tmp_path, capsys):
    code = main(["bench", "--latency", "--model", "gmm:digits", "--nfe", "3", "--batch-sizes", "1", "--ks", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "lat"), "--quiet"])
    assert code == 0
    data = json.loads((tmp_path / "lat" / "latency.json").read_text())
    assert data["environment"]["torch_threads"] >= 1 and len(data["records"]) == 4
    assert "EPD K = 2" in (tmp_path / "lat" / "latency.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--latency", "--model", "gmm:digits", "--nfe", "4", "--out", str(tmp_path / "lat2")]) == 2
    assert "odd" in capsys.readouterr().err and not (tmp_path / "lat2").exists()


def test_gpu_script_quick_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("latency_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    assert module.main(["--device", "cpu", "--quick", "--ks", "1,2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["dtype"] == "fp32"
    assert {(r["kind"], r["batch"], r["k"]) for r in run["records"]} == {
        (kind, b, k) for kind in ("call", "sample") for b in (1, 2) for k in (1, 2)}
    with pytest.raises(SystemExit, match="exists"):
        module.main(["--device", "cpu", "--quick", "--out", str(out)])
