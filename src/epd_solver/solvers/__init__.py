"""Built-in training-free samplers (importing this package registers them) and the paper's settings."""

from .dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
from .ipndm import sample_ipndm
from .paradigms import sample_paradigms
from .settings import paper_setting, paper_sigmas
from .single_step import sample_dpm_2, sample_euler, sample_heun
from .unipc import sample_unipc

__all__ = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_unipc",
           "sample_ipndm", "sample_paradigms", "paper_setting", "paper_sigmas"]
