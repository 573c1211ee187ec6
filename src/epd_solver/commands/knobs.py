"""``epd sample``'s solver knobs: the paper-only ones, ``--set KNOB=VALUE`` and the line that prints them."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["PAPER_ONLY_KNOBS", "parse_knobs", "knobs_line"]

# Knobs of a paper row that only fit the paper's models (pixel images in [-1, 1]): dynamic thresholding of
# DPM-Solver++(3M) and UniPC. Off on a user's model unless --paper-setting asks for the paper's row as it ran.
PAPER_ONLY_KNOBS = {"thresholding": False}


def parse_knobs(items: list[str]) -> dict[str, Any]:
    """``--set KNOB=VALUE`` items (VALUE as JSON: true, 0.9, "bh1"; bare words as strings)."""
    knobs: dict[str, Any] = {}
    for text in items:
        name, eq, raw = text.partition("=")
        if not (eq and name.strip()) or "." in name:
            raise ValueError(f"--set takes KNOB=VALUE (e.g. thresholding=true), got {text!r}")
        try:
            knobs[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            knobs[name.strip()] = raw
    return knobs


def knobs_line(plan: dict[str, Any]) -> str:
    """The knobs in use, for the start line: ``lower_order_final=True, thresholding=False``."""
    return ", ".join(f"{k}={v}" for k, v in sorted(plan["knobs"].items())) or "none"
