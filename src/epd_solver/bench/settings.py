"""Which solvers the bench runs, how Table 1 groups and names them, and each row's grid and knobs.

Training-free rows take the paper's setting (``paper_setting``); rows the paper does not have
(DPM-Solver++(2M)) and learned rows (whose grid comes from their parameter file) get the settings below.
"""

from __future__ import annotations

from typing import Any

from ..sampling import grid_points_for_nfe, list_samplers, sampler_spec

__all__ = ["GROUPS", "ROW_NAMES", "ROW_ORDER", "PAPER_FID", "PAPER_ORDER_NFE5", "resolve_solvers", "row_name",
           "group_of", "bench_setting"]

# Table 1's groups, in order, keyed by the registry's `family`.
GROUPS = [("single-step", "Single-step"), ("multistep", "Multi-step"), ("learned", "Learned"),
          ("parallel", "Parallel")]

ROW_NAMES = {
    "euler": "DDIM", "heun": "EDM (Heun)", "dpm_2": "DPM-Solver-2", "dpmpp_2m": "DPM-Solver++(2M)",
    "dpmpp_3m": "DPM-Solver++(3M)", "unipc": "UniPC", "ipndm": "iPNDM", "amed": "AMED-Solver",
    "amed_plugin": "AMED-Plugin", "epd": "EPD-Solver", "epd_plugin": "EPD-Plugin", "paradigms": "ParaDiGMS",
}
ROW_ORDER = list(ROW_NAMES)

# The paper's Table 1 (arXiv 2507.14797), CIFAR-10 FID at NFE 3/5/7/9, for side-by-side orderings (not a target).
PAPER_FID = {
    "euler": (93.36, 49.66, 27.93, 18.43), "heun": (306.2, 97.67, 37.28, 15.76),
    "dpm_2": (155.7, 57.30, 10.20, 4.98), "amed": (18.49, 7.59, 4.36, 3.67),
    "dpmpp_3m": (110.0, 24.97, 6.74, 3.42), "unipc": (109.6, 23.98, 5.83, 3.21),
    "ipndm": (47.98, 13.59, 5.08, 3.17), "amed_plugin": (10.81, 6.61, 3.65, 2.63),
    "paradigms": (51.03, 18.96, 7.18, 6.19), "epd": (10.40, 4.33, 2.82, 2.49),
    "epd_plugin": (10.54, 4.47, 3.27, 2.42),
}
# The brief's chain at NFE 5: EPD < AMED < iPNDM < DPM-Solver++/UniPC < DDIM (ties within a tier).
PAPER_ORDER_NFE5 = [["epd"], ["amed"], ["ipndm"], ["dpmpp_3m", "unipc"], ["euler"]]

# Learned rows: the released tables' setting; the parameter file's grid wins.
LEARNED_SETTINGS = {
    "epd": ("time_uniform", {"rho": 1.0}),
    "epd_plugin": ("time_uniform", {"rho": 1.0}),
    "amed": ("time_uniform", {"rho": 1.0}),
    "amed_plugin": ("polynomial", {"rho": 7.0}),
}


def resolve_solvers(spec: str) -> list[str]:
    """``all`` or a comma-separated list of registered names, in Table 1's row order."""
    registered = list_samplers()
    if spec.strip() == "all":
        names = registered
    else:
        from ..solver_names import resolve_solver

        names = [resolve_solver(s) for s in spec.split(",") if s.strip()]
        if not names:
            raise ValueError("--solvers is empty")
    rank = {n: i for i, n in enumerate(ROW_ORDER)}
    return sorted(dict.fromkeys(names), key=lambda n: (rank.get(n, len(rank)), n))


def row_name(solver: str) -> str:
    return ROW_NAMES.get(solver, solver)


def group_of(solver: str) -> str:
    return sampler_spec(solver).family


def bench_setting(solver: str, nfe: int) -> dict[str, Any]:
    """Grid and knobs for ``solver`` at (Para.) NFE ``nfe``; same keys as ``paper_setting``.

    ``source`` says where it comes from: "paper", "bench" (our choice for a row the
    paper lacks) or "params" (learned: the grid is the parameter file's).
    """
    from ..solvers import paper_setting

    if solver in LEARNED_SETTINGS:  # AFS follows the parity (odd Para.NFE needs it); a file's own AFS wins
        schedule, kw = LEARNED_SETTINGS[solver]
        afs = nfe % 2 == 1
        return {"solver": solver, "row": row_name(solver), "nfe": nfe, "schedule": schedule, "schedule_kwargs": kw,
                "n_points": grid_points_for_nfe(solver, nfe, afs=afs), "afs": afs, "knobs": {},
                "verified": True, "source": "params"}
    if solver == "dpmpp_2m":  # not a Table 1 row: the DPM-Solver++(3M) row's setting
        base = paper_setting("dpmpp_3m", nfe)
        return {**base, "solver": solver, "row": row_name(solver), "verified": False, "source": "bench"}
    return {**paper_setting(solver, nfe), "source": "paper"}
