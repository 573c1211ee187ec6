"""Distillation of EPD-Solver, EPD-Plugin, AMED-Solver and AMED-Plugin tables (EPD.md §9).

``distill(model, solver="epd", nfe=5, recipe="default", **options) -> EPDParams``. The pieces: teacher
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


class _CallableModule(type(__import__("sys"))):
    """``epd_solver.distill`` names both this package and the function: once any submodule is imported,
    Python binds the package to ``epd_solver.distill``, so the package itself forwards calls."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


def _bind() -> None:
    import inspect
    import sys

    sys.modules[__name__].__class__ = _CallableModule
    globals()["__signature__"] = inspect.signature(distill)


_bind()
