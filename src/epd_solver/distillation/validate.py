"""Held-out validation: student error, the best training-free solver at the same Para.NFE, exact references.

The training-free field is every registered training-free solver at the paper's setting
(``paper_setting``) and, for every solver with a fixed number of rounds per step, each schedule of
``SWEEP_SCHEDULES`` with AFS on and off (solver defaults otherwise), all at exactly the given Para.NFE.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import torch

from ..sampling import get_sampler, grid_points_for_nfe, list_samplers, sampler_spec
from ..schedules import get_sigmas
from .conditions import merge_rows

__all__ = ["SWEEP_SCHEDULES", "FIELD_LEAVES_OUT", "BaselineConfig", "baseline_configs", "run_baselines", "score_baselines", "rmse", "rmse_per_sample",
           "ratio_interval", "is_exact_problem", "exact_reference"]

# ParaDiGMS at a field's Para.NFE: on grids this coarse its Picard passes accept one point each and return Euler's
# end point (in the field) at many times its evaluations (88 at Para.NFE 5, a third of the field's cost);
# ``epd bench`` still compares it (benchmarks/README.md)
FIELD_LEAVES_OUT = ("paradigms",)
SWEEP_SCHEDULES: dict[str, tuple[str, dict[str, Any]]] = {
    "polynomial7": ("polynomial", {"rho": 7.0}),
    "logsnr": ("logsnr", {}),
    "time_uniform": ("time_uniform", {}),
}


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(mean over samples and elements of the squared error), in float64."""
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())


def rmse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.float64) - b.to(torch.float64)).pow(2).reshape(a.shape[0], -1).mean(1).sqrt()


def ratio_interval(err_a: torch.Tensor, err_b: torch.Tensor, level: float = 0.95, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of RMSE_a / RMSE_b from per-sample mean squared errors.

    The noises are resampled with replacement (the same indices for both solvers); the interval holds the
    central ``level`` of the resampled ratios. Wide when a few samples carry most of the error (e.g. samples
    ending in another mode): then the verdict needs more held-out noises.
    """
    a, b = err_a.to(torch.float64).reshape(-1), err_b.to(torch.float64).reshape(-1)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"need two non-empty per-sample error vectors of one length, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    idx = torch.randint(a.numel(), (draws, a.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = (a[idx].mean(1) / b[idx].mean(1)).sqrt()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(ratios, q).tolist()
    return lo, hi


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    solver: str
    schedule: str
    schedule_kwargs: tuple[tuple[str, Any], ...]
    n_points: int
    knobs: tuple[tuple[str, Any], ...]
    setting: str  # "paper" or "sweep"

    @property
    def afs(self) -> bool:
        return bool(dict(self.knobs).get("afs", False))

    def label(self) -> str:
        kw = "".join(f" {k}={v}" for k, v in self.schedule_kwargs)
        return f"{self.solver} [{self.setting}: {self.schedule}{kw}, N={self.n_points}, afs={self.afs}]"

    def sigmas(self, sigma_min: float, sigma_max: float) -> torch.Tensor:
        return get_sigmas(self.schedule, self.n_points, sigma_min, sigma_max, **dict(self.schedule_kwargs))

    @classmethod
    def of_row(cls, row: Mapping[str, Any]) -> "BaselineConfig":
        """The configuration of a row of :func:`run_baselines` / :func:`score_baselines`."""
        return cls(row["solver"], row["schedule"], _items(row["schedule_kwargs"]), int(row["n_points"]),
                   _items(row["knobs"]), row["setting"])

    def run(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, sigma_min: float, sigma_max: float,
            extra_args: dict[str, Any] | None = None, batch: int = 512, rows: dict[str, Any] | None = None):
        """End points from ``x0`` (no grad) and the sampler's last info (``rows``: per-trajectory conditioning)."""
        sampler = get_sampler(self.solver)
        sig = self.sigmas(sigma_min, sigma_max).to(device=x0.device, dtype=x0.dtype)
        outs, info = [], None
        with torch.no_grad():
            for i in range(0, x0.shape[0], batch):
                o, info = sampler(model, x0[i:i + batch], sig, merge_rows(extra_args, rows, slice(i, i + batch)),
                                  None, True, return_info=True, **dict(self.knobs))
                outs.append(o)
        return torch.cat(outs), info


def _items(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(d.items()))


def baseline_configs(nfe: int, solvers: list[str] | None = None, sweep: bool = True) -> list[BaselineConfig]:
    """The training-free field at Para.NFE ``nfe`` (see the module docstring); by default every training-free
    solver but ``FIELD_LEAVES_OUT``."""
    from ..solvers import paper_setting
    from ..solvers.settings import PAPER_ROWS

    names = solvers if solvers is not None else [n for n in list_samplers(learned=False)
                                                 if n not in FIELD_LEAVES_OUT]
    out: list[BaselineConfig] = []
    for name in names:
        if name in PAPER_ROWS:
            try:
                p = paper_setting(name, nfe)
            except ValueError:
                p = None
            if p is not None:
                out.append(BaselineConfig(name, p["schedule"], _items(p["schedule_kwargs"]), p["n_points"],
                                          _items(p["knobs"]), "paper"))
        if not sweep or sampler_spec(name).rounds_per_step is None:
            continue
        for schedule, kwargs in SWEEP_SCHEDULES.values():
            for afs in (False, True):
                try:
                    n = grid_points_for_nfe(name, nfe, afs=afs)
                except ValueError:
                    continue
                out.append(BaselineConfig(name, schedule, _items(kwargs), n, (("afs", afs),), "sweep"))
    return out


def run_baselines(model: Callable[..., torch.Tensor], x0: torch.Tensor, nfe: int, sigma_min: float, sigma_max: float,
                  extra_args: dict[str, Any] | None = None, solvers: list[str] | None = None,
                  batch: int = 512, rows: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every training-free configuration at Para.NFE ``nfe`` run from ``x0``: its description, NFE report
    and end points (``"output"``)."""
    out = []
    for cfg in baseline_configs(nfe, solvers):
        if cfg.afs and not getattr(model, "afs_allowed", True):  # flow models: AFS is undefined there
            continue
        output, info = cfg.run(model, x0, sigma_min, sigma_max, extra_args, batch, rows)
        out.append({"solver": cfg.solver, "label": cfg.label(), "setting": cfg.setting, "schedule": cfg.schedule,
                     "schedule_kwargs": dict(cfg.schedule_kwargs), "n_points": cfg.n_points, "afs": cfg.afs,
                     "knobs": dict(cfg.knobs), "para_nfe": info.nfe.para_nfe, "evaluations": info.nfe.evaluations,
                     "output": output})
    return out


def score_baselines(rows: list[dict[str, Any]], references: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """``rows`` without outputs, with ``rmse_<name>`` per reference, sorted by the first reference."""
    scored = []
    for row in rows:
        r = {k: v for k, v in row.items() if k != "output"}
        for name, ref in references.items():
            r[f"rmse_{name}"] = rmse(row["output"], ref)
        scored.append(r)
    first = f"rmse_{next(iter(references))}"
    scored.sort(key=lambda r: r[first] if math.isfinite(r[first]) else math.inf)
    return scored


def is_exact_problem(model: Any) -> bool:
    """Models whose ODE end point can be computed to tolerance (closed-form Gaussian-mixture denoisers, also
    under classifier-free guidance: a fixed combination of two closed forms)."""
    from ..denoisers import CFGDenoiser
    from ..problems import GaussianMixture

    if isinstance(model, CFGDenoiser):
        model = model.inner
    return isinstance(model, GaussianMixture)


def exact_reference(model: Callable[..., torch.Tensor], x0: torch.Tensor, sigma_max: float, sigma_min: float,
                    rtol: float = 1e-8, chunk: int = 128, extra_args: dict[str, Any] | None = None,
                    rows: dict[str, Any] | None = None) -> torch.Tensor:
    """The probability-flow ODE end point at sigma_min (scipy DOP853; float64)."""
    from ..problems import exact_endpoint

    return exact_endpoint(model, x0.to(torch.float64), float(sigma_max), float(sigma_min), extra_args, rtol=rtol,
                          atol=rtol, chunk=chunk, rows=rows)
