"""Class-label conditioning and classifier-free guidance on the command line (``epd distill/sample/bench``).

``--class-labels`` takes a range ``0-9``, a list ``1,3,5`` or a mix ``0-4,7``; ``--guidance-scale w`` wraps the
model in :class:`~epd_solver.denoisers.CFGDenoiser` with the null label (``--null-label``, default the model's
own) as the unconditional input (w = 1: the conditional model alone). Seed s gets ``labels[s % n]``, the rule
``distill(conditions=...)`` uses, so a table's trajectories and ``epd sample`` agree; one label: all seeds.
A conditional model (one with ``num_classes``) called without labels, labels outside its classes and an
unconditional model given labels are named errors before any work. ``--prompts FILE`` / ``--prompt-embeds``
(diffusers text pipelines) are handled by :mod:`epd_solver.integrations.prompts`, with the same seed rule.
A table is sampled at the guidance scale and with the negative prompt it was distilled with
(:func:`check_table_guidance`; ``--allow-guidance-mismatch`` to use it otherwise).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

__all__ = ["add_arguments", "parse_labels", "Conditioning", "conditioning_of", "check_table_guidance",
           "CLIConditioningError"]

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class CLIConditioningError(ValueError):
    """Bad --class-labels / --guidance-scale / --null-label, or a model that needs (or takes no) labels."""


def add_arguments(parser: argparse.ArgumentParser, sample: bool = False) -> None:
    g = parser.add_argument_group("conditioning (class-conditional models)")
    g.add_argument("--class-labels", help="class labels: a range 0-9, a list 1,3,5 or both (0-4,7); seed s gets "
                   "labels[s %% n] (one label: every seed)")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale w: D_u + w (D_c - D_u) "
                   "(default 1: the conditional model alone)")
    g.add_argument("--null-label", type=int, help="the unconditional label of classifier-free guidance (default: "
                   "the model's, e.g. 10 for digits classes 0-9)")
    g.add_argument("--prompts", help="diffusers text pipelines: a text file, one prompt per line (blank lines "
                   "ignored), encoded once by the pipeline's text encoders (cached); seed s gets prompts[s %% n]")
    g.add_argument("--negative-prompt", help="the unconditional branch of --guidance-scale (default: the empty "
                   "prompt)")
    g.add_argument("--prompt-embeds", help="precomputed embeddings (.safetensors: prompt_embeds, pooled_prompt_embeds "
                   "..., one row per prompt; optional negative_* of one row) instead of --prompts")
    if sample:
        g.add_argument("--allow-guidance-mismatch", action="store_true",
                       help="use a table at another guidance scale, or with another negative prompt (the "
                       "unconditional branch of the guidance), than it was distilled with")


def parse_labels(text: str) -> list[int]:
    """``0-9`` / ``1,3,5`` / ``0-4,7`` -> the labels in order (a range low-high, inclusive)."""
    if not isinstance(text, str) or not text.strip():
        raise CLIConditioningError("--class-labels is empty: give a range 0-9 or a list 1,3,5")
    out: list[int] = []
    for part in text.split(","):
        m = _ITEM.match(part)
        if not m:
            raise CLIConditioningError(f"--class-labels {text!r}: {part.strip()!r} is not a label or a range low-high "
                                       "of non-negative integers (e.g. 0-9 or 1,3,5)")
        lo = int(m[1])
        hi = int(m[2]) if m[2] is not None else lo
        if hi < lo:
            raise CLIConditioningError(f"--class-labels {text!r}: the range {lo}-{hi} runs backwards; write {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    return out


class Conditioning:
    """What the command line asked for: the (wrapped) model, the labels and the guidance scale."""

    def __init__(self, model: Any, labels: list[int] | None, guidance: float | None, key: str | None):
        self.model, self.labels, self.guidance, self.key = model, labels, guidance, key

    @property
    def conditions(self) -> dict[str, torch.Tensor] | None:
        """``distill(conditions=...)``: the labels as the condition rows."""
        return None if self.labels is None else {self.key: torch.tensor(self.labels, dtype=torch.long)}

    def for_seeds(self, seeds: list[int], device=None) -> dict[str, torch.Tensor] | None:
        """The per-sample conditioning of these seeds (``labels[s % n]``)."""
        if self.labels is None:
            return None
        n = len(self.labels)
        return {self.key: torch.tensor([self.labels[int(s) % n] for s in seeds], dtype=torch.long, device=device)}

    def describe(self) -> dict[str, Any]:
        return {"class_labels": self.labels, "guidance_scale": self.guidance, "condition_key": self.key}


def conditioning_of(model: Any, args: argparse.Namespace) -> Conditioning:
    """Check the flags against the model and wrap it for guidance (see the module docstring)."""
    from ..denoisers import CFGDenoiser

    if getattr(args, "prompts", None) is not None or getattr(args, "prompt_embeds", None) is not None:
        from ..integrations.prompts import prompt_conditioning

        return prompt_conditioning(model, args)
    if getattr(args, "negative_prompt", None) is not None:
        raise CLIConditioningError("--negative-prompt is the unconditional branch of --prompts: give --prompts FILE "
                                   "(or --prompt-embeds FILE.safetensors)")
    text = getattr(args, "class_labels", None)
    w = getattr(args, "guidance_scale", None)
    null = getattr(args, "null_label", None)
    classes = getattr(model, "num_classes", None)
    name = getattr(model, "name", "the model")
    if classes is None and "encoder_hidden_states" in getattr(getattr(model, "net", None), "params", ()):
        raise CLIConditioningError(f"{name} is text-conditional: pass --prompts FILE (one prompt per line) or "
                                   "--prompt-embeds FILE.safetensors")
    if classes is None:
        if text is not None or w is not None or null is not None:
            raise CLIConditioningError(f"{name} is not class-conditional (it has no num_classes): drop "
                                       "--class-labels/--guidance-scale/--null-label")
        return Conditioning(model, None, None, None)
    classes = int(classes)
    if text is None:
        raise CLIConditioningError(f"{name} is class-conditional (classes 0-{classes - 1}): pass --class-labels, "
                                   f"e.g. --class-labels 0-{classes - 1}")
    labels = parse_labels(text)
    bad = sorted({v for v in labels if v >= classes})
    if bad:
        raise CLIConditioningError(f"--class-labels {bad} outside {name}'s classes 0-{classes - 1}")
    key = str(getattr(model, "condition_key", "class_labels"))
    if w is None or w == 1:
        if null is not None:
            raise CLIConditioningError("--null-label is the unconditional input of guidance: it needs "
                                       "--guidance-scale other than 1")
        return Conditioning(model, labels, 1.0, key)
    if not (w == w and abs(w) != float("inf")):
        raise CLIConditioningError(f"--guidance-scale must be a finite number, got {w}")
    null = null if null is not None else getattr(model, "null_label", None)
    if null is None:
        raise CLIConditioningError(f"{name} has no null label: pass --null-label for classifier-free guidance")
    if null in labels:
        raise CLIConditioningError(f"--null-label {null} is also among --class-labels")
    if null < classes and getattr(model, "null_label", None) is not None:
        raise CLIConditioningError(f"--null-label {null} is one of {name}'s classes 0-{classes - 1}; its null "
                                   f"label is {model.null_label}")
    return Conditioning(CFGDenoiser(model, float(w), {key: torch.tensor([int(null)])}), labels, float(w), key)


def check_table_guidance(meta: dict[str, Any], cond: Conditioning, allow: bool = False) -> None:
    """Refuse to sample a table at another guidance scale, or with another negative prompt (the unconditional
    branch's embeddings, ``meta.conditioning.uncond_digest``), than it was distilled with (unless ``allow``)."""
    rec = meta.get("conditioning") or {}
    distilled = rec.get("guidance_scale")
    if distilled is None and cond.guidance is None:
        return
    if distilled is None:
        if not allow:
            raise CLIConditioningError("the table was distilled without class labels but the model is sampled with "
                                       "them: distil it with --class-labels, or pass --allow-guidance-mismatch")
        return
    if cond.guidance is None:
        raise CLIConditioningError(f"the table was distilled over class labels at guidance {distilled:g}: pass "
                                   "--class-labels (and --guidance-scale)")
    if abs(distilled - cond.guidance) > 1e-12 and not allow:
        raise CLIConditioningError(f"the table was distilled at guidance {distilled:g}, not --guidance-scale "
                                   f"{cond.guidance:g}: sample at {distilled:g}, or pass --allow-guidance-mismatch "
                                   "to use it anyway (its errors there are not measured)")
    _check_uncond(rec, cond, allow)


def _check_uncond(rec: dict[str, Any], cond: Any, allow: bool) -> None:
    """Prompts, both guided: the negative prompt's embeddings (the unconditional branch) must be the table's,
    compared by digest. (Class labels: the null label is the model's own, refused otherwise before this.)"""
    from ..denoisers import CFGDenoiser
    from ..distillation.conditions import tensor_digest

    had = rec.get("uncond_digest")
    if had is None or cond.key is not None or not isinstance(cond.model, CFGDenoiser) or allow:
        return
    if tensor_digest(cond.model.uncond) == had:
        return
    table = f"negative prompt {rec['negative_prompt']!r}" if rec.get("negative_prompt") is not None else \
        "another negative prompt" if "negative_prompt" not in rec else "no negative prompt (the empty prompt)"
    record = getattr(cond, "record", {})
    given = record.get("negative_prompt")
    now = f"--negative-prompt {given!r}" if given is not None else \
        f"the unconditional branch of --prompt-embeds {record['prompt_embeds']}" if "prompt_embeds" in record else \
        "no --negative-prompt (the empty prompt)"
    raise CLIConditioningError(f"the table was distilled with {table}, not {now} (its unconditional branch "
                               "differs): pass the negative prompt it was distilled with, or "
                               "--allow-guidance-mismatch to use it anyway (embeddings computed on another "
                               "device or dtype differ too)")
