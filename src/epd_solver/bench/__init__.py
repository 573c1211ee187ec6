"""``epd bench``: the paper's Table 1 on our problems (RMSE against the exact or a converged ODE solution,
Fréchet distance, optional FID), its figures, and the latency of batched EPD against single-call solvers."""

from .latency import latency_markdown, measure_latency, time_fn
from .runner import BenchConfig, rmse, run_bench

__all__ = ["BenchConfig", "run_bench", "rmse", "measure_latency", "latency_markdown", "time_fn"]
