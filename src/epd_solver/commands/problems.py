"""``epd problems``: list the exact test problems and check their ground-truth ODE solve."""

from __future__ import annotations

import time

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("problems", help="list the exact Gaussian-mixture problems and time their ground-truth solve",
                       description="List the exact problems (closed-form denoisers) and solve the probability-flow "
                                   "ODE exactly (scipy DOP853 in log sigma) for a few noises.")
    p.add_argument("--samples", type=int, default=8, help="noises to solve per problem (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..problems import PROBLEMS, exact_endpoint

    from .threads import set_threads

    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    set_threads(args.threads)
    print(f"{'problem':<16}{'dim':>6}{'components':>12}{'sigma range':>20}{'exact solve':>14}{'|x0| rms':>10}")
    for name, make in PROBLEMS.items():
        gm = make()
        g = torch.Generator().manual_seed(args.seed)
        x = gm.prior_scale * torch.randn(args.samples, gm.dim, generator=g, dtype=torch.float64)
        t = time.perf_counter()
        classes = getattr(gm, "num_classes", None)  # a class-conditional problem: labels 0, 1, ... in turn
        rows = {gm.condition_key: torch.arange(args.samples) % classes} if classes else None
        x0 = exact_endpoint(gm, x, gm.sigma_max, gm.sigma_min, rows=rows)
        dt = time.perf_counter() - t
        rng = f"[{gm.sigma_min:g}, {gm.sigma_max:g}]"
        print(f"{name:<16}{gm.dim:>6}{len(gm.weights):>12}{rng:>20}{dt:>12.2f} s{x0.pow(2).mean().sqrt():>10.3f}")
    return 0
