"""Text prompts on the command line (``epd distill/sample --prompts FILE``) for ``diffusers:PATH`` text pipelines.

The prompts (one a line, blank lines ignored) are encoded once by the pipeline's own text encoders through the
batched adapter's conditioning builder (the same keys it feeds the network: ``encoder_hidden_states``, SD3's
``pooled_projections``, SDXL's ``text_embeds`` / ``time_ids``, PixArt's ``encoder_attention_mask``), one row per
prompt, and cached under the epd-solver cache dir, keyed by a digest of the prompts, the negative prompt and the
identity of the text-encoder and tokenizer files (names, sizes, modification times). ``--prompt-embeds
FILE.safetensors`` gives them precomputed instead (``prompt_embeds``, plus ``pooled_prompt_embeds`` /
``prompt_attention_mask`` where the family needs them, one row per prompt; optional ``negative_*`` of one row).
Under ``--guidance-scale w`` the negative (default: empty) prompt's embedding is the unconditional branch of
:class:`~epd_solver.denoisers.CFGDenoiser`. Seed s gets prompt ``s % n``, the rule of ``distill(conditions=...)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["PromptError", "read_prompts", "PromptConditioning", "prompt_conditioning", "encoder_identity"]

_EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


class PromptError(ValueError):
    """A prompts file or embeddings file that cannot be used, or a model that takes no prompts."""


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of ``path`` (stripped), in order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"--prompts {path}: cannot read it ({e}); give a UTF-8 text file, one prompt per line") \
            from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"--prompts {path} holds no prompts (only blank lines): write one prompt per line")
    return prompts


class PromptConditioning:
    """Prompt embeddings as condition rows (``rows``: model keyword -> one row per prompt), the (guided) model
    and the guidance scale: what ``epd distill`` / ``epd sample`` take from a class-label ``Conditioning``."""

    labels = None
    key = None

    def __init__(self, model: Any, rows: dict[str, torch.Tensor], guidance: float, record: dict[str, Any]):
        self.model, self.guidance = model, guidance
        self.rows, self.record = rows, record
        self.n = next(iter(rows.values())).shape[0]

    @property
    def conditions(self) -> dict[str, torch.Tensor]:
        return self.rows

    def for_seeds(self, seeds: list[int], device=None) -> dict[str, torch.Tensor]:
        idx = torch.tensor([int(s) % self.n for s in seeds], dtype=torch.long)
        return {k: v[idx].to(device) if device is not None else v[idx] for k, v in self.rows.items()}

    def describe(self) -> dict[str, Any]:
        return {**self.record, "guidance_scale": self.guidance, "condition_keys": sorted(self.rows)}


def encoder_identity(root: Path | None, pipe: Any) -> str:
    """The text encoders' and tokenizers' identity: their files (relative name, size, mtime) under ``root``, or,
    for a pipeline held in memory, a hash of the encoders' tensors."""
    names = sorted(k for k, v in pipe.components.items() if v is not None and k.startswith(("text_encoder",
                                                                                             "tokenizer")))
    h = hashlib.sha256(json.dumps(names).encode())
    for name in names:
        folder = root / name if root is not None else None
        if folder is not None and folder.is_dir():
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif isinstance(pipe.components[name], torch.nn.Module):
            from ..distillation.cache import model_fingerprint

            h.update(str(model_fingerprint(pipe.components[name], name)).encode())
        else:
            h.update(repr(type(pipe.components[name])).encode())
    return h.hexdigest()[:24]


def _check_rows(values: dict[str, torch.Tensor], what: str) -> int:
    counts = {k: int(v.shape[0]) for k, v in values.items() if isinstance(v, torch.Tensor)}
    if len(set(counts.values())) != 1:
        raise PromptError(f"{what}: the embeddings' row counts disagree ({counts}); every tensor needs one row "
                          "per prompt")
    return next(iter(counts.values()))


def _read_embeds(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise PromptError(f"--prompt-embeds {path}: cannot read it as safetensors ({e})") from None
    unknown = sorted(set(raw) - set(_EMBED_KEYS) - {"negative_" + k for k in _EMBED_KEYS})
    if unknown or "prompt_embeds" not in raw:
        raise PromptError(f"--prompt-embeds {path}: expected tensors prompt_embeds (+ pooled_prompt_embeds, "
                          f"prompt_attention_mask, negative_*), got {sorted(raw)}")
    pos = {k: v for k, v in raw.items() if not k.startswith("negative_")}
    neg = {k[len("negative_"):]: v for k, v in raw.items() if k.startswith("negative_")}
    _check_rows(pos, f"--prompt-embeds {path}")
    for k, v in neg.items():
        if v.shape[0] != 1 and not bool((v == v[:1]).all()):
            raise PromptError(f"--prompt-embeds {path}: negative_{k} has {v.shape[0]} different rows; one negative "
                              "embedding (one row) serves every prompt")
    return pos, {k: v[:1] for k, v in neg.items()}


def _encode(model: Any, prompts: list[str] | None, negative: str | None, embeds: tuple | None, cfg: bool):
    """(cond rows, uncond row) in the network's keywords, through the batched adapter's builder."""
    from .diffusers import _conditioning, _family, _pixels, _Text

    pipe, net = getattr(model, "pipeline", None), model.net
    family = _family(pipe, net)
    if "encoder_hidden_states" not in net.params or family == "unconditional":
        raise PromptError(f"{type(net.model).__name__} takes no text conditioning: drop --prompts/--prompt-embeds")
    if prompts is not None and (pipe is None or getattr(pipe, "tokenizer", None) is None
                                or getattr(pipe, "text_encoder", None) is None):
        raise PromptError("--prompts needs a pipeline folder with its text encoders and tokenizers (model_index.json "
                          "with text_encoder/ and tokenizer/); this model has none: pass --prompt-embeds "
                          "FILE.safetensors instead")
    if family == "flux" and cfg:
        raise PromptError("FLUX takes no negative branch: its guidance is an embedding, not --guidance-scale")
    n = len(prompts) if prompts is not None else None
    pos, neg = embeds or ({}, {})
    if n is None:
        n = next(iter(pos.values())).shape[0]
    if negative is not None and "prompt_embeds" in neg:
        raise PromptError("--negative-prompt and the embeddings file's negative_prompt_embeds both give the "
                          "unconditional branch: give one")
    tile = (lambda v: None if v is None else v.expand((n,) + v.shape[1:]))
    text = _Text(prompts, None if negative is None else [negative] * n, pos.get("prompt_embeds"),
                 tile(neg.get("prompt_embeds")), pos.get("pooled_prompt_embeds"), tile(neg.get("pooled_prompt_embeds")),
                 pos.get("prompt_attention_mask"), tile(neg.get("prompt_attention_mask")))
    device = next(net.model.parameters()).device
    vae = getattr(pipe, "vae", None)
    with torch.no_grad():
        cond, uncond = _conditioning(family, pipe, net, device, cfg, 1, text, _pixels(net.model, pipe, vae, None,
                                                                                         None))
    cond = {k: v.detach().cpu() for k, v in cond.items()}
    uncond = {k: v.detach()[:1].cpu() for k, v in uncond.items()}
    _check_rows(cond, "the encoded prompts")
    return cond, uncond


def _cache_file(args: Any, key: dict[str, Any]) -> Path | None:
    if getattr(args, "no_cache", False):
        return None
    from ..distillation.cache import default_cache_dir

    root = Path(args.cache_dir).expanduser() if getattr(args, "cache_dir", None) else default_cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / "prompt-embeds" / f"{digest}.safetensors"


def prompt_conditioning(model: Any, args: Any) -> PromptConditioning:
    """Check and encode ``--prompts`` / ``--prompt-embeds`` (see the module docstring), before any work."""
    from ..denoisers import CFGDenoiser

    path, embeds_path = getattr(args, "prompts", None), getattr(args, "prompt_embeds", None)
    negative = getattr(args, "negative_prompt", None)
    if getattr(args, "class_labels", None) is not None or getattr(args, "null_label", None) is not None:
        raise PromptError("--prompts/--prompt-embeds and --class-labels/--null-label are two kinds of conditioning: "
                          "give one")
    if path is not None and embeds_path is not None:
        raise PromptError("give --prompts FILE or --prompt-embeds FILE.safetensors, not both")
    w = getattr(args, "guidance_scale", None)
    w = 1.0 if w is None else float(w)
    if not (w == w and abs(w) != float("inf")):
        raise PromptError(f"--guidance-scale must be a finite number, got {w}")
    prompts = read_prompts(path) if path is not None else None
    embeds = _read_embeds(embeds_path) if embeds_path is not None else None
    if getattr(model, "net", None) is None or not hasattr(model.net, "params"):
        raise PromptError(f"{getattr(model, 'name', 'the model')} is not a diffusers text model: --prompts and "
                          "--prompt-embeds need --model diffusers:PATH")
    cfg = w != 1
    if prompts is not None:
        pipe = model.pipeline
        spec = str(getattr(args, "model", ""))
        root = Path(spec.split(":", 1)[1]) if spec.startswith("diffusers:") else None
        key = {"prompts": prompts, "negative": negative, "cfg": cfg, "encoders": encoder_identity(root, pipe),
               "model": str(getattr(model, "name", "")), "format": 1}
        cache = _cache_file(args, key)
        if cache is not None and cache.is_file():
            from safetensors.torch import load_file

            raw = load_file(str(cache))
            cond = {k[5:]: v for k, v in raw.items() if k.startswith("cond.")}
            uncond = {k[7:]: v for k, v in raw.items() if k.startswith("uncond.")}
        else:
            cond, uncond = _encode(model, prompts, negative, None, cfg)
            if cache is not None:
                from safetensors.torch import save_file

                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                save_file({**{f"cond.{k}": v.contiguous() for k, v in cond.items()},
                           **{f"uncond.{k}": v.contiguous() for k, v in uncond.items()}}, str(tmp))
                tmp.replace(cache)
        record = {"prompts": len(prompts), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[
            :16], "negative_prompt": negative}
    else:
        cond, uncond = _encode(model, None, negative, embeds, cfg)
        record = {"prompts": next(iter(cond.values())).shape[0], "prompt_embeds": str(embeds_path),
                  "negative_prompt": negative}
    wrapped = CFGDenoiser(model, w, uncond) if cfg else model
    return PromptConditioning(wrapped, cond, w, record)
