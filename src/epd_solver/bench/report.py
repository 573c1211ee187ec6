"""The bench's files: results.csv, results.json and results.md (Table 1 layout, orderings vs the paper)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..files import write_atomic
from .settings import GROUPS, PAPER_FID, PAPER_ORDER_NFE5, row_name

__all__ = ["CSV_COLUMNS", "write_all", "markdown", "metric_table", "ordering_vs_paper", "fmt"]

CSV_COLUMNS = ["model", "solver", "method", "group", "nfe", "para_nfe", "evaluations", "network_rows", "rmse", "fd",
               "fid", "seconds", "schedule", "n_points", "afs", "knobs", "setting", "params_source", "note"]
METRICS = [("rmse", "RMSE of end points against the reference"),
           ("fd", "Fréchet distance to the data"),
           ("fid", "FID")]


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}"


def _evals(v: float | None) -> str:
    return "–" if v is None else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")


def write_all(out: Path, result: dict[str, Any]) -> None:
    """results.csv, .md and .json, each written atomically (a full disk leaves no half-written report)."""

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for row in result["rows"]:
                w.writerow({**row, "knobs": json.dumps(row.get("knobs", {}), sort_keys=True)})

    texts = {"results.md": markdown(result), "results.json": json.dumps(result, indent=2, default=str)}
    write_atomic(out / "results.csv", write_csv)
    for name, text in texts.items():
        write_atomic(out / name, lambda tmp, text=text: Path(tmp).write_text(text))


def metric_table(rows: list[dict[str, Any]], nfes: list[int], metric: str) -> str:
    """Table 1 layout: group header rows, one row per method, columns = Para.NFE, cells "value (evals)"."""
    by_key = {(r["solver"], r["nfe"]): r for r in rows}
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    lines = ["| Method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for family, title in GROUPS:
        members = [s for s in solvers if by_key[(s, nfes[0])]["group"] == family]
        if not members:
            continue
        lines.append(f"| ***{title}*** |" + " |" * len(nfes))
        for s in members:
            cells = []
            for n in nfes:
                r = by_key[(s, n)]
                cells.append("–" if r[metric] is None else f"{fmt(r[metric])} ({_evals(r['evaluations'])})")
            lines.append(f"| {row_name(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering_vs_paper(rows: list[dict[str, Any]], nfe: int, metric: str = "rmse") -> dict[str, Any]:
    """Our ranking at ``nfe`` and the violations of the paper's chain EPD < AMED < iPNDM < DPM++/UniPC < DDIM."""
    values = {r["solver"]: r[metric] for r in rows if r["nfe"] == nfe and r[metric] is not None}
    ranking = sorted(values, key=values.get)
    violations = []
    tiers = [[s for s in tier if s in values] for tier in PAPER_ORDER_NFE5]
    tiers = [t for t in tiers if t]
    for better, worse in zip(tiers, tiers[1:]):
        for a in better:
            for b in worse:
                if not values[a] < values[b]:
                    violations.append(f"{row_name(a)} {fmt(values[a])} is not below {row_name(b)} {fmt(values[b])}")
    chain = " < ".join("/".join(row_name(s) for s in t) for t in tiers)
    return {"nfe": nfe, "metric": metric, "ranking": [[s, values[s]] for s in ranking], "paper_chain": chain,
            "violations": violations, "checked": len(tiers) >= 2}


# Models of this repository, whose reports set the paper's CIFAR-10 FIDs beside their orderings.
BUNDLED_MODELS = ("digits", "gmm:digits", "gmm:synthetic")


def _ordering_text(rows: list[dict[str, Any]], nfe: int, paper_fids: bool = True) -> list[str]:
    lines = []
    for metric, title in (("rmse", "RMSE"), ("fd", "Fréchet distance"), ("fid", "FID")):
        o = ordering_vs_paper(rows, nfe, metric)
        if not o["ranking"]:
            continue
        ranking = f"{row_name(o['ranking'][0][0])} {fmt(o['ranking'][0][1])}"
        for (_, prev), (s, v) in zip(o["ranking"], o["ranking"][1:]):
            ranking += f" {'≈' if fmt(v) == fmt(prev) else '<'} {row_name(s)} {fmt(v)}"
        lines.append(f"- **{title}** at NFE {nfe}: {ranking}.")
        if o["checked"]:
            verdict = "holds" if not o["violations"] else "differs: " + "; ".join(o["violations"])
            lines.append(f"  Paper's chain ({o['paper_chain']}): {verdict}.")
    paper = {s: v[1] for s, v in PAPER_FID.items() if any(r["solver"] == s for r in rows)}
    if paper and lines and paper_fids:
        lines.append("- Paper (arXiv 2507.14797), CIFAR-10 FID at NFE 5: "
                     + " < ".join(f"{row_name(s)} {v:g}" for s, v in sorted(paper.items(), key=lambda kv: kv[1]))
                     + ".")
    return lines


def _short_source(text: str) -> str:
    """"file /a/b/x.safetensors" -> "x.safetensors"; "distilled on the fly (12.8 s), saved to ..." -> "distilled (12.8 s)"."""
    if text.startswith("file "):
        return Path(text[5:]).name
    if text.startswith("distilled on the fly"):
        return "distilled " + text[len("distilled on the fly "):].split(",")[0]
    return text


def _settings_table(rows: list[dict[str, Any]], nfes: list[int]) -> str:
    """One line per method: grid points at each NFE, AFS, knobs, where the setting and parameters came from."""
    lines = ["| Method | grid (points at NFE " + "/".join(map(str, nfes)) + ") | AFS | knobs | setting | parameters |",
             "|---|---|---|---|---|---|"]
    for solver in dict.fromkeys(r["solver"] for r in rows):
        mine = [r for r in rows if r["solver"] == solver]
        first = mine[0]
        points = "/".join(str(r.get("n_points", "–")) for r in mine)
        knobs = "; ".join(dict.fromkeys(", ".join(f"{k}={v}" for k, v in sorted(r.get("knobs", {}).items())
                                                  if k not in ("afs", "max_passes")) for r in mine))
        sources = " / ".join(_short_source(r["params_source"]) for r in mine if r.get("params_source"))
        lines.append(f"| {first['method']} | {first.get('schedule', '')}, {points} | "
                     f"{'yes' if first.get('afs') else 'no'} | {knobs} | {first.get('setting', '')} | {sources} |")
    return "\n".join(lines)


def _paper_knobs_note(rows: list[dict[str, Any]]) -> list[str]:
    """Say so when rows run the paper's dynamic thresholding (a heuristic for pixel images in [-1, 1])."""
    names = list(dict.fromkeys(r["method"] for r in rows if r.get("knobs", {}).get("thresholding")))
    if not names:
        return []
    solvers = list(dict.fromkeys(r["solver"] for r in rows if r.get("knobs", {}).get("thresholding")))
    return [f"{' and '.join(names)} run the paper's setting, dynamic thresholding included (the table's rows as "
            "the paper ran them; thresholding suits pixel images in [-1, 1]). Without it: "
            + ", ".join(f"`--set {s}.thresholding=false`" for s in solvers)
            + "; `epd sample` leaves it off unless `--paper-setting`.", ""]


def _conditioning_text(rec: dict[str, Any] | None) -> list[str]:
    """One paragraph saying what every sample was conditioned on."""
    if not rec:
        return []
    if rec.get("class_labels") is not None:
        what = f"class labels {rec['class_labels']}"
    else:
        what = f"{rec.get('prompts')} prompts" + (f" (negative prompt {rec['negative_prompt']!r})"
                                                   if rec.get("negative_prompt") is not None else "")
    guidance = rec.get("guidance_scale")
    how = (f"classifier-free guidance {guidance:g}" + (f", null label {rec['null_label']}" if "null_label" in rec
                                                        else "")) if guidance not in (None, 1.0) else "no guidance"
    return [f"Conditioning: {what}; {rec['assignment']}, the same (noise, condition) pairs for every solver and the "
            f"reference; {how}.", ""]


def _per_class_tables(rows: list[dict[str, Any]], nfes: list[int], ref: dict[str, Any]) -> list[str]:
    """Fréchet distance per class: one table per Para.NFE, a column per class (a class with < 2 samples: –)."""
    if not any(r.get("fd_per_class") for r in rows):
        return []
    classes = list((ref.get("fd_per_class") or next(r["fd_per_class"] for r in rows if r.get("fd_per_class"))))
    head = "| Method | " + " | ".join(f"class {c}" for c in classes) + " |"
    rule = "|---|" + "---:|" * len(classes)
    out = ["## Fréchet distance per class", "", "Each class's samples against that class's data.", ""]
    if ref.get("fd_per_class"):
        out += ["Reference end points: " + ", ".join(f"{c}: {fmt(v)}" for c, v in ref["fd_per_class"].items()), ""]
    for n in nfes:
        lines = [f"| {r['method']} | " + " | ".join(fmt(r["fd_per_class"].get(c)) for c in classes) + " |"
                 for r in rows if r["nfe"] == n and r.get("fd_per_class")]
        if lines:
            out += [f"### NFE {n}", "", head, rule] + lines + [""]
    return out


def markdown(result: dict[str, Any]) -> str:
    rows, nfes = result["rows"], result["nfe"]
    env, ref = result["environment"], result["reference"]
    out = [f"# Bench: `{result['model']}`", "",
           f"{result['samples']} samples (seeds {result['seed']}..{result['seed'] + result['samples'] - 1}, the same "
           f"start noise for every solver); end points at sigma_min without a final denoising step. Reference: "
           f"{ref['method']}" + (f" (estimated error RMSE {fmt(ref['error_rmse'], 2)})" if ref["error_rmse"] else "")
           + ".", "",
           "Columns are Para.NFE (sequential rounds of model calls; EPD's and ParaDiGMS' batched calls count once). "
           "Each cell is `value (evaluations per sample)`: the total denoiser evaluations, which the NFE counter "
           "measured.", ""] + _conditioning_text(result.get("conditioning"))
    for metric, title in METRICS:
        if all(r[metric] is None for r in rows):
            continue
        floor = ref.get(metric)
        out += [f"## {title}", "", metric_table(rows, nfes, metric), ""]
        if floor is not None and metric != "rmse":
            out += [f"Reference end points themselves: {fmt(floor)} (what the exact ODE solution reaches with this "
                    "sample count; for a trained model this includes the model's own error).", ""]
    out += _per_class_tables(rows, nfes, ref)
    ordering = _ordering_text(rows, 5, result.get("model_name", result["model"]) in BUNDLED_MODELS)
    if ordering:  # only when the run has NFE 5; the paper's CIFAR-10 FIDs only beside this repository's models
        out += ["## Ordering at NFE 5 against the paper", ""] + ordering + [""]
    notes = [r for r in rows if r.get("note")]
    if notes:
        out += ["## Notes", ""] + [f"- {r['method']} @ NFE {r['nfe']}: {r['note']}" for r in notes] + [""]
    cal = result.get("paradigms_calibration") or {}
    if cal and all("tried" in c for c in cal.values()):
        out += ["ParaDiGMS: finest polynomial base grid whose Picard iteration (tolerance 0.1, full window) converged "
                "within the pass budget on a calibration batch: " + ", ".join(
                    f"NFE {n}: {c['base_steps']} steps" for n, c in cal.items()) + "; passes capped at the NFE.", ""]
    out += ["## Settings per row", "", _settings_table(rows, nfes), ""] + _paper_knobs_note(rows) + [
            "## Run", "",
            f"- command: `{result.get('command') or 'run_bench(...)'}`",
            f"- network in {result.get('network_dtype', 'float64')}, solvers in float64",
            f"- {env['torch_threads']} torch threads, torch {env['torch']}, Python {env['python']}, "
            f"{env['platform']}, {env['cpu_count']} CPUs; {env['date']}",
            f"- total {result['total_seconds']:.0f} s (reference "
            + ("from cache" if ref["cached"] else f"{ref['seconds']:.0f} s") + "); timings on a shared machine are noisy",
            ] + [f"- {n}" for n in result.get("quality_notes", [])] + [""]
    return "\n".join(out)
