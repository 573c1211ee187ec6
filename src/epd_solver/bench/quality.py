"""Distribution metrics of the bench: Fréchet distance in pixel (or user feature) space, and FID.

Reference statistics: for a Gaussian mixture in pixel space its exact data moments; for the digits model
the 1797 scikit-learn digits; with a user feature extractor or Inception, features of the data (exact
mixture samples or the digits). FID needs a local TorchScript Inception file (``--inception-weights``);
``--fid-ref`` replaces the data reference with EDM-format statistics.

Class-conditional runs (``labels``: each sample's class) whose data have labels (``gmm:digits-cond``: exact class
moments; the ``digits-cond`` U-Net: the labelled digits) compare each class's samples with that class's data
(``fd_per_class``), and all samples with the class data mixed in the samples' label proportions (``fd``).
FID stays against the whole data set.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ..metrics import FeatureStats, InceptionFeatures, compute_stats, frechet_distance, load_reference
from .reference import is_exact_problem, mixture_moments

__all__ = ["image_shape", "model_data", "class_data", "Quality", "load_feature_extractor"]

MIXTURE_DATA_SAMPLES = 10_000
DATA_SEED = 12345


def image_shape(model: Any) -> tuple[int, int, int] | None:
    """(C, H, W) to view a sample as an image: the model's own 3-D shape, or a flat vector of C*S*S values
    (C = 3 preferred, then 1); None when neither fits."""
    shape = tuple(getattr(model, "shape", ()) or ())
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    d = int(np.prod(shape)) if shape else 0
    for c in (3, 1):
        side = math.isqrt(d // c) if d % c == 0 else 0
        if side > 1 and c * side * side == d:
            return c, side, side
    return None


def model_data(model: Any, n: int) -> torch.Tensor | None:
    """Real data in the model's sample shape: exact mixture samples, the digits for the digits model."""
    shape = tuple(model.shape)
    if is_exact_problem(model):
        return model.sample_data(n, generator=torch.Generator().manual_seed(DATA_SEED)).reshape((n,) + shape)
    training = (getattr(model, "config", None) or {}).get("training", {})
    dataset = training.get("dataset", training.get("config", {}).get("dataset"))
    if dataset == "digits" or str(getattr(model, "name", "")).startswith("digits"):
        from ..problems import digits_data

        data = digits_data()
        if data[0].numel() == int(np.prod(shape)):
            return data.reshape((-1,) + shape)
    return None


def class_data(model: Any, classes: list[int], n: int) -> dict[int, torch.Tensor] | None:
    """Real data of each class in the model's sample shape (``n`` exact samples of a conditional mixture's class,
    the digits of that label for the digits models), or None when the model's data carry no labels."""
    shape = tuple(model.shape)
    if is_exact_problem(model):
        if not hasattr(model, "class_mixture"):
            return None
        return {c: model.class_mixture(c).sample_data(n, generator=torch.Generator().manual_seed(DATA_SEED + c))
                .reshape((n,) + shape) for c in classes}
    data = model_data(model, n) if getattr(model, "num_classes", None) is not None else None
    if data is None:
        return None
    from ..problems import digits_labels

    y = digits_labels()  # model_data gives the digits in scikit-learn's order
    return {c: data[y == c] for c in classes} if data.shape[0] == y.shape[0] else None


def _mixed(moments: dict[int, tuple[np.ndarray, np.ndarray]], weights: dict[int, float]):
    """Mean and covariance of the mixture of the class distributions with these weights."""
    mu = sum(w * moments[c][0] for c, w in weights.items())
    second = sum(w * (moments[c][1] + np.outer(moments[c][0], moments[c][0])) for c, w in weights.items())
    return mu, second - np.outer(mu, mu)


def load_feature_extractor(spec: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``module:function`` returning a callable samples -> (n, d) features."""
    from ..resolve import import_callable

    factory = import_callable(spec, "--features")
    extractor = factory()
    if not callable(extractor):
        raise ValueError(f"--features {spec!r} did not return a callable")
    return extractor, spec


class Quality:
    """Reference statistics set up once per model; :meth:`measure` gives {"fd": ..., "fid": ...} of samples."""

    def __init__(self, model: Any, features: str | None = None, inception_weights: str | None = None,
                 fid_ref: str | None = None, labels: torch.Tensor | None = None):
        self.model = model
        self.notes: list[str] = []
        self.labels = labels
        self.class_ref: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
        self.fd_ref: tuple[np.ndarray, np.ndarray] | None = None
        self.fid_ref: tuple[np.ndarray, np.ndarray] | None = None
        self.inception: InceptionFeatures | None = None
        if fid_ref is not None or inception_weights is not None:
            self.inception = InceptionFeatures(inception_weights)  # FileNotFoundError naming --inception-weights
            if image_shape(model) is None:
                raise ValueError(f"FID needs image samples; model {model.name!r} has samples of shape {model.shape}")
        self.features, self.feature_name = (load_feature_extractor(features) if features else (_pixels, "pixels"))
        data = None
        if features is None and is_exact_problem(model):
            self.fd_ref = mixture_moments(model)
            self.notes.append("Fréchet distance in pixel space against the mixture's exact data moments")
        else:
            data = model_data(model, MIXTURE_DATA_SAMPLES)
            if data is not None:
                self.fd_ref = _moments(compute_stats(data.split(1000), self.features))
                self.notes.append(f"Fréchet distance in {self.feature_name} space against {data.shape[0]} data samples")
            else:
                self.notes.append("no data for this model: Fréchet distance not computed")
        if labels is not None:
            self._class_reference(labels, features is None)
        if self.inception is not None:
            if fid_ref is not None:
                self.fid_ref = load_reference(fid_ref)
                self.notes.append(f"FID ({self.inception.name}) against {fid_ref}")
            else:
                data = model_data(model, MIXTURE_DATA_SAMPLES) if data is None else data
                if data is None:
                    raise ValueError("FID: this model has no bundled data; pass reference statistics with --fid-ref")
                self.fid_ref = _moments(compute_stats(self._images(data).split(250), self.inception))
                self.notes.append(f"FID ({self.inception.name}) against {data.shape[0]} data samples")

    def _class_reference(self, labels: torch.Tensor, pixels: bool) -> None:
        classes = sorted(set(int(v) for v in labels.tolist()))
        if pixels and is_exact_problem(self.model) and hasattr(self.model, "class_mixture"):
            self.class_ref = {c: mixture_moments(self.model.class_mixture(c)) for c in classes}
            where = "the exact moments of each class's components"
        else:
            data = class_data(self.model, classes, max(1000, MIXTURE_DATA_SAMPLES // len(classes)))
            if data is None:
                self.notes.append("the model's data carry no class labels: Fréchet distance against all data, "
                                  "none per class")
                return
            self.class_ref = {c: _moments(compute_stats(d.split(1000), self.features)) for c, d in data.items()}
            where = f"each class's data ({self.feature_name})"
        counts = {c: int((labels == c).sum()) for c in classes}
        self.fd_ref = _mixed(self.class_ref, {c: k / labels.numel() for c, k in counts.items()})
        self.notes[-1:] = [f"Fréchet distance per class (fd_per_class) against {where}; overall against the classes "
                           "mixed in the samples' label proportions"]

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((x.shape[0],) + image_shape(self.model)).to(torch.float32)

    def measure(self, x: torch.Tensor) -> dict[str, float | None]:
        out: dict[str, float | None] = {"fd": None, "fid": None}
        if self.fd_ref is not None:
            out["fd"] = frechet_distance(*_moments(compute_stats(x.split(1000), self.features)), *self.fd_ref)
        if self.fid_ref is not None:
            out["fid"] = frechet_distance(*_moments(compute_stats(self._images(x).split(250), self.inception)),
                                          *self.fid_ref)
        if self.class_ref is not None:
            per = {}
            for c, ref in self.class_ref.items():
                mine = x[self.labels.to(x.device) == c]
                per[str(c)] = None if mine.shape[0] < 2 else frechet_distance(
                    *_moments(compute_stats(mine.split(1000), self.features)), *ref)
            out["fd_per_class"] = per
        return out


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _moments(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    return stats.mean(), stats.cov()
