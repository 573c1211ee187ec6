"""The three nodes: a SAMPLER and its SIGMAS from a parameter file, and a node that distils one.

Conventions follow ComfyUI's ``comfy_extras/nodes_custom_sampler.py``: classic node classes with
``INPUT_TYPES``/``RETURN_TYPES``/``FUNCTION``/``CATEGORY``; the SAMPLER is a ``comfy.samplers.KSAMPLER``
around a k-diffusion-style function, so it plugs into SamplerCustom and SamplerCustomAdvanced.
"""

from __future__ import annotations

import os

import torch

import comfy.samplers
import comfy.utils
import folder_paths
from epd_solver.distillation.config import RECIPES
from epd_solver.epd.params import SOLVERS

from .bridge import (FOLDER, EPDNodeError, check_against_model, distill_for_guider, load_table, make_sampler_function,
                     new_output_path, parse_options, validation_line)

CATEGORY = "sampling/custom_sampling/epd_solver"

if FOLDER not in folder_paths.folder_names_and_paths:  # models/epd_solver, listed in the EPD Sampler's menu
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


def _table_names() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def _resolve(params_name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, params_name)
    if path is None:
        raise EPDNodeError(f"no parameter file {params_name!r} in {folder_paths.get_folder_paths(FOLDER)}: put the "
                           f"file there (EPD Distill writes it there) and refresh")
    return path


class EPDSampler:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"model": ("MODEL",),
                             "params_name": (_table_names(),)},
                "optional": {"sigmas": ("SIGMAS",)}}

    RETURN_TYPES = ("SAMPLER",)
    CATEGORY = CATEGORY
    FUNCTION = "get_sampler"
    DESCRIPTION = ("A learned sampler (EPD, EPD-Plugin, AMED, AMED-Plugin) from a parameter file, checked against "
                   "the model's sigma range and, when given, the SIGMAS it will run on (use EPD Sigmas).")

    def get_sampler(self, model, params_name, sigmas=None):
        params = load_table(_resolve(params_name))
        check_against_model(params, model.get_model_object("model_sampling"), sigmas)
        return (comfy.samplers.KSAMPLER(make_sampler_function(params)),)


class EPDSigmas:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"model": ("MODEL",),
                             "params_name": (_table_names(),)}}

    RETURN_TYPES = ("SIGMAS",)
    CATEGORY = CATEGORY
    FUNCTION = "get_sigmas"
    DESCRIPTION = "The parameter file's own sigma grid with the trailing 0 (the last step denoises to sigma 0)."

    def get_sigmas(self, model, params_name):
        params = load_table(_resolve(params_name))
        check_against_model(params, model.get_model_object("model_sampling"), None)
        return (torch.cat([params.sigmas.float(), torch.zeros(1)]),)


class EPDDistill:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"model": ("MODEL",),
                             "positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",),
                             "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                             "latent_image": ("LATENT",),
                             "solver": (list(SOLVERS),),
                             "nfe": ("INT", {"default": 5, "min": 2, "max": 50}),
                             "recipe": (list(RECIPES),),
                             "trajectories": ("INT", {"default": 512, "min": 2, "max": 1000000,
                                                      "tooltip": "training noises: the budget"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 99}),
                             "filename_prefix": ("STRING", {"default": "epd"}),
                             "destination": (["models", "output"],)},
                "optional": {"options": ("STRING", {"default": "{}", "multiline": True,
                                                    "tooltip": "more distillation settings as JSON, e.g. "
                                                               "{\"k\": 3, \"lbfgs_rounds\": 2}"})}}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("params_name", "report")
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    FUNCTION = "distill"
    DESCRIPTION = ("Distils a learned-solver table for the loaded MODEL under its CONDITIONING and CFG, on "
                   "latents of LATENT's shape; writes a new file (never overwriting) into models/epd_solver or "
                   "output/epd_solver and reports whether it beats the best training-free solver on held-out "
                   "noises.")

    def distill(self, model, positive, negative, cfg, latent_image, solver, nfe, recipe, trajectories, seed,
                filename_prefix, destination, options="{}"):
        folder = (folder_paths.get_folder_paths(FOLDER)[0] if destination == "models"
                  else os.path.join(folder_paths.get_output_directory(), FOLDER))
        new_output_path(folder, filename_prefix, solver, nfe)  # a bad prefix fails before the work
        bar = comfy.utils.ProgressBar(1)
        params = distill_for_guider(model, positive, negative, cfg, latent_image["samples"], solver=solver,
                                    nfe=nfe, recipe=recipe, trajectories=trajectories, seed=seed,
                                    options=parse_options(options),
                                    progress=lambda i, total: bar.update_absolute(i, total))
        path = params.save(new_output_path(folder, filename_prefix, solver, nfe))
        report = f"{path.name}: " + validation_line(params)
        return {"ui": {"text": [report]}, "result": (path.name, report)}


NODE_CLASS_MAPPINGS = {"EPDSampler": EPDSampler, "EPDSigmas": EPDSigmas, "EPDDistill": EPDDistill}
NODE_DISPLAY_NAME_MAPPINGS = {"EPDSampler": "EPD Sampler", "EPDSigmas": "EPD Sigmas", "EPDDistill": "EPD Distill"}
