"""EPD-Solver and EPD-Plugin (plus AMED-Solver / AMED-Plugin as learned tables): one step, rollouts,
learnable tables, parameter files, and the registered samplers "epd", "epd_plugin", "amed", "amed_plugin"."""

from .parameterization import EPDTables
from .params import EPDParams, ParamsError, ParamsFileError, ParamsMismatchError
from .sampler import sample_amed, sample_amed_plugin, sample_epd, sample_epd_plugin, sample_epd_solver
from .step import adams_bashforth, amed_plugin_rollout, branch_sigmas, epd_step, rollout

__all__ = ["EPDTables", "EPDParams", "ParamsError", "ParamsFileError", "ParamsMismatchError", "sample_epd",
           "sample_epd_solver", "sample_epd_plugin", "sample_amed", "sample_amed_plugin", "epd_step", "rollout",
           "amed_plugin_rollout", "adams_bashforth", "branch_sigmas"]
