"""How a budget scales the default recipe: ``budget=N`` model evaluations, a duration (``"10min"``, ``"90s"``,
``"1h"``: model time at the seconds per evaluation measured on the model first), or ``"auto"`` (the default
recipe's: both ``DEFAULT_EVALUATIONS`` and ``DEFAULT_DURATION``), or ``"off"`` (the recipe's sizes as they are).

The recipe's parts shrink rung by rung (``RUNGS``, richest first) until the run's estimate fits
(``estimate.fit_budget``); options given explicitly are never changed. The order is the one measured to lose the
least quality on the digits mixture (benchmarks/README.md, "Distillation cost"): the selection set, the init
candidates and the teacher's refinement tolerance cost nothing, so every rung has their cheap settings; then fewer
training trajectories with a smaller validation set; at the bottom one candidate grid, fewer L-BFGS steps and a
fixed teacher.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["RUNGS", "DEFAULT_EVALUATIONS", "DEFAULT_DURATION", "parse_budget", "BudgetError"]

DEFAULT_EVALUATIONS = 700_000
# seconds of model time at the measured speed: the bundled digits U-Net then distils in under 30 s on 2 CPU cores;
# a model of SD1.5's cost (assumed 25 ms per guided evaluation on one GPU, a backward twice that) gets the
# smallest rung, about 6 minutes (benchmarks/results/distill_cost.md)
DEFAULT_DURATION = 20.0


class BudgetError(ValueError):
    """A budget that cannot be read, or given to a recipe it does not scale."""


def _rung(t: int, v: int, **more: Any) -> dict[str, Any]:
    return dict(trajectories=t, val_trajectories=v, batch=min(128, max(8, t // 4)), **more)


LEAN = dict(schedule="time_uniform", init="deterministic")
RUNGS: tuple[dict[str, Any], ...] = (
    _rung(512, 64), _rung(384, 64), _rung(256, 64), _rung(192, 48), _rung(128, 32), _rung(96, 32),
    _rung(64, 32), _rung(48, 24), _rung(32, 16), _rung(32, 16, **LEAN), _rung(16, 16, lbfgs_iterations=10, **LEAN),
    _rung(16, 16, lbfgs_iterations=8, lbfgs_rounds=2, teacher_points=3, **LEAN),
)
_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_budget(value: Any) -> tuple[int | None, float | None]:
    """(evaluations cap, seconds cap) of a budget value."""
    if value == "auto":
        return DEFAULT_EVALUATIONS, DEFAULT_DURATION
    if value == "off":
        return None, None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise BudgetError(f"budget must be a positive number of model evaluations, got {value}")
        return value, None
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "").replace(",", "")
        if text.isdigit():
            return parse_budget(int(text))
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m|h)", text)
        if m and float(m.group(1)) > 0:
            return None, float(m.group(1)) * _UNITS[m.group(2)]
    raise BudgetError(f"budget {value!r} is not a number of model evaluations (e.g. 200000), a duration "
                      "(e.g. 90s, 10min, 1h), 'auto' or 'off'")
