"""Distillation of EPD-Solver, EPD-Plugin, AMED-Solver and AMED-Plugin tables.

``distill(model, solver="epd", nfe=5, recipe="default", **options) -> EPDParams`` (also ``epd_solver.distill``). The
orchestration, one question per module: ``datasets`` (which data sets and references: seeds, start states,
conditions, the teacher and its refinement, the selection and check sets), ``candidates`` (which (grid, init)
candidates, their starting tables and how one is chosen), ``api`` (how one run goes: each candidate trained, the
winner's parameter file and record), ``verdict`` (the comparison with the best training-free solver and its report
line), ``cost`` / ``estimate`` / ``budget`` (what a run spends in model evaluations, what it will spend before
it starts, and how a budget scales the default recipe; ``plan`` returns the estimate without the work), ``auto``
(``distill_auto``: which learned family to distil for a per-sample budget of evaluations or rounds). The pieces
they use: teacher trajectories on a refined grid with an on-disk cache (``teacher``, ``cache``),
the differentiable student (``student``), losses (``losses``), the training loop with validation and checkpoints
(``train``), the training-free field (``validate``) and the named recipes (``config``).
"""

from .api import DistillRun, distill, plan, report_line, warm_start
from .auto import candidates_for, distill_auto
from .cache import DiskCache, default_cache_dir, model_fingerprint
from .config import RECIPES, DistillConfig, make_config, recipe_defaults
from .losses import LOSSES, DistillLoss
from .student import Student
from .teacher import TeacherSpec, run_teacher, teacher_grid

__all__ = ["distill", "distill_auto", "candidates_for", "plan", "DistillRun", "report_line", "warm_start",
           "DiskCache", "default_cache_dir", "model_fingerprint", "RECIPES", "DistillConfig", "make_config",
           "recipe_defaults", "LOSSES", "DistillLoss", "Student", "TeacherSpec", "run_teacher", "teacher_grid"]

