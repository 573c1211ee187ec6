"""The bundled small diffusion model: an EDM-preconditioned U-Net trained on scikit-learn's digits.

``load_default_model()`` returns the shipped ``digits-unet-v1`` (data/digits_unet.safetensors + .json) as an
``edm`` :class:`~epd_solver.denoisers.Denoiser` on 1x8x8 images in [-1, 1] (sigma in [0.002, 80],
``shape = (1, 8, 8)``, start ``x = 80 z``); ``load_model_from(path)`` loads a model trained with
``epd train-model``.

digits-unet-v1: ``DigitsUNet`` (see ``unet.py``) with C = 16, one ResBlock per down level, 287 073
parameters, 1.2 MB of float32 weights (EMA). Trained with

    epd train-model --dataset digits --out out/digits-unet-v1 --steps 5000 --seed 0 --threads 1

(defaults: batch 128, Adam lr 2e-3 with 200 warm-up steps, no dropout, EMA half-life 50k samples): 952 s
on two x86-64 cores shared with other jobs (11.5 min of CPU time), final running loss 0.433. No data
augmentation (flips and shifts would change what a digit looks like). Quality
(``benchmarks/results/model_quality.json``): with EDM Heun at 200 NFE, a logistic regression fitted to the
real digits is sure (p >= 0.8) of 87 % of 1000 samples (94 % of the real digits), every class 8-13 %;
pixel Frechet distance 0.108 of 2000 samples to the digits, against 0.255 between two halves of the digits.

digits-cond-v1 (``load_cond_model()``, ``--model digits-cond``; data/digits_cond_unet.*): the same U-Net
with a label embedding (``num_classes = 10``, null label 10, 287 777 parameters, 1.2 MB), called as
``D(x, sigma, class_labels=LongTensor[B])``; trained with label dropout 0.1 so label 10 is the
unconditional model (``CFGDenoiser(model, w, model.null_condition())`` guides). Trained with

    epd train-model --conditional --out out/digits-cond-v1 --steps 3000 --seed 0 --threads 1

in 933 s on two x86-64 cores under a load of 6-7 from other jobs (0.18 s/step, 9 min, at load ~2),
final running loss 0.397. ``benchmarks/cfg_digits.py`` (EDM Heun 40 steps, 200 samples per class):
a logistic regression fitted to the real digits labels 97.8 % of the conditional samples (w = 1) as
requested, 100 % at w = 2 and 3; per-class pixel Frechet distance to that class's digits averages 0.63 at
w = 1, 1.52 at w = 2, 2.64 at w = 3 (guidance trades diversity for class fidelity), and 2.01 for
unconditional samples grouped by the classifier.
"""

from __future__ import annotations

from importlib import resources

import torch

from .denoiser import COND_KEY, MissingConditioningError, UNetDenoiser, load_model_from, save_model
from .train import TrainConfig, edm_loss, train
from .unet import SIGMA_DATA, DigitsUNet, EDMPrecondNet

__all__ = ["load_default_model", "load_cond_model", "load_model_from", "MissingConditioningError", "COND_KEY",
           "COND_MODEL_FILE", "save_model", "UNetDenoiser", "DigitsUNet", "EDMPrecondNet",
           "SIGMA_DATA", "TrainConfig", "train", "edm_loss", "DEFAULT_MODEL_FILE"]

DEFAULT_MODEL_FILE = "digits_unet.safetensors"
COND_MODEL_FILE = "digits_cond_unet.safetensors"


def load_default_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> UNetDenoiser:
    """The shipped digits model (name ``digits-unet-v1``, kind ``edm``, ``shape = (1, 8, 8)``)."""
    with resources.as_file(resources.files("epd_solver.data").joinpath(DEFAULT_MODEL_FILE)) as path:
        return load_model_from(path, dtype=dtype, device=device)


def load_cond_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> UNetDenoiser:
    """The shipped class-conditional digits model (``digits-cond-v1``): call it with ``class_labels``."""
    with resources.as_file(resources.files("epd_solver.data").joinpath(COND_MODEL_FILE)) as path:
        return load_model_from(path, dtype=dtype, device=device)
