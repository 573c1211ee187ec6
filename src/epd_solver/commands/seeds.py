"""``--seeds``: ranges and single seeds (``0-63,100``, EDM's form) or a count, ``n=64`` (seeds 0..63).

A bare number is one seed (``--seeds 8`` is seed 8, as in EDM's generate.py); the command says so, since
"8 samples" is the other reading.
"""

from __future__ import annotations

import re

HELP = ("seeds: inclusive ranges and single seeds, e.g. 0-49999 or 0-63,100-109; or a count, n=64 for seeds 0-63 "
        "(a bare number is one seed: 8 means seed 8)")
_COUNT = re.compile(r"^\s*n\s*=\s*(\d+)\s*$", re.IGNORECASE)


def parse_seed_arg(text: str) -> tuple[list[int], str | None]:
    """(seeds, a note to print or None). ``n=COUNT`` is seeds 0..COUNT-1; anything else goes to ``parse_seeds``."""
    from ..distributed import parse_seeds

    m = _COUNT.match(text)
    if m:
        count = int(m.group(1))
        if count < 1:
            raise ValueError(f"--seeds {text}: the count must be >= 1")
        return list(range(count)), None
    if "n" in text.lower() or "=" in text:
        raise ValueError(f"--seeds {text!r}: a count is written n=COUNT (e.g. n=64 for seeds 0-63), ranges A-B")
    try:
        seeds = parse_seeds(text)
    except ValueError as e:
        raise ValueError(f"--seeds: {e}; or a count, n=COUNT") from None
    note = None
    if re.fullmatch(r"\s*\d+\s*", text) and int(text) > 1:
        note = (f"--seeds {text.strip()} is the one seed {text.strip()}; for {text.strip()} samples write "
                f"n={text.strip()} (seeds 0-{int(text) - 1})")
    return seeds, note
