"""Distillation of EPD-Solver, EPD-Plugin, AMED-Solver and AMED-Plugin tables (EPD.md §9).

``distill(model, solver="epd", nfe=5, recipe="default", **options) -> EPDParams`` (also ``epd_solver.distill``). The pieces: teacher
trajectories on a refined grid with an on-disk cache (``teacher``, ``cache``), the differentiable student
(``student``), losses (``losses``), the training loop with validation and checkpoints (``train``), the
comparison with the best training-free solver (``validate``) and the named recipes (``config``).
"""

from .api import DistillRun, distill, report_line, warm_start
from .cache import DiskCache, default_cache_dir, model_fingerprint
from .config import RECIPES, DistillConfig, make_config, recipe_defaults
from .losses import LOSSES, DistillLoss
from .student import Student
from .teacher import TeacherSpec, run_teacher, teacher_grid

__all__ = ["distill", "DistillRun", "report_line", "warm_start", "DiskCache", "default_cache_dir",
           "model_fingerprint", "RECIPES", "DistillConfig", "make_config", "recipe_defaults", "LOSSES",
           "DistillLoss", "Student", "TeacherSpec", "run_teacher", "teacher_grid"]

