"""Solver names as users type them: the registry's names, the aliases the paper's tables use, did-you-mean.

``resolve_solver("DDIM")`` -> ``"euler"``; an unknown name is a ``ValueError`` naming the closest ones.
"""

from __future__ import annotations

import difflib

__all__ = ["ALIASES", "aliases_of", "resolve_solver"]

# alias -> registered name. Table 1 calls Euler in sigma "DDIM" (eta = 0) and Heun "EDM".
ALIASES = {
    "ddim": "euler", "edm": "heun", "dpm2": "dpm_2", "dpm_solver_2": "dpm_2", "dpmpp2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m", "dpm_solver++_2m": "dpmpp_2m", "dpmpp3m": "dpmpp_3m", "dpm++3m": "dpmpp_3m",
    "dpm_solver++_3m": "dpmpp_3m", "uni_pc": "unipc", "epd_solver": "epd", "amed_solver": "amed",
    "epdplugin": "epd_plugin", "amedplugin": "amed_plugin",
}


def aliases_of(name: str) -> list[str]:
    return sorted(a for a, n in ALIASES.items() if n == name)


def resolve_solver(name: str, learned: bool | None = None) -> str:
    """The registered solver ``name`` stands for (case and '-' / '_' ignored, aliases followed).

    ``learned``: True / False restricts to learned / training-free solvers (with a named error otherwise).
    """
    from .sampling import list_samplers, sampler_spec

    registered = list_samplers()
    key = str(name).strip().lower().replace("-", "_")
    found = key if key in registered else ALIASES.get(key)
    if found is None or found not in registered:
        names = list_samplers(learned=learned)
        pool = names + [a for a, n in ALIASES.items() if n in names]
        close = difflib.get_close_matches(key, pool, n=3, cutoff=0.6)
        close = list(dict.fromkeys(ALIASES.get(c, c) for c in close))
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown solver {name!r}{hint} (`epd solvers` lists them: {', '.join(names)})")
    if learned is not None and sampler_spec(found).learned != learned:
        kind = "a learned" if learned else "a training-free"
        choices = list_samplers(learned=learned)
        raise ValueError(f"{name!r} is not {kind} solver here; choose one of {', '.join(choices)}")
    return found
