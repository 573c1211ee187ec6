"""``epd solvers``: the registered solvers, their aliases, family, rounds per step and paper row."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("solvers", help="list the solvers: names, aliases (ddim = euler, ...), family, rounds per step",
                       description="List every registered solver with the aliases every command accepts (e.g. "
                                   "--solver ddim means euler), its family (Table 1's groups), the sequential "
                                   "rounds of model calls per grid step and its order. Para.NFE = rounds per step x "
                                   "steps, minus 1 with the analytical first step (AFS).")
    p.set_defaults(func=run)


def rows() -> list[dict]:
    from ..sampling import list_samplers, sampler_spec
    from ..solver_names import aliases_of
    from ..solvers.settings import PAPER_ROWS

    learned_rows = {"epd": "EPD-Solver", "epd_plugin": "EPD-Plugin", "amed": "AMED-Solver",
                    "amed_plugin": "AMED-Plugin"}  # "lw" (learned multistep weights) has no row in the paper
    out = []
    for name in list_samplers():
        spec = sampler_spec(name)
        out.append({"name": name, "aliases": aliases_of(name), "family": spec.family,
                    "rounds_per_step": spec.rounds_per_step, "order": spec.order, "learned": spec.learned,
                    "paper_row": PAPER_ROWS.get(name) or learned_rows.get(name, ""), "about": spec.description})
    return out


def run(args) -> int:
    table = rows()
    head = ("name", "aliases", "family", "rounds/step", "order", "paper row")
    lines = [(r["name"], ", ".join(r["aliases"]), r["family"] + (" (parameter file)" if r["learned"] else ""),
              "varies" if r["rounds_per_step"] is None else str(r["rounds_per_step"]),
              "–" if r["order"] is None else str(r["order"]), r["paper_row"] or "–") for r in table]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    for line in (head, *lines):
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    print("\nEPD, EPD-Plugin, AMED and AMED-Plugin evaluate their K points of a step in one batched call (one "
          "round). `epd sample --solver NAME --nfe N` runs a baseline on the paper's grid for that row.")
    return 0
