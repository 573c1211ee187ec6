"""Parameters for the learned rows: loaded from files matched by (model id, solver, Para.NFE), or distilled."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from ..epd import EPDParams, ParamsError
from ..epd.sampler import base_model_id

__all__ = ["ParamsSource", "bundled_params_dir"]

GRID_RTOL = 1e-6


def bundled_params_dir() -> Path | None:
    """``epd_solver/data/params`` when the package ships parameter files, else None."""
    path = Path(str(resources.files("epd_solver.data").joinpath("params")))
    return path if path.is_dir() else None


def _fits_range(params: EPDParams, model: Any) -> bool:
    s = params.sigmas
    return bool(abs(float(s[0]) - model.sigma_max) <= GRID_RTOL * model.sigma_max
                and abs(float(s[-1]) - model.sigma_min) <= GRID_RTOL * model.sigma_min)


class ParamsSource:
    """Finds parameters for (solver, Para.NFE) of one model.

    Files named with ``--params`` are used when their solver and Para.NFE match (and their model id, if
    they record one); files in a params directory must also record this model's id. Ids compare without a
    guidance suffix (``+cfgW``): under ``cond`` (the bench's conditioning) a file distilled at another guidance
    scale than the bench's is refused as ``epd sample`` refuses it (skipped when it sits in a directory),
    unless ``allow_guidance_mismatch``. Without a match the row is distilled on the fly with
    ``epd_solver.distill`` (its default recipe, over the same conditions; unless ``distill=False``) and the
    result is saved under ``save_dir``. :meth:`get` says which happened.
    """

    def __init__(self, model: Any, model_id: str, files: Iterable[str | Path] = (), dirs: Iterable[str | Path] = (),
                 distill: bool = True, save_dir: Path | None = None, log=print, cond: Any = None,
                 allow_guidance_mismatch: bool = False):
        self.model, self.model_id, self.distill, self.save_dir, self.log = model, model_id, distill, save_dir, log
        self.cond, self.allow = cond, allow_guidance_mismatch
        self.table: dict[tuple[str, int], tuple[EPDParams, str]] = {}
        for f in files:
            p = EPDParams.load(f)  # explicit files must load: errors are the user's to see
            have = p.meta.get("model_id")
            if have is not None and base_model_id(have) != base_model_id(model_id):
                raise ValueError(f"--params {f}: parameters are for model {have!r}, not {model_id!r}")
            self._add(p, f"file {f}")
        for d in dirs:
            d = Path(d)
            if not d.is_dir():
                raise FileNotFoundError(f"params directory not found: {d}")
            for f in sorted(d.glob("*.safetensors")):
                try:
                    p = EPDParams.load(f)
                except (ParamsError, OSError) as e:
                    self.log(f"  skipping {f}: {e}")
                    continue
                have = p.meta.get("model_id")
                if have is not None and base_model_id(have) == base_model_id(model_id):
                    self._add(p, f"file {f}", explicit=False)

    def _add(self, p: EPDParams, where: str, explicit: bool = True) -> None:
        if self.cond is not None:
            from ..commands.conditioning import CLIConditioningError, check_table_guidance

            try:
                check_table_guidance(p.meta, self.cond, self.allow)
            except CLIConditioningError as e:
                if explicit:
                    raise CLIConditioningError(f"{where}: {e}") from None
                self.log(f"  skipping {where}: {e}")
                return
        if not _fits_range(p, self.model):
            msg = (f"{where}: grid {float(p.sigmas[0]):g} .. {float(p.sigmas[-1]):g} does not span the model's "
                   f"sigma range [{self.model.sigma_min:g}, {self.model.sigma_max:g}]")
            if explicit:
                raise ValueError(msg)
            self.log(f"  skipping {msg}")
            return
        key = (p.solver, int(p.nfe()["para_nfe"]))
        self.table.setdefault(key, (p, where))

    def get(self, solver: str, nfe: int) -> tuple[EPDParams | None, str]:
        """(params, how they were obtained); params is None with the reason when there are none."""
        if (solver, nfe) in self.table:
            return self.table[(solver, nfe)]
        if not self.distill:
            return None, "no parameter file (distillation disabled)"
        try:
            import epd_solver

            distill = epd_solver.distill
        except (ImportError, AttributeError) as e:
            return None, f"no parameter file and distillation is unavailable ({e})"
        self.log(f"distilling {solver} at Para.NFE {nfe} (no parameter file) ...")
        start = time.perf_counter()
        with torch.enable_grad():
            params = distill(self.model, solver=solver, nfe=nfe, progress=False,  # the bench has its own bar
                             conditions=None if self.cond is None else self.cond.conditions,
                             log=lambda m: self.log(f"  distill: {m}"))
        seconds = time.perf_counter() - start
        how = f"distilled on the fly ({seconds:.1f} s)"
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            path = self.save_dir / f"{self.model_id.replace(':', '-')}-{solver}-nfe{nfe}.safetensors"
            params.save(path, overwrite=True)
            how += f", saved to {path}"
        self.table[(solver, nfe)] = (params, how)
        return params, how
