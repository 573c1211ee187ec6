"""What a conditional bench passes with each sample, and what that adds to its cache keys and records.

The flags are ``epd sample``'s (``--class-labels``, ``--guidance-scale``, ``--null-label``, ``--prompts``,
``--negative-prompt``, ``--prompt-embeds``), checked by the same code (:mod:`epd_solver.commands.conditioning`):
sample i has seed ``seed + i`` and gets row ``s % n`` of the labels or prompts, as ``epd sample`` assigns it, so
every solver and the reference see the same (noise, condition) pairs. A reference or calibration cached for one
conditioning is never read for another: the keys hold a digest of the per-sample rows and, under guidance, the
scale and the unconditional branch.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from ..denoisers import CFGDenoiser
from ..distillation.conditions import ASSIGNMENT_RULE, tensor_digest
from .dtype import CastInputs

__all__ = ["bench_conditioning", "sample_seeds", "conditioning_key", "unguided", "record"]


def bench_conditioning(model: Any, cfg: Any):
    """The command line's conditioning of ``model`` from a :class:`~epd_solver.bench.runner.BenchConfig`
    (named errors before any work: a conditional model without labels, labels for an unconditional one ...)."""
    from ..commands.conditioning import conditioning_of

    args = SimpleNamespace(class_labels=cfg.class_labels, guidance_scale=cfg.guidance_scale,
                           null_label=cfg.null_label, prompts=cfg.prompts, negative_prompt=cfg.negative_prompt,
                           prompt_embeds=cfg.prompt_embeds, model=cfg.model, cache_dir=None,
                           no_cache=cfg.cache_dir == "")
    return conditioning_of(model, args)


def sample_seeds(seed: int, samples: int) -> list[int]:
    return list(range(seed, seed + samples))


def unguided(model: Any) -> Any:
    """The model under any classifier-free guidance and :class:`CastInputs` wrappers."""
    while isinstance(model, (CFGDenoiser, CastInputs)):
        model = model.inner if isinstance(model, CFGDenoiser) else model.model
    return model


def conditioning_key(model: Any, rows: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Cache-key fields of the per-sample rows and the guidance (empty when unconditional: old keys stay valid)."""
    out: dict[str, Any] = {}
    if rows:
        out["conditions"] = [tensor_digest(rows), ASSIGNMENT_RULE]
    guidance = []
    while isinstance(model, (CFGDenoiser, CastInputs)):
        if isinstance(model, CastInputs):
            model = model.model
            continue
        guidance.append([model.scale, tensor_digest(model.uncond)])
        model = model.inner
    if guidance:
        out["guidance"] = guidance
    return out


def record(cond: Any, rows: dict[str, torch.Tensor] | None) -> dict[str, Any] | None:
    """What results.json records of the conditioning (None when unconditional)."""
    if rows is None:
        return None
    rec = {**cond.describe(), "assignment": "sample i has seed s = seed + i and gets row s % n",
           "digest": tensor_digest(rows)}
    if isinstance(cond.model, CFGDenoiser) and cond.key is not None:  # cond.model: before any CastInputs
        rec["null_label"] = int(cond.model.uncond[cond.key].reshape(-1)[0])
    return rec
