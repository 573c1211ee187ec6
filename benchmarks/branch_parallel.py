"""Wall-clock of branch-parallel EPD (2 ranks, gloo, 1 thread each) against one process (issue 8).

One torchrun job with 2 CPU processes. Each repeat times, back to back on the same noise,
(a) rank 0 alone running batched EPD with the plain model while rank 1 waits in a barrier, and
(b) both ranks running the same sampler through ``RowParallelDenoiser`` (every call's rows split 2 ways,
one all_gather per call). Interleaving the two keeps them under the same machine load. The speed-up is
median(a) / median(b); the largest relative difference of the two outputs is reported too.

Problems (the sampler runs in float64):
  synthetic        the default ``gmm:synthetic`` (closed-form mixture, d = 3072, 8 components of rank 16):
                   cheap rows, so the sampler's own arithmetic and the exchange of 3072-d rows weigh more;
  synthetic-heavy  the same construction with 32 components of rank 64 (16x the flops per row, same rows);
  mlp              a network stand-in on 64-d rows: EDM preconditioning around a random float32 MLP
                   (4 hidden layers of 1024), model-bound with small rows, like a real denoiser;
  digits           the bundled digits U-Net (float32, 1x8x8).

    python benchmarks/branch_parallel.py [--problem mlp] [--batch 512] [--repeats 9]

Writes benchmarks/results/branch_parallel_<problem>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed

RESULTS = Path(__file__).resolve().parent / "results"
QUIET_CORES = 0.25  # a run pair counts as quiet when other processes used less than this many cores
PROBLEMS = {"synthetic": dict(components=8, rank=16), "synthetic-heavy": dict(components=32, rank=64),
            "mlp": dict(width=1024, depth=4), "digits": {}}


class MLPDenoiser(torch.nn.Module):
    """A network stand-in on 64-d data (cost only, random weights): EDM preconditioning around a float32
    MLP with ``depth`` hidden layers of ``width`` and a noise-level input."""

    sigma_min, sigma_max, name, dim, shape, kind = 0.002, 80.0, "mlp-stand-in", 64, (64,), "edm"

    def __init__(self, width: int, depth: int, sigma_data: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        sizes = [self.dim + 1] + [width] * depth + [self.dim]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.SiLU()]
        self.net = torch.nn.Sequential(*layers[:-1]).requires_grad_(False)
        self.sigma_data = sigma_data

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1).to(x.dtype)
        sd2 = self.sigma_data**2
        c_in, c_skip = 1 / (s**2 + sd2).sqrt(), sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        f = self.net(torch.cat([x * c_in, s.log() / 4], 1).float()).to(x.dtype)
        return c_skip * x + c_out * f


def mlp_model() -> MLPDenoiser:
    """The stand-in as an ``epd sample --model branch_parallel:mlp_model`` factory (benchmarks/ on the path)."""
    return MLPDenoiser(**PROBLEMS["mlp"])


def build(problem: str, k: int, steps: int):
    from epd_solver.epd import EPDParams
    from epd_solver.problems import synthetic_mixture
    from epd_solver.schedules import polynomial

    if problem == "mlp":
        model = MLPDenoiser(**PROBLEMS[problem])
    elif problem == "digits":
        from epd_solver.models import load_default_model

        model = load_default_model()
    else:
        model = synthetic_mixture(dim=3072, **PROBLEMS[problem])
    r = [[(j + 1) / (k + 1) for j in range(k)]] * steps
    lam = [[1.0 / k] * k] * steps
    params = EPDParams.from_values(r, lam, sigmas=polynomial(steps + 1, model.sigma_min, model.sigma_max))
    return model, params


def worker(args: argparse.Namespace) -> None:
    from epd_solver import distributed as du
    from epd_solver.epd import sample_epd

    torch.set_num_threads(1)
    du.init("cpu")
    me = du.rank()
    model, params = build(args.problem, args.k, args.steps)
    x = du.noise_for_seeds(range(args.batch), model.shape, torch.float64) * float(params.sigmas[0])
    parallel = du.RowParallelDenoiser(model)

    def run(m):
        return sample_epd(m, x, params.sigmas, params, disable=True, return_info=True)

    def section(fn, active: bool):
        """Run ``fn`` on the active ranks between barriers: result, wall s, CPU s per rank, foreign cores."""
        du.barrier()
        busy, t, c = machine_busy_s(), time.perf_counter(), time.process_time()
        result = fn() if active else None
        du.barrier()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        busy = None if busy is None else machine_busy_s() - busy
        cpus = torch.zeros(du.world_size(), dtype=torch.float64)
        cpus[me] = cpu
        torch.distributed.all_reduce(cpus)
        foreign = None if busy is None or me != 0 else max(0.0, busy - float(cpus.sum())) / wall
        return result, {"wall_s": wall, "cpu_s_per_rank": cpus.tolist(), "foreign_cores": foreign}

    section(lambda: run(model), me == 0)  # warm-up: mixture caches, allocator
    section(lambda: run(parallel), True)
    single, branch = [], []
    load_before = os.getloadavg()
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        result, stats = section(lambda: run(model), me == 0)  # rank 1 waits in the closing barrier
        if me == 0:
            ref, info = result
        single.append(stats)
        (out, _), stats = section(lambda: run(parallel), True)
        branch.append(stats)
    if me == 0:
        print("RESULT " + json.dumps(summarise(args, model, info.nfe, single, branch, parallel, ref, out,
                                               load_before)))
    du.cleanup()


def machine_busy_s() -> float | None:
    """CPU seconds used by all processes on the machine since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def summarise(args, model, nfe, single, branch, parallel, ref, out, load_before) -> dict:
    med = statistics.median
    quiet = [(a, b) for a, b in zip(single, branch)
             if a["foreign_cores"] is not None and max(a["foreign_cores"], b["foreign_cores"]) < QUIET_CORES]
    report = {
        "problem": args.problem, "shape": list(model.shape), **PROBLEMS[args.problem],
        "dtype": "float64 sampler" + (", float32 network" if args.problem in ("mlp", "digits") else ""),
        "batch": args.batch, "k": args.k, "steps": args.steps, "para_nfe": nfe.para_nfe,
        "evaluations_per_sample": nfe.evaluations, "rows_per_branch_call": args.batch * args.k,
        "ranks": 2, "threads_per_process": torch.get_num_threads(), "backend": "gloo",
        "all_gathers_per_run": parallel.collectives // (args.repeats + 1),
        "single_runs": single, "branch_parallel_runs": branch,
        "single_median_s": med(r["wall_s"] for r in single),
        "branch_parallel_median_s": med(r["wall_s"] for r in branch),
        "speedup_median": med(r["wall_s"] for r in single) / med(r["wall_s"] for r in branch),
        "speedup_best": min(r["wall_s"] for r in single) / min(r["wall_s"] for r in branch),
        "cpu_single_median_s": med(r["cpu_s_per_rank"][0] for r in single),
        "cpu_busier_rank_median_s": med(max(r["cpu_s_per_rank"]) for r in branch),
        "quiet_cores_threshold": QUIET_CORES, "quiet_pairs": len(quiet),
        "speedup_quiet_median": (med(a["wall_s"] for a, _ in quiet) / med(b["wall_s"] for _, b in quiet)
                                 if quiet else None),
        "max_relative_difference": float((out - ref).abs().max() / ref.abs().max()),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    report["speedup_cpu_time"] = report["cpu_single_median_s"] / report["cpu_busier_rank_median_s"]
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(r: dict) -> str:
    if r["problem"] == "mlp":
        return f"d = {r['shape'][0]}, float32 MLP stand-in, {r['depth']} hidden layers of {r['width']}"
    if r["problem"] == "digits":
        return "the bundled digits U-Net, float32, 1x8x8"
    return f"Gaussian mixture, d = {r['shape'][0]}, {r['components']} components of rank {r['rank']}"


def markdown(report: dict, note: str) -> str:
    r, med = report, statistics.median

    def row(name: str, runs: list, cpu) -> str:
        walls = ", ".join(f"{x['wall_s']:.3f} ({x['foreign_cores']:.2f})" for x in runs)
        return (f"| {name} | {med(x['wall_s'] for x in runs):.3f} | {min(x['wall_s'] for x in runs):.3f} | "
                f"{med(cpu(x) for x in runs):.3f} | {walls} |")

    quiet = (f"{r['speedup_quiet_median']:.2f}x over the {r['quiet_pairs']} run pairs where other processes used "
             f"< {r['quiet_cores_threshold']} cores" if r["quiet_pairs"] else
             f"no run pair had other processes below {r['quiet_cores_threshold']} cores")
    return "\n".join([
        f"# Branch-parallel EPD, {r['problem']} ({describe(r)}), 2 ranks vs 1 process",
        "",
        f"EPD K = {r['k']}, {r['steps']} steps (Para.NFE {r['para_nfe']}, {r['evaluations_per_sample']:g} "
        f"evaluations per sample), batch {r['batch']} ({r['rows_per_branch_call']} rows per branch call), "
        f"{r['dtype']}, gloo, {r['threads_per_process']} thread per process, "
        f"{r['all_gathers_per_run']} all_gathers per run (one per round). Runs interleaved.",
        "",
        "| | median wall s | best wall s | median CPU s (busiest rank) | runs: wall s (cores used by other "
        "processes meanwhile) |",
        "|---|---|---|---|---|",
        row("1 process", r["single_runs"], lambda x: x["cpu_s_per_rank"][0]),
        row("2 ranks, branch-parallel", r["branch_parallel_runs"], lambda x: max(x["cpu_s_per_rank"])),
        "",
        f"**Wall-clock speed-up: {r['speedup_median']:.2f}x (medians), {r['speedup_best']:.2f}x (best runs), "
        f"{quiet}.** CPU-time ratio (1 process / busiest rank, little affected by other load): "
        f"{r['speedup_cpu_time']:.2f}. Largest relative difference of the outputs: "
        f"{r['max_relative_difference']:.1e}.",
        "",
        f"Machine: {r['cpu_count']} CPUs ({r['machine']}), torch {r['torch']}; load average "
        f"{r['load_average_before'][0]:.1f} before, {r['load_average_after'][0]:.1f} after. {note}",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="mlp")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--note", default="", help="free text for the Markdown report (e.g. machine load)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--force", action="store_true", help="replace earlier results of this problem")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    stem = RESULTS / f"branch_parallel_{args.problem}"
    if not args.no_save and not args.force and stem.with_suffix(".json").exists():
        sys.exit(f"{stem}.json exists; pass --force to replace it or --no-save")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), __file__, "--worker", "--problem", args.problem, "--batch",
           str(args.batch), "--k", str(args.k), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(proc.stdout[-4000:] + proc.stderr[-4000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    report["note"] = args.note
    text = markdown(report, args.note)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
