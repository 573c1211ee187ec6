"""``epd train-model``: train the small EDM U-Net on a bundled dataset (see ``epd_solver.models.train``)."""

from __future__ import annotations

import argparse
import json
import shlex

import torch

from ..models.train import DATASETS, TrainConfig, train

_DEFAULTS = TrainConfig()
COND_NAME = "digits-cond-v1"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-model", help="train the small EDM U-Net on a bundled dataset",
        description="Train the small EDM-preconditioned U-Net (the bundled digits model) from a seed. Writes "
                    "OUT/checkpoint.safetensors every --checkpoint-every steps and OUT/model.safetensors + "
                    "model.json (EMA weights) at the end.")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=_DEFAULTS.batch)
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="Adam learning rate after warm-up")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--channels", type=int, default=_DEFAULTS.channels, help="U-Net width at 8x8")
    p.add_argument("--blocks", type=int, default=_DEFAULTS.blocks, help="residual blocks per down level")
    p.add_argument("--dropout", type=float, default=_DEFAULTS.dropout)
    p.add_argument("--ema-halflife", type=float, default=_DEFAULTS.ema_halflife, help="EMA half-life in samples")
    p.add_argument("--checkpoint-every", type=int, default=_DEFAULTS.checkpoint_every)
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional on the dataset's labels, with label dropout to a null label (the "
                        "bundled digits-cond model)")
    p.add_argument("--label-dropout", type=float, default=_DEFAULTS.label_dropout,
                   help="with --conditional: probability that a training label is replaced by the null label")
    p.add_argument("--name", default=None,
                   help=f"model id recorded in model.json (default {_DEFAULTS.name}, or {COND_NAME} with "
                        "--conditional)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (results depend on it)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--force", action="store_true", help="start over, overwriting OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _command(args: argparse.Namespace) -> str:
    """The full command that reproduces this run (every option that changes the numbers)."""
    opts = ["dataset", "steps", "batch", "lr", "seed", "channels", "blocks", "dropout", "ema_halflife", "name",
            "device", "threads"]
    parts = ["epd", "train-model", "--out", shlex.quote(str(args.out))]
    if args.conditional:
        parts += ["--conditional", "--label-dropout", shlex.quote(str(args.label_dropout))]
    for key in opts:
        value = getattr(args, key)
        if value is not None:
            parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.name is None:
        args.name = COND_NAME if args.conditional else _DEFAULTS.name
    cfg = TrainConfig(dataset=args.dataset, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                      channels=args.channels, blocks=args.blocks, dropout=args.dropout,
                      ema_halflife=args.ema_halflife, checkpoint_every=args.checkpoint_every, name=args.name,
                      conditional=args.conditional, label_dropout=args.label_dropout,
                      extra={"threads": torch.get_num_threads(), "device": args.device, "command": _command(args)})
    summary = train(cfg, args.out, resume=args.resume, force=args.force, device=args.device,
                    progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0
