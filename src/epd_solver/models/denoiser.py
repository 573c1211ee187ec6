"""The bundled model as a :class:`~epd_solver.denoisers.Denoiser`, and its file format.

A model file is ``NAME.safetensors`` (the EMA weights of the raw network, keys of ``DigitsUNet``) plus
``NAME.json`` (architecture, preconditioning, sigma range, training record). The same JSON is also stored
in the safetensors metadata under ``"config"``, so a lone ``.safetensors`` file loads too.

A class-conditional model (``net.num_classes`` > 0) records ``"conditioning": {"key": "class_labels",
"num_classes": K, "null_label": K, "label_dropout": p}`` and is called as ``D(x, sigma,
class_labels=LongTensor[B])`` (one label per row, or one for all); label K is the unconditional branch,
which is what :class:`~epd_solver.denoisers.CFGDenoiser` needs as ``uncond={"class_labels": K}``.
Calling it without ``class_labels`` raises :class:`MissingConditioningError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..denoisers import Denoiser
from .unet import SIGMA_DATA, DigitsUNet, EDMPrecondNet

__all__ = ["UNetDenoiser", "FORMAT", "save_model", "load_model_from", "model_config", "MissingConditioningError",
           "COND_KEY"]

COND_KEY = "class_labels"


class MissingConditioningError(ValueError):
    """A class-conditional model was called without its ``class_labels``."""

FORMAT = "epd-solver/edm-unet"
FORMAT_VERSION = 1


class UNetDenoiser(Denoiser):
    """D(x, sigma) of an EDM-preconditioned :class:`DigitsUNet`; frozen, but differentiable in ``x``.

    The network runs in its own dtype/device; ``x`` is converted there and the result converted back,
    so float64 solver arithmetic works with a float32 network. Parameters have ``requires_grad=False``;
    no ``torch.no_grad`` is applied here, so gradients flow into ``x`` (distillation needs that).
    """

    kind = "edm"

    def __init__(self, precond: EDMPrecondNet, config: Mapping[str, Any]):
        super().__init__(float(config["sigma_min"]), float(config["sigma_max"]), str(config["name"]))
        self.net = precond.eval().requires_grad_(False)
        self.config = dict(config)
        self.shape = tuple(int(s) for s in config["shape"])
        cond = self.config.get("conditioning") or {}
        self.num_classes: int | None = int(cond["num_classes"]) if cond else None
        self.null_label: int | None = int(cond["null_label"]) if cond else None
        if cond and (cond.get("key") != COND_KEY or self.num_classes != precond.net.num_classes
                     or self.null_label != self.num_classes):
            raise ValueError(f"{self.name}: conditioning record {cond} does not match the network "
                             f"({precond.net.num_classes} classes, key {COND_KEY!r}, null label = number of classes)")

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def null_condition(self) -> dict[str, torch.Tensor]:
        """The unconditional branch's conditioning, e.g. ``CFGDenoiser(model, w, model.null_condition())``."""
        if not self.conditional:
            raise ValueError(f"{self.name} is unconditional: it has no null label")
        return {COND_KEY: torch.tensor([self.null_label])}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "UNetDenoiser":
        self.net.to(device=device, dtype=dtype)
        return self

    def _labels(self, cond: dict[str, Any], batch: int) -> torch.Tensor | None:
        if not self.conditional:
            if cond:
                raise TypeError(f"{self.name} is unconditional; got conditioning {sorted(cond)}")
            return None
        labels = cond.pop(COND_KEY, None)
        if cond:
            raise TypeError(f"{self.name} takes only {COND_KEY!r} as conditioning; got {sorted(cond)}")
        if labels is None:
            raise MissingConditioningError(
                f"{self.name} is class-conditional: pass {COND_KEY}=LongTensor[B] with labels 0..{self.num_classes - 1}"
                f" (or {self.null_label}, the null label, for the unconditional model), or wrap it in "
                f"CFGDenoiser(model, scale, model.null_condition())")
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"{self.name}: {COND_KEY} must be integer class indices, got {labels.dtype}")
        if labels.ndim == 0 or labels.shape == (1,):
            labels = labels.reshape(1).expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"{self.name}: {COND_KEY} must have shape ({batch},) (one label per row) or be a "
                             f"single label, got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_label):
            raise ValueError(f"{self.name}: {COND_KEY} must lie in 0..{self.null_label} ({self.null_label} = null "
                             f"label), got {int(labels.min())}..{int(labels.max())}")
        return labels.to(self.device, torch.long)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        labels = self._labels(dict(cond), x.shape[0])
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name} takes x of shape [B, {', '.join(map(str, self.shape))}], "
                             f"got {tuple(x.shape)}")
        if torch.any(sigma <= 0):
            raise ValueError(f"{self.name} needs sigma > 0 (ln(sigma) is its noise input)")
        out = self.net(x.to(self.device, self.dtype), sigma.to(self.device, self.dtype), labels)
        return out.to(x.device, x.dtype)


def model_config(net: DigitsUNet, name: str, label_dropout: float | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON record of a model file (with a ``conditioning`` record when ``net`` is class-conditional)."""
    config = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "kind": "edm",
              "architecture": "DigitsUNet", "net": dict(net.config), "sigma_data": SIGMA_DATA,
              "sigma_min": 0.002, "sigma_max": 80.0, "shape": [net.config["in_channels"], 8, 8]}
    if net.num_classes:
        config["conditioning"] = {"key": COND_KEY, "num_classes": net.num_classes, "null_label": net.num_classes,
                                  "label_dropout": label_dropout}
    return {**config, **extra}


def save_model(net: DigitsUNet, config: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``path`` (.safetensors, float32 weights) and its sibling .json; returns the weights path."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={"config": text})
    tmp.replace(path)
    path.with_suffix(".json").write_text(text + "\n")
    return path


def _read_config(path: Path) -> dict[str, Any]:
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no {sidecar.name} beside it and no 'config' in its metadata")
    return json.loads(meta["config"])


def load_model_from(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> UNetDenoiser:
    """Load a model file (``.safetensors``/``.json`` pair, or a ``train-model`` output folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"no model file {path}")
    config = _read_config(path)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r} is not {FORMAT!r}")
    if config.get("architecture") != "DigitsUNet":
        raise ValueError(f"{path}: unknown architecture {config.get('architecture')!r}")
    net_cfg = dict(config["net"])
    net_cfg["mults"] = tuple(net_cfg["mults"])  # "num_classes" is absent from unconditional files
    net = DigitsUNet(**net_cfg)
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    net.load_state_dict(state, strict=True)
    precond = EDMPrecondNet(net, float(config["sigma_data"])).to(device=device, dtype=dtype)
    return UNetDenoiser(precond, config)
