"""Distillation settings and the named recipes ``default``, ``official`` and ``amed``.

A recipe is a set of defaults; anything passed explicitly overrides it. ``official`` reproduces the
released ICCV runs, ``amed`` AMED's own recipe, ``default`` is this
library's recipe, chosen by the measurements in ``benchmarks/results/distill_recipes_digits.md`` (and ``_synthetic``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..epd.multistep_tables import LW_INITS, LW_KINDS
from ..epd.parameterization import INITS, KINDS
from .losses import LOSSES
from .student import BPTT_MODES, ROLLOUTS, SOLVERS
from .teacher import SUBGRIDS

__all__ = ["DistillConfig", "RECIPES", "OPTIMIZERS", "GRID_CANDIDATES", "INIT_CANDIDATES", "recipe_defaults",
           "make_config"]

OPTIMIZERS = ("adam", "lbfgs")
RECIPES = ("default", "official", "amed")
AUTO = "auto"
# schedule="auto": the student grids tried. The paper's time-uniform grid, and polynomial rho = 2 for models whose
# mode decisions need steps at high noise (where a gradient cannot move the grid: a sample ending in the wrong
# mode is a discrete event). With a selection set (the default recipe) every (grid, init) candidate trains
# select_after rounds, the best one's grid is kept and its inits finish; without one each grid trains in full
# and the lowest validation error wins. Measurements: benchmarks/results/distill_recipes_synthetic.md, _digits.md.
GRID_CANDIDATES: tuple[tuple[str, dict[str, float]], ...] = (("time_uniform", {}), ("polynomial", {"rho": 2.0}))
# init="auto" (needs a selection set): every candidate grid from each of these inits; "end" starts in the basin
# that wins Para.NFE 5 on the d = 3072 mixture (synthetic_probe.md), "deterministic" wins elsewhere.
INIT_CANDIDATES = ("deterministic", "end")
# select_noises: the reference of the selection set, a training-free solver at 20 evaluations (on the d = 3072
# mixture 0.009 RMSE to the exact end points and no sample in the wrong cluster of 2000;
# benchmarks/results/synthetic_probe.md).
SELECTION_REFERENCE = ("dpmpp_3m", "polynomial", {"rho": 7.0}, 21)
# select_noises="auto" (the default recipe): this many selection noises per training trajectory (1024 for 512;
# 8 per trajectory chose the same tables on gmm:digits at Para.NFE 5; 1 per trajectory, 64 noises for 64
# trajectories, chose a table of ratio 0.82 where 128 chose one of 0.62: benchmarks/results/distill_cost.md).
SELECTION_PER_TRAJECTORY = 2


@dataclasses.dataclass
class DistillConfig:
    """Every knob of one distillation run (see ``epd distill --help`` for the meaning of each)."""

    solver: str = "epd"
    nfe: int = 5
    k: int = 2
    afs: bool = True
    plugin_order: int | None = None
    schedule: str = "time_uniform"
    schedule_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    parameterization: str = "ordered"
    init: str = "deterministic"
    scale_dir: float = 0.05
    scale_time: float = 0.05
    teacher: str = "dpm_2"
    teacher_points: int | str = 3
    teacher_subgrid: str = "schedule"
    teacher_tolerance: float = 0.1
    teacher_max_points: int = 63
    rollout: str = "free"
    bptt: str = "full"
    loss: str = "per_step"
    feature_weight: float = 10.0
    optimizer: str = "adam"
    lr: float = 0.2
    lr_floor: float = 0.01
    trajectories: int = 10000
    batch: int = 32
    epochs: int = 1
    lbfgs_rounds: int = 4
    lbfgs_iterations: int = 15
    restarts: int = 1
    learn_grid: bool = False
    progressive: bool = False
    val_trajectories: int = 128
    select_noises: int | str = 0
    select_after: int = 2
    finalists: int = 0
    val_every: int = 50
    compare: bool = True
    exact_check: bool = True
    seed: int = 0
    budget: int | str | None = None
    recipe: str = "custom"

    def __post_init__(self):
        self.validate()

    # -- checks -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name, v, minimum=1):
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

        if self.solver not in SOLVERS:
            raise ValueError(f"unknown learned solver {self.solver!r}; choose one of {SOLVERS}")
        positive_int("nfe", self.nfe)
        positive_int("k", self.k)
        if self.solver.startswith("amed") and self.k != 1:
            raise ValueError(f"{self.solver} inserts one point per step: K = 1, got k={self.k}")
        lw = self.solver == "lw"
        if lw and self.k != 1:
            raise ValueError(f"lw evaluates once per step (no branches): K = 1, got k={self.k}")
        if self.solver == "epd_lw" and self.learn_grid:
            raise ValueError("learn_grid is not available for epd_lw")
        if lw and self.scale_dir != 0:
            raise ValueError("lw has no direction scale (its weights carry the step size): scale_dir=0")
        if not lw and (self.nfe + int(self.afs)) % 2:
            raise ValueError(f"Para.NFE {self.nfe} with afs={self.afs} is not reachable: EPD spends 2 rounds per "
                             "step minus 1 with AFS (odd Para.NFE needs AFS, even needs none)")
        if self.nfe + int(self.afs) < 2:
            raise ValueError("need at least one step")
        from ..schedules import SCHEDULES

        if self.schedule != AUTO and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {(AUTO, *SCHEDULES)}")
        if self.schedule == AUTO and self.schedule_kwargs:
            raise ValueError(f"schedule='auto' chooses among {GRID_CANDIDATES}: it takes no schedule_kwargs, "
                             f"got {self.schedule_kwargs}")
        if self.learn_grid and (self.loss != "final" or self.parameterization == "paper"):
            raise ValueError("learn_grid needs loss='final' (the teacher's intermediate states sit on the fixed "
                             "grid) and a grid-free parameterisation ('ordered' or 'official')")
        for name, choices in (("rollout", ROLLOUTS), ("bptt", BPTT_MODES), ("loss", LOSSES),
                              ("optimizer", OPTIMIZERS), ("teacher_subgrid", SUBGRIDS),
                              ("init", LW_INITS if lw else (*INITS, AUTO)),
                              ("parameterization", LW_KINDS if lw else KINDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.teacher_points != AUTO:
            positive_int("teacher_points", self.teacher_points, 0)
        positive_int("teacher_max_points", self.teacher_max_points, 1)
        for name in ("lr", "teacher_tolerance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not 0 <= self.lr_floor <= self.lr:
            raise ValueError(f"lr_floor must lie in [0, lr], got {self.lr_floor}")
        for name in ("trajectories", "batch", "epochs", "lbfgs_rounds", "lbfgs_iterations", "restarts",
                     "val_trajectories", "val_every", "select_after"):
            positive_int(name, getattr(self, name))
        positive_int("seed", self.seed, 0)
        positive_int("finalists", self.finalists, 0)
        if self.select_noises != AUTO and (isinstance(self.select_noises, bool)
                                           or not isinstance(self.select_noises, int) or self.select_noises < 0):
            raise ValueError(f"select_noises must be an integer >= 0 or 'auto', got {self.select_noises!r}")
        if self.selection_noises and self.optimizer != "lbfgs":
            raise ValueError("select_noises picks a candidate after select_after L-BFGS rounds: it needs "
                             "optimizer='lbfgs'")
        if self.init == AUTO and not self.selection_noises:
            raise ValueError(f"init='auto' (each candidate grid from each of {INIT_CANDIDATES}) needs select_noises "
                             "> 0: the 128 validation noises cannot choose among inits (synthetic_probe.md)")
        if self.budget is not None:
            from .budget import parse_budget

            parse_budget(self.budget)  # BudgetError (a ValueError) naming the forms
        if self.seed >= 100 or self.trajectories > 10_000_000:
            raise ValueError("seed must be < 100 and trajectories <= 10^7 (training seeds stay below the "
                             "validation range)")

    @property
    def n_points(self) -> int:
        """Student grid points N: Para.NFE = 2(N-1) - [AFS]; for ``lw`` (one evaluation per step) N-1 - [AFS]."""
        if self.solver == "lw":
            return self.nfe + int(self.afs) + 1
        return (self.nfe + int(self.afs)) // 2 + 1

    @property
    def evaluations(self) -> int:
        """Evaluations per sample: (N-1)(K+1) - [AFS]; for ``lw`` N-1 - [AFS] (= Para.NFE)."""
        per_step = 1 if self.solver == "lw" else self.branches + 1
        return (self.n_points - 1) * per_step - int(self.afs)

    @property
    def selection_noises(self) -> int:
        """Noises of the selection set: ``select_noises``, "auto" = SELECTION_PER_TRAJECTORY x trajectories."""
        if self.select_noises == AUTO:
            return SELECTION_PER_TRAJECTORY * self.trajectories
        return self.select_noises

    @property
    def branches(self) -> int:
        return 1 if self.solver.startswith("amed") or self.solver == "lw" else self.k

    @property
    def iterations(self) -> int:
        """Optimizer updates: Adam takes one per batch; L-BFGS rounds x iterations."""
        if self.optimizer == "lbfgs":
            return self.lbfgs_rounds * self.lbfgs_iterations
        return self.epochs * math.ceil(self.trajectories / self.batch)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def recipe_defaults(recipe: str, solver: str) -> dict[str, Any]:
    """The defaults of a named recipe for one learned solver."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    plugin = solver.endswith("_plugin")
    if solver == "epd_lw":  # EPD's default recipe, its branches along the learned-weights host's direction
        if recipe != "default":
            raise ValueError(f"'epd_lw' has the default recipe only, not {recipe!r}")
        return dict(_default_recipe(), plugin_order=4)
    if solver == "lw":
        if recipe != "default":
            raise ValueError(f"the learned-weights solver 'lw' has the default recipe only, not {recipe!r}")
        # measured on the digits mixture (benchmarks/results/distill_lw_digits.md): the recipe's 15 L-BFGS
        # iterations a round leave the weights under-trained (check-set ratio 0.65 at 5 evaluations even with 8
        # rounds); 40 a round give test ratios 0.41 / 0.60 at 5 / 8 evaluations, 80 give 0.39 / 0.32. Time scales
        # within 0.4 of 1 (check-set ratio 0.35 at 5 evaluations; within 0.05: 0.47, 0.7: 0.35).
        return dict(_default_recipe(), k=1, init="deterministic", parameterization="additive", scale_dir=0.0,
                    scale_time=0.4, lbfgs_iterations=80, plugin_order=4)
    if recipe == "official":  # released ICCV runs: K = 2, time_uniform rho 1, AFS, 10k trajectories
        return dict(schedule="time_uniform", schedule_kwargs={}, afs=True, k=2, parameterization="official",
                    init="randn", scale_dir=0.05, scale_time=0.2 if plugin else 0.05,
                    teacher="dpm_2" if plugin else "heun", teacher_points=3, teacher_subgrid="schedule",
                    rollout="free", bptt="full", loss="per_step", optimizer="adam", lr=0.2, lr_floor=0.01,
                    trajectories=10000, batch=16 if plugin else 32, epochs=1,
                    plugin_order=3 if solver == "epd_plugin" else None)
    if recipe == "amed":  # AMED's recipe, a per-step table instead of its network
        base = dict(afs=True, parameterization="official", init="deterministic", scale_dir=0.01,
                    scale_time=0.0, teacher="heun", teacher_subgrid="schedule", loss="per_step",
                    optimizer="adam", lr=5e-3, lr_floor=0.0, trajectories=10000, batch=128, epochs=1)
        if plugin:
            return dict(base, schedule="polynomial", schedule_kwargs={"rho": 7.0}, teacher_points=2,
                        rollout="free", bptt="full", plugin_order=4 if solver == "amed_plugin" else 3)
        return dict(base, schedule="time_uniform", schedule_kwargs={}, teacher_points=1,
                    rollout="teacher_forced", bptt="detached", plugin_order=None)
    return dict(_default_recipe(),
                plugin_order=3 if solver == "epd_plugin" else (4 if solver == "amed_plugin" else None))


def _default_recipe() -> dict[str, Any]:
    # default: see benchmarks/results/distill_recipes_digits.md and _synthetic.md
    return dict(schedule=AUTO, schedule_kwargs={}, afs=True, k=2, parameterization="ordered",
                init=AUTO, select_noises=AUTO, select_after=1, finalists=1, scale_dir=0.05, scale_time=0.05,
                teacher="dpm_2",
                teacher_points=AUTO, teacher_tolerance=0.3, teacher_max_points=15, budget="auto",
                teacher_subgrid="logsnr", rollout="free", bptt="full", loss="final", optimizer="lbfgs", lr=1.0,
                lr_floor=0.0, trajectories=512, batch=128, lbfgs_rounds=4, lbfgs_iterations=15, progressive=True)


def make_config(solver: str = "epd", nfe: int = 5, recipe: str = "default", **overrides: Any) -> DistillConfig:
    """A :class:`DistillConfig` from a recipe's defaults plus explicit ``overrides`` (None means "recipe's")."""
    values = recipe_defaults(recipe, solver)
    if solver != "lw":  # one evaluation per step reaches every NFE with and without AFS: the recipe's AFS stays
        values["afs"] = nfe % 2 == 1 if isinstance(nfe, int) else values["afs"]  # parity unless set: odd needs AFS
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(DistillConfig)}
    if unknown:
        raise TypeError(f"unknown distillation options {sorted(unknown)}")
    if solver.startswith("amed") and overrides.get("k") not in (None, 1):
        raise ValueError(f"{solver} inserts one point per step: K = 1, got k={overrides['k']}")
    if solver == "lw" and overrides.get("k") not in (None, 1):
        raise ValueError(f"lw evaluates once per step (no branches): K = 1, got k={overrides['k']}")
    if solver.startswith("amed") or solver == "lw":
        values["k"] = 1
    if values.get("select_noises") == AUTO and overrides.get("select_noises") is None \
            and values.get("optimizer") != "lbfgs":
        values["select_noises"] = 0  # the recipe's selection acts between L-BFGS rounds
    if values.get("init") == AUTO and overrides.get("init") is None and values.get("select_noises") in (0, None):
        values["init"] = "deterministic"  # the recipe's init="auto" needs a selection set; without one, its old start
    return DistillConfig(solver=solver, nfe=nfe, recipe=recipe, **values)
