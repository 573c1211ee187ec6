"""EPD-Solver and EPD-Plugin (plus AMED-Solver / AMED-Plugin as learned tables): one step, rollouts,
learnable tables, parameter files, and the registered samplers "epd", "epd_plugin", "amed", "amed_plugin"; the
learned-weights family "lw" (one evaluation per step, learned multistep weights) shares the file format."""

from .parameterization import EPDTables
from .multistep import ipndm_weights, lw_rollout
from .multistep_tables import EPDLWTables, LWTables
from .params import EPDParams, ParamsError, ParamsFileError, ParamsMismatchError
from .sampler import (sample_amed, sample_amed_plugin, sample_epd, sample_epd_lw, sample_epd_plugin, sample_epd_solver,
                      sample_lw)
from .step import adams_bashforth, amed_plugin_rollout, branch_sigmas, epd_step, rollout

__all__ = ["EPDTables", "EPDParams", "ParamsError", "ParamsFileError", "ParamsMismatchError", "sample_epd",
           "sample_epd_solver", "sample_epd_plugin", "sample_amed", "sample_amed_plugin", "epd_step", "rollout",
           "amed_plugin_rollout", "adams_bashforth", "branch_sigmas", "LWTables", "lw_rollout", "ipndm_weights",
           "sample_lw", "EPDLWTables", "sample_epd_lw"]
