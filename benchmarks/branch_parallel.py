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
                   (4 hidden layers of 1024), model-bound with small rows, like a real denoiser.

    python benchmarks/branch_parallel.py [--problem mlp] [--batch 256] [--repeats 7]

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
PROBLEMS = {"synthetic": dict(components=8, rank=16), "synthetic-heavy": dict(components=32, rank=64),
            "mlp": dict(width=1024, depth=4)}


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
    x = du.noise_for_seeds(range(args.batch), (model.dim,), torch.float64) * float(params.sigmas[0])
    parallel = du.RowParallelDenoiser(model)

    def run(m):
        return sample_epd(m, x, params.sigmas, params, disable=True, return_info=True)

    run(model)  # warm-up: mixture caches, allocator
    run(parallel)
    single_s, parallel_s, single_cpu, parallel_cpu, waiting_cpu = [], [], [], [], []
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        du.barrier()
        t, c = time.perf_counter(), time.process_time()
        if me == 0:
            ref, info = run(model)
            single_s.append(time.perf_counter() - t)
            single_cpu.append(time.process_time() - c)
        du.barrier()
        if me == 1:
            waiting_cpu.append(time.process_time() - c)  # what rank 1 burns while it waits
        t, c = time.perf_counter(), time.process_time()
        out, _ = run(parallel)
        cpu = time.process_time() - c
        du.barrier()
        parallel_s.append(time.perf_counter() - t)
        busier = torch.tensor([cpu], dtype=torch.float64)
        torch.distributed.all_reduce(busier, op=torch.distributed.ReduceOp.MAX)
        parallel_cpu.append(float(busier))  # the busier rank's CPU seconds
    waiting_cpu = du.broadcast_object(waiting_cpu, src=1)
    if me == 0:
        diff = float((out - ref).abs().max() / ref.abs().max())
        nfe = info.nfe
        report = {
            "problem": args.problem, "dim": model.dim, **PROBLEMS[args.problem],
            "dtype": "float64 sampler" + (", float32 network" if args.problem == "mlp" else ""),
            "batch": args.batch, "k": args.k, "steps": args.steps, "para_nfe": nfe.para_nfe,
            "evaluations_per_sample": nfe.evaluations, "rows_per_branch_call": args.batch * args.k,
            "ranks": du.world_size(), "threads_per_process": torch.get_num_threads(), "backend": "gloo",
            "single_s": single_s, "branch_parallel_s": parallel_s,
            "single_median_s": statistics.median(single_s), "branch_parallel_median_s": statistics.median(parallel_s),
            "speedup_median": statistics.median(single_s) / statistics.median(parallel_s),
            "speedup_best": min(single_s) / min(parallel_s),
            "all_gathers_per_run": parallel.collectives // (args.repeats + 1),
            "single_cpu_s": single_cpu, "branch_parallel_max_rank_cpu_s": parallel_cpu,
            "waiting_rank_cpu_s": waiting_cpu,
            "speedup_cpu_time": statistics.median(single_cpu) / statistics.median(parallel_cpu),
            "max_relative_difference": diff,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "python": platform.python_version(),
        }
        print("RESULT " + json.dumps(report))
    du.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(r: dict) -> str:
    if r["problem"] == "mlp":
        return f"d = {r['dim']}, float32 MLP stand-in, {r['depth']} hidden layers of {r['width']}"
    return f"Gaussian mixture, d = {r['dim']}, {r['components']} components of rank {r['rank']}"


def markdown(report: dict, note: str) -> str:
    r = report
    return "\n".join([
        f"# Branch-parallel EPD, {r['problem']} ({describe(r)}), 2 ranks vs 1 process",
        "",
        f"EPD K = {r['k']}, {r['steps']} steps (Para.NFE {r['para_nfe']}, {r['evaluations_per_sample']:g} "
        f"evaluations per sample), batch {r['batch']} ({r['rows_per_branch_call']} rows per branch call), "
        f"{r['dtype']}, gloo, {r['threads_per_process']} thread per process, "
        f"{r['all_gathers_per_run']} all_gathers per run (one per round).",
        "",
        "| | median s | best s | runs (s) |",
        "|---|---|---|---|",
        f"| 1 process | {r['single_median_s']:.3f} | {min(r['single_s']):.3f} | "
        f"{', '.join(f'{t:.3f}' for t in r['single_s'])} |",
        f"| 2 ranks, branch-parallel | {r['branch_parallel_median_s']:.3f} | {min(r['branch_parallel_s']):.3f} | "
        f"{', '.join(f'{t:.3f}' for t in r['branch_parallel_s'])} |",
        "",
        f"**Wall-clock speed-up: {r['speedup_median']:.2f}x (medians), {r['speedup_best']:.2f}x (best runs).** "
        f"Largest relative difference of the outputs: {r['max_relative_difference']:.1e}.",
        "",
        f"CPU seconds (less sensitive to other load on the machine): 1 process "
        f"{statistics.median(r['single_cpu_s']):.3f}, busier rank {statistics.median(r['branch_parallel_max_rank_cpu_s']):.3f} "
        f"(ratio {r['speedup_cpu_time']:.2f}); rank 1 used {statistics.median(r['waiting_rank_cpu_s']):.3f} CPU s "
        "while waiting during the 1-process runs.",
        "",
        f"Machine: {r['cpu_count']} CPUs ({r['machine']}), torch {r['torch']}; load average "
        f"{r['load_average_before'][0]:.1f} before, {r['load_average_after'][0]:.1f} after. {note}",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="synthetic-heavy")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
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
