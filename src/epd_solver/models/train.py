"""EDM training of :class:`DigitsUNet` (Karras et al. 2022, Table 1 "ours").

- sigma ~ exp(N(P_mean, P_std^2)) with P_mean = -1.2, P_std = 1.2;
- loss lambda(sigma) ||D(y + sigma n; sigma) - y||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2;
- Adam with a linear learning-rate warm-up, then constant; EMA of the weights with a half-life in
  samples that ramps up with the number of samples seen (EDM's ``ema_halflife_kimg``/``ema_rampup_ratio``).

Everything random (initialisation, batches, sigmas, noise, dropout) follows from the seed, and the
checkpoint stores the optimiser, the EMA and every generator state, so an interrupted run resumes to the
same numbers as an uninterrupted one (on the same device and thread count).

Defaults are the shipped model's. A sweep at 1k-4.5k steps (GPU, judged as in benchmarks/model_quality.py)
found: no dropout better than 0.1, batch 128 better than 64, lr 2e-3 slightly better than 1e-3, C = 32 or
two blocks per level not clearly better per step than C = 16 with one, and quality still rising at 4.5k steps.

Class-conditional training (``conditional=True``, the bundled ``digits-cond``): the network also takes the
digit's label; with probability ``label_dropout`` a training label is replaced by the null label (index =
number of classes), so the same network learns the unconditional denoiser for classifier-free guidance.
The labels and the dropout coin come from the same seeded generator, drawn after the noise, so an
unconditional run's random stream is unchanged.

Output folder: ``checkpoint.safetensors`` (full training state, rewritten every ``checkpoint_every``
steps), ``model.safetensors`` + ``model.json`` (EMA weights, loadable by ``load_model_from``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import trange

from .denoiser import model_config, save_model
from .unet import SIGMA_DATA, DigitsUNet, EDMPrecondNet

__all__ = ["TrainConfig", "train", "edm_loss", "dataset_images", "dataset_labels", "DATASETS"]

DATASETS = ("digits",)
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"


@dataclass
class TrainConfig:
    dataset: str = "digits"
    steps: int = 5000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 200
    seed: int = 0
    channels: int = 16
    mults: tuple[int, ...] = (1, 2, 2)
    blocks: int = 1
    dropout: float = 0.0
    p_mean: float = -1.2
    p_std: float = 1.2
    ema_halflife: float = 50_000.0      # samples
    ema_rampup: float = 0.1             # half-life <= ema_rampup * samples seen
    checkpoint_every: int = 500
    name: str = "digits-unet-v1"
    conditional: bool = False
    label_dropout: float = 0.1          # conditional only: probability of the null label per training sample
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.mults = tuple(int(m) for m in self.mults)
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {list(DATASETS)}")
        for key in ("steps", "batch", "channels", "blocks", "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")

    # fields that must match when resuming (steps, checkpoint_every and name may change)
    def fixed(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("steps", "checkpoint_every", "name", "extra"):
            d.pop(key)
        d["mults"] = list(d["mults"])
        if not self.conditional:  # unconditional records (and checkpoints) stay as they were
            d.pop("conditional"), d.pop("label_dropout")
        return d


def dataset_images(name: str) -> torch.Tensor:
    """Training images, float32 [N, 1, 8, 8] in [-1, 1]."""
    if name == "digits":
        from ..problems import digits_data

        return digits_data().to(torch.float32).reshape(-1, 1, 8, 8)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def dataset_labels(name: str) -> tuple[torch.Tensor, int]:
    """Class labels (int64 [N], aligned with :func:`dataset_images`) and the number of classes."""
    if name == "digits":
        from ..problems import digits_labels

        return digits_labels().to(torch.long), 10
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def edm_loss(precond: EDMPrecondNet, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples and pixels of lambda(sigma) (D(y + sigma n; sigma[, label]) - y)^2."""
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2
    return (weight * (precond(y + s * noise, sigma, class_labels) - y) ** 2).mean()


def _rng_tensor(state: torch.Tensor) -> torch.Tensor:
    return state.detach().to("cpu", torch.uint8).clone()


def _save_checkpoint(path: Path, step: int, cfg: TrainConfig, net: DigitsUNet, ema: DigitsUNet,
                     opt: torch.optim.Adam, gen: torch.Generator, history: list[list[float]],
                     running: float | None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"net.{k}"] = v.detach().cpu().contiguous()
    for k, v in ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.data"] = _rng_tensor(gen.get_state())
    tensors["rng.torch"] = _rng_tensor(torch.get_rng_state())
    if torch.cuda.is_available():
        tensors["rng.cuda"] = _rng_tensor(torch.cuda.get_rng_state())
    meta = {"step": str(step), "config": json.dumps(cfg.fixed()), "history": json.dumps(history),
            "running": json.dumps(running)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _load_checkpoint(path: Path, cfg: TrainConfig, net: DigitsUNet, ema: DigitsUNet, opt: torch.optim.Adam,
                     gen: torch.Generator) -> tuple[int, list[list[float]], float | None]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["config"])
    if saved != cfg.fixed():
        diff = sorted(k for k in saved if saved[k] != cfg.fixed().get(k))
        raise ValueError(f"{path} was trained with different settings ({', '.join(diff)}): use --force "
                         f"to start over, or the same settings to resume")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state = opt.state_dict()
    for idx in range(len(list(net.parameters()))):
        keys = [k for k in tensors if k.startswith(f"opt.{idx}.")]
        opt_state["state"][idx] = {k.split(".", 2)[2]: tensors[k] for k in keys}
    opt.load_state_dict(opt_state)
    gen.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    running = json.loads(meta["running"])
    return int(meta["step"]), json.loads(meta["history"]), running


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, force: bool = False,
          device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Train (or resume) into folder ``out``; returns a summary (steps, final loss, wall time, paths)."""
    out = Path(out)
    ckpt = out / CHECKPOINT
    existing = [p for p in (ckpt, out / MODEL) if p.exists()]
    if existing and not (resume or force):
        raise FileExistsError(f"{existing[0]} exists: pass --resume to continue or --force to start over")
    if resume and not force and not ckpt.exists():
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
    out.mkdir(parents=True, exist_ok=True)

    if str(device).startswith("cuda"):  # reproducible on the same GPU model and torch build
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    labels, classes = dataset_labels(cfg.dataset) if cfg.conditional else (None, 0)
    net = DigitsUNet(cfg.channels, cfg.mults, cfg.blocks, dropout=cfg.dropout, num_classes=classes).to(device)
    ema = DigitsUNet(cfg.channels, cfg.mults, cfg.blocks, dropout=cfg.dropout, num_classes=classes).to(device)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    precond = EDMPrecondNet(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    step, history, running = 0, [], None
    if resume and not force:
        step, history, running = _load_checkpoint(ckpt, cfg, net, ema, opt, gen)
        if step > cfg.steps:
            raise ValueError(f"{ckpt} is at step {step}, beyond --steps {cfg.steps}")

    data = dataset_images(cfg.dataset).to(device)
    start = time.time()
    net.train()
    bar = trange(step, cfg.steps, initial=step, total=cfg.steps, desc="train-model", disable=not progress,
                 dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        idx = torch.randint(data.shape[0], (cfg.batch,), generator=gen)
        sigma = (torch.randn(cfg.batch, generator=gen) * cfg.p_std + cfg.p_mean).exp()
        noise = torch.randn((cfg.batch,) + tuple(data.shape[1:]), generator=gen)
        y = None
        if labels is not None:
            drop = torch.rand(cfg.batch, generator=gen) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(idx, classes), labels[idx]).to(device)
        loss = edm_loss(precond, data[idx.to(device)], sigma.to(device), noise.to(device), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen = (step + 1) * cfg.batch
        halflife = min(cfg.ema_halflife, cfg.ema_rampup * seen)
        beta = 0.5 ** (cfg.batch / max(halflife, 1e-8))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - beta)
            for be, bn in zip(ema.buffers(), net.buffers()):
                be.copy_(bn)
        value = float(loss.detach())
        running = value if running is None else 0.99 * running + 0.01 * value
        if (step + 1) % 50 == 0:
            history.append([step + 1, running])
            bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(ckpt, step + 1, cfg, net, ema, opt, gen, history, running)
    bar.close()
    wall = time.time() - start
    final = running
    record = {"dataset": cfg.dataset, "steps": cfg.steps, "final_loss": final, "config": cfg.fixed(),
              "wall_s_last_session": round(wall, 1), **cfg.extra}
    dropout = cfg.label_dropout if cfg.conditional else None
    path = save_model(ema, model_config(ema, cfg.name, label_dropout=dropout, training=record), out / MODEL)
    return {"steps": cfg.steps, "final_loss": final, "wall_s": wall, "model": str(path), "checkpoint": str(ckpt)}
