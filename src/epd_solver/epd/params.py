"""EPD parameter files: natural values + raw tables as safetensors, metadata as JSON in the header.

A file holds float64 tensors ``r``, ``weights``, ``dir_scale``, ``time_scale`` (each (N-1, K)),
``sigmas`` (N), the solver family's own tensors (``FAMILY_TENSORS``: the learned-weights family "lw" adds
``history_weights`` (N-1, m)) and ``raw.<name>`` (the raw tables, if any), and one metadata entry ``"epd_solver"``: a JSON
object with the format, solver kind, K, N, the exact sigma grid, AFS, plugin order, parameterisation,
s_d, s_t, the NFE and the free-form ``meta`` (schedule, model_id, teacher, teacher_nfe, loss,
guidance_scale, version, ...). Loading never unpickles and validates everything; saving is atomic and
refuses to replace a file unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch

from ..files import write_atomic

__all__ = ["EPDParams", "ParamsError", "ParamsFileError", "ParamsMismatchError", "SOLVERS", "FORMAT",
           "FORMAT_VERSION"]

SOLVERS = ("epd", "epd_plugin", "amed", "amed_plugin", "lw", "epd_lw")
# the host's Adams-Bashforth order; for "lw" / "epd_lw" the history length m (the width of history_weights)
DEFAULT_PLUGIN_ORDER = {"epd_plugin": 3, "amed_plugin": 4, "lw": 4, "epd_lw": 4}
# natural tensors a solver family stores beside r, weights, dir_scale, time_scale (a closed set per solver)
FAMILY_TENSORS: dict[str, tuple[str, ...]] = {"lw": ("history_weights",), "epd_lw": ("history_weights",)}
# solvers spending one evaluation per step (at its start: r = 0, weights = 1, dir_scale = 1, K = 1)
ONE_EVALUATION = ("lw",)
FORMAT, FORMAT_VERSION = "epd-params", 1
METADATA_KEY = "epd_solver"
VALUE_NAMES = ("r", "weights", "dir_scale", "time_scale")
SIMPLEX_TOL = 1e-6
GRID_RTOL = 1e-6
MAX_FILE_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 32  # the deepest metadata written is 5 levels; deeper nesting is refused, not parsed further
HEADER_KEYS = frozenset({"format", "format_version", "solver", "k", "num_points", "sigmas", "afs", "plugin_order",
                         "parameterization", "scale_dir", "scale_time", "nfe", "library_version", "meta"})
NATURAL = "natural"  # values given directly (no raw tables); the trained kinds are parameterization.KINDS


def _kinds(solver: str) -> tuple[str, ...]:
    """The parameterisations a solver's tables may be trained in (or ``natural``)."""
    if solver == "lw":
        from .multistep_tables import LW_KINDS

        return LW_KINDS + (NATURAL,)
    from .parameterization import KINDS

    return KINDS + (NATURAL,)


class ParamsError(ValueError):
    """Invalid EPD parameter values or metadata."""


class ParamsFileError(ParamsError):
    """A parameter file that cannot be read safely: not safetensors (e.g. a pickle), truncated, malformed,
    or holding invalid values."""


class ParamsMismatchError(ParamsError):
    """Valid parameters that do not fit the call (K, sigma grid, model, solver kind)."""


def _library_version() -> str:
    from .. import __version__

    return __version__


def _f64(v: Any, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ParamsError(f"{name} must be numeric: {e}") from None
    return t.cpu().contiguous().clone()


def _opt_scale(v: Any, name: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
        raise ParamsError(f"{name} must be None or a number in [0, 1), got {v!r}")
    return float(v)


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Bounded nesting, finite numbers and string keys in a JSON value (metadata read from a file)."""
    if depth > MAX_JSON_DEPTH:
        raise ParamsError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ParamsError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)


def _loads(text: Any, what: str) -> Any:
    """``json.loads`` with every failure (not a string, bad JSON, NaN/Infinity, huge ints, deep nesting) as
    :class:`ParamsError`; the result has bounded nesting and finite numbers."""
    if not isinstance(text, (str, bytes)):
        raise ParamsError(f"{what} must be a JSON string, got {type(text).__name__}")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a finite number")

    try:
        value = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ParamsError(f"{what}: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, NaN/Infinity, ints over 4300 digits
        raise ParamsError(f"{what} is not valid JSON ({e})") from None
    _check_json(value, what)
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_meta(meta: Mapping[str, Any]) -> None:
    """Types of the meta entries the library reads back (the rest is free-form JSON; from a file it has passed
    :func:`_loads`)."""
    mult = meta.get("cfg_multiplier", 1)
    if not _is_int(mult) or mult < 1:
        raise ParamsError(f"meta cfg_multiplier must be a positive integer (network rows per denoiser row, 2 "
                          f"under CFG), got {mult!r}")
    for key in ("model_id", "model_kind", "schedule"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ParamsError(f"meta {key} must be a string, got {meta[key]!r}")
    tnfe = meta.get("teacher_nfe")
    if tnfe is not None and (not _is_int(tnfe) or tnfe < 0):
        raise ParamsError(f"meta teacher_nfe must be a non-negative integer or absent, got {tnfe!r}")
    w = meta.get("guidance_scale")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)):
        raise ParamsError(f"meta guidance_scale must be a finite number, got {w!r}")


class EPDParams:
    """Natural values of a learned EPD / EPD-Plugin / AMED / AMED-Plugin table, with their grid and metadata.

    ``r``, ``weights``, ``dir_scale``, ``time_scale``: float64 (N-1, K); ``sigmas``: float64 (N,), no
    trailing 0. Construction validates (``ParamsError``): shapes, finiteness, r in [0, 1], weights on the
    simplex within 1e-6, positive scales (within s_d / s_t of 1 when those are known), and the solver
    kind (``amed*``: K = 1; ``*_plugin``: a plugin order in 1..4).

    ``extra``: the family's own natural tensors, exactly the names ``FAMILY_TENSORS[solver]``. Learned
    weights (``"lw"``): K = 1 with r = 0, weights = dir_scale = 1 (the step's one evaluation, at its start),
    ``time_scale`` (N-1, 1) the network-time multiplier, ``history_weights`` (N-1, plugin_order) finite with
    w[i, j] = 0 for j > i; ``plugin_order`` is the history length m (default 4).
    """

    def __init__(self, r: Any, weights: Any, dir_scale: Any, time_scale: Any, sigmas: Any, *, afs: bool = False,
                 plugin_order: int | None = None, solver: str = "epd", parameterization: str = "natural",
                 scale_dir: float | None = None, scale_time: float | None = None,
                 raw: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None):
        self.r, self.weights = _f64(r, "r"), _f64(weights, "weights")
        self.dir_scale, self.time_scale = _f64(dir_scale, "dir_scale"), _f64(time_scale, "time_scale")
        self.sigmas = _f64(sigmas, "sigmas")
        if not isinstance(afs, bool):
            raise ParamsError(f"afs must be a bool, got {afs!r}")
        self.afs = afs
        if solver not in SOLVERS:
            raise ParamsError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver = solver
        if solver in DEFAULT_PLUGIN_ORDER:
            plugin_order = DEFAULT_PLUGIN_ORDER[solver] if plugin_order is None else plugin_order
            if isinstance(plugin_order, bool) or not isinstance(plugin_order, int) or not 1 <= plugin_order <= 4:
                raise ParamsError(f"plugin_order must be an integer in 1..4, got {plugin_order!r}")
        elif plugin_order is not None:
            raise ParamsError(f"solver {solver!r} takes no plugin_order (got {plugin_order!r})")
        self.plugin_order = plugin_order
        kinds = _kinds(solver)
        if not isinstance(parameterization, str) or parameterization not in kinds:
            raise ParamsError(f"parameterization must be one of {kinds}, got {parameterization!r} (solver "
                              f"{solver!r})")
        self.parameterization = parameterization
        self.scale_dir, self.scale_time = _opt_scale(scale_dir, "scale_dir"), _opt_scale(scale_time, "scale_time")
        self.raw = {str(n): _f64(v, f"raw[{n!r}]") for n, v in (raw or {}).items()}
        self.extra = {str(n): _f64(v, str(n)) for n, v in (extra or {}).items()}
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise ParamsError(f"meta must be JSON-serialisable: {e}") from None
        _check_meta(self.meta)
        self._validate()

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_values(cls, r: Any, weights: Any, dir_scale: Any = None, time_scale: Any = None, *, sigmas: Any,
                    afs: bool = False, plugin_order: int | None = None, solver: str | None = None,
                    **meta: Any) -> "EPDParams":
        """From natural values (lists or tensors of shape (N-1, K)); c = a = 1 where not given.

        ``solver`` defaults to ``"epd"`` (``"epd_plugin"`` when ``plugin_order`` is given). The keywords
        ``parameterization``, ``scale_dir``, ``scale_time``, ``raw`` and ``extra`` (the family's own tensors,
        e.g. ``{"history_weights": w}`` for ``solver="lw"``) set those fields; all other keywords go to ``meta``.
        """
        r = _f64(r, "r")
        ones = torch.ones(r.shape, dtype=torch.float64)
        fields = {k: meta.pop(k) for k in ("parameterization", "scale_dir", "scale_time", "raw", "extra") if k in meta}
        meta.setdefault("version", _library_version())
        solver = solver or ("epd" if plugin_order is None else "epd_plugin")
        return cls(r, weights, ones if dir_scale is None else dir_scale, ones if time_scale is None else time_scale,
                   sigmas, afs=afs, plugin_order=plugin_order, solver=solver, meta=meta, **fields)

    @classmethod
    def from_tables(cls, tables: Any, *, sigmas: Any, afs: bool, plugin_order: int | None = None,
                    solver: str = "epd", **meta: Any) -> "EPDParams":
        """From trained :class:`EPDTables` (natural values and raw tables are both stored)."""
        sig = _f64(sigmas, "sigmas")
        if tables.sigmas is not None and (tables.sigmas.shape != sig.shape
                                          or not torch.allclose(tables.sigmas.cpu(), sig, rtol=GRID_RTOL, atol=0)):
            raise ParamsMismatchError("the tables were built for another sigma grid")
        with torch.no_grad():
            values = tables.file_values()
        common = [values.pop(n) for n in VALUE_NAMES]
        meta.setdefault("version", _library_version())
        return cls(*common, sig, afs=afs, plugin_order=plugin_order, solver=solver,
                   parameterization=tables.kind, scale_dir=tables.scale_dir, scale_time=tables.scale_time,
                   raw=tables.raw(), meta=meta, extra=values)

    def to_tables(self, dtype: torch.dtype = torch.float64) -> Any:
        """An :class:`EPDTables` (``"lw"``: an :class:`LWTables`) holding this file's raw tables (for warm starts /
        further training)."""
        from .parameterization import EPDTables

        if not self.raw:
            raise ParamsError("these parameters carry no raw tables; use EPDTables.from_natural")
        if self.solver == "lw":
            from .multistep_tables import LWTables

            lw = LWTables(self.steps, self.plugin_order, self.scale_time or 0.0, sigmas=self.sigmas, dtype=dtype)
            return lw.load_raw_(self.raw)
        if self.solver == "epd_lw":
            from .multistep_tables import EPDLWTables

            hosted = EPDLWTables(self.steps, self.k, self.parameterization, self.scale_dir or 0.0,
                                 self.scale_time or 0.0, order=self.plugin_order, sigmas=self.sigmas, dtype=dtype)
            return hosted.load_raw_(self.raw)
        tables = EPDTables(self.steps, self.k, self.parameterization, self.scale_dir or 0.0, self.scale_time or 0.0,
                           sigmas=self.sigmas, dtype=dtype)
        return tables.load_raw_(self.raw)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return int(self.r.shape[1])

    @property
    def steps(self) -> int:
        return int(self.r.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.sigmas.numel())

    def natural(self, dtype: torch.dtype | None = None, device: Any = None) -> tuple[torch.Tensor, ...]:
        """(r, weights, dir_scale, time_scale) converted for sampling."""
        return tuple(v.to(dtype=dtype or torch.float64, device=device)
                     for v in (self.r, self.weights, self.dir_scale, self.time_scale))

    def values(self, dtype: torch.dtype | None = None, device: Any = None) -> tuple[torch.Tensor, ...]:
        """The tables the solver's rollout takes: (r, weights, dir_scale, time_scale), for ``"epd_lw"`` followed by
        history_weights, for ``"lw"`` (history_weights, time_scale)."""
        if self.solver == "lw":
            return tuple(v.to(dtype=dtype or torch.float64, device=device)
                         for v in (self.extra["history_weights"], self.time_scale))
        extra = tuple(self.extra[n].to(dtype=dtype or torch.float64, device=device)
                      for n in FAMILY_TENSORS.get(self.solver, ()))
        return self.natural(dtype, device) + extra

    def nfe(self) -> dict[str, Any]:
        """NFE per sample on the grid: Para.NFE = 2(N-1) - [AFS]; evaluations = (N-1)(K+1) - [AFS]; one evaluation
        per step (``"lw"``): both N-1 - [AFS]."""
        per_step = (1, 1) if self.solver in ONE_EVALUATION else (2, self.k + 1)
        para = per_step[0] * self.steps - int(self.afs)
        evals = per_step[1] * self.steps - int(self.afs)
        mult = int(self.meta.get("cfg_multiplier", 1))
        return {"para_nfe": para, "evaluations": evals, "cfg_multiplier": mult, "network_rows": evals * mult,
                "teacher_nfe": self.meta.get("teacher_nfe")}

    def __repr__(self) -> str:
        return (f"EPDParams(solver={self.solver!r}, k={self.k}, steps={self.steps}, afs={self.afs}, "
                f"plugin_order={self.plugin_order}, parameterization={self.parameterization!r})")

    # -- validation ---------------------------------------------------------------------------------
    def _validate(self) -> None:
        s = self.sigmas
        if s.ndim != 1 or s.numel() < 2:
            raise ParamsError(f"sigmas must be a 1-D grid of at least 2 points, got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all() or not torch.all(s > 0) or not torch.all(s[1:] < s[:-1]):
            raise ParamsError("sigmas must be finite, positive and strictly descending (no trailing 0)")
        shape = (s.numel() - 1, None)
        for name in VALUE_NAMES:
            v = getattr(self, name)
            if v.ndim != 2 or v.shape[0] != shape[0] or v.shape[1] < 1:
                raise ParamsError(f"{name} must have shape (N-1, K) = ({shape[0]}, K), got {tuple(v.shape)}")
            if not torch.isfinite(v).all():
                raise ParamsError(f"{name} contains NaN or infinite values")
        if len({getattr(self, n).shape for n in VALUE_NAMES}) != 1:
            raise ParamsError(f"r, weights, dir_scale, time_scale must share one shape, got "
                              f"{[tuple(getattr(self, n).shape) for n in VALUE_NAMES]}")
        if torch.any((self.r < 0) | (self.r > 1)):
            raise ParamsError("positions r must lie in [0, 1]")
        w = self.weights
        if torch.any(w < -SIMPLEX_TOL) or torch.any((w.sum(-1) - 1).abs() > SIMPLEX_TOL):
            raise ParamsError(f"weights must lie on the simplex (non-negative, rows summing to 1 within "
                              f"{SIMPLEX_TOL}); row sums {w.sum(-1).tolist()}")
        self._check_scales()
        if self.solver.startswith("amed") and self.k != 1:
            raise ParamsError(f"solver {self.solver!r} has one inserted point per step (K = 1), got K = {self.k}")
        self._check_extra()
        for n, v in self.raw.items():
            if not torch.isfinite(v).all():
                raise ParamsError(f"raw table {n!r} contains NaN or infinite values")
        if self.raw and self.parameterization == NATURAL:
            raise ParamsError(f"raw tables need a trained parameterisation, not {NATURAL!r}: drop the raw tables "
                              "or name the parameterisation they were trained in")
        if self.raw:
            self._check_raw()

    def _check_scales(self) -> None:
        """c and a positive and within their bounds: 1 +- s_d, 1 +- s_t (for "paper": a = ratio^t, |t| <= s_t);
        without recorded bounds (natural values) in (0, 2), the widest the parameterisations can give."""
        if self.parameterization != NATURAL and (self.scale_dir is None or self.scale_time is None):
            raise ParamsError(f"parameterisation {self.parameterization!r} needs its scale bounds: scale_dir and "
                              f"scale_time must be numbers in [0, 1), got {self.scale_dir!r}, {self.scale_time!r}")
        for name in ("dir_scale", "time_scale"):
            if not torch.all(getattr(self, name) > 0):
                raise ParamsError(f"{name} must be positive")
        c, a = self.dir_scale, self.time_scale
        s_d = 1.0 if self.scale_dir is None else self.scale_dir
        if torch.any((c - 1).abs() > s_d + 1e-12) or (self.scale_dir is None and torch.any(c >= 2)):
            raise ParamsError(f"dir_scale must lie within scale_dir = {self.scale_dir} of 1"
                              if self.scale_dir is not None else
                              "dir_scale must lie in (0, 2) when no scale_dir bound is recorded")
        if self.parameterization == "paper":  # a = (sigma_{i+1} / sigma_i) ** t with |t| <= s_t
            log_ratio = (self.sigmas[1:] / self.sigmas[:-1]).log().abs()[:, None]
            if torch.any(a.log().abs() > self.scale_time * log_ratio * (1 + 1e-9) + 1e-12):
                raise ParamsError(f"time_scale must lie within (sigma ratio)^(+-scale_time), scale_time = "
                                  f"{self.scale_time}")
            return
        s_t = 1.0 if self.scale_time is None else self.scale_time
        if torch.any((a - 1).abs() > s_t + 1e-12) or (self.scale_time is None and torch.any(a >= 2)):
            raise ParamsError(f"time_scale must lie within scale_time = {self.scale_time} of 1"
                              if self.scale_time is not None else
                              "time_scale must lie in (0, 2) when no scale_time bound is recorded")

    def _check_extra(self) -> None:
        """The family's own tensors: exactly the declared names, finite, their shapes; "lw"'s fixed columns."""
        want = FAMILY_TENSORS.get(self.solver, ())
        if set(self.extra) != set(want):
            raise ParamsError(f"solver {self.solver!r} stores the tensors {list(want)} beside the common ones, got "
                              f"{sorted(self.extra)}")
        for name, v in self.extra.items():
            if not torch.isfinite(v).all():
                raise ParamsError(f"{name} contains NaN or infinite values")
        if self.solver == "lw" and (self.k != 1 or torch.any(self.r != 0) or torch.any(self.weights != 1)
                                    or torch.any(self.dir_scale != 1)):
            raise ParamsError("solver 'lw' evaluates once per step at its start: K = 1, r = 0, weights = 1 and "
                              "dir_scale = 1")
        if "history_weights" not in self.extra:
            return
        from .multistep import history_mask

        w, shape = self.extra["history_weights"], (self.steps, self.plugin_order)
        if tuple(w.shape) != shape:
            raise ParamsError(f"history_weights must have shape (N-1, plugin_order) = {shape}, got {tuple(w.shape)}")
        if torch.any(w[~history_mask(*shape)] != 0):
            raise ParamsError("history_weights[i, j] with j > i weighs a direction step i does not have: it must be 0")

    def _check_raw(self) -> None:
        """The stored raw tables must reproduce the stored natural values."""
        try:
            tables = self.to_tables()
            with torch.no_grad():
                nat = tables.file_values()
        except (ValueError, TypeError, RuntimeError) as e:
            raise ParamsError(f"raw tables do not fit parameterisation {self.parameterization!r}: {e}") from None
        stored = dict({n: getattr(self, n) for n in VALUE_NAMES}, **self.extra)
        for name, ref in stored.items():
            if name not in nat or nat[name].shape != ref.shape or not torch.allclose(nat[name], ref, rtol=0, atol=1e-9):
                raise ParamsError(f"raw tables do not reproduce the stored {name}")

    def check_compatible(self, sigmas: Any = None, k: int | None = None, model_id: str | None = None) -> None:
        """Raise :class:`ParamsMismatchError` unless the grid (a trailing 0 allowed, relative tolerance 1e-6),
        K and the model id (when the file records one) match."""
        if k is not None and k != self.k:
            raise ParamsMismatchError(f"parameters have K = {self.k} branches, the call asks for K = {k}")
        if sigmas is not None:
            s = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            if s.numel() == self.num_points + 1 and s[-1] == 0:
                s = s[:-1]
            if s.shape != self.sigmas.shape or not torch.all((s - self.sigmas).abs() <= GRID_RTOL * self.sigmas):
                raise ParamsMismatchError(f"sigma grid mismatch: the parameters were distilled on "
                                          f"{self.sigmas.tolist()}, the call uses {s.tolist()}")
        if model_id is not None:
            have = self.meta.get("model_id")
            if have is not None and have != model_id:
                raise ParamsMismatchError(f"parameters are for model {have!r}, not {model_id!r}")

    # -- files --------------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """The JSON metadata written into the file."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "solver": self.solver, "k": self.k,
                "num_points": self.num_points, "sigmas": self.sigmas.tolist(), "afs": self.afs,
                "plugin_order": self.plugin_order, "parameterization": self.parameterization,
                "scale_dir": self.scale_dir, "scale_time": self.scale_time, "nfe": self.nfe(),
                "library_version": _library_version(), "meta": self.meta}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write one .safetensors file atomically (:func:`epd_solver.files.write_atomic`); refuse an existing
        file (``FileExistsError``) unless ``overwrite=True``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if path.exists() and not path.is_file():
            raise IsADirectoryError(f"{path} is not a regular file")
        tensors = {n: getattr(self, n) for n in VALUE_NAMES + ("sigmas",)}
        tensors.update(self.extra)
        tensors.update({f"raw.{n}": v for n, v in self.raw.items()})
        meta = {METADATA_KEY: json.dumps(self.header(), allow_nan=False)}
        # without overwrite the name is taken by a link, so a file that appeared meanwhile is never replaced
        if not write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta), replace=overwrite, fsync=True):
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, k: int | None = None, sigmas: Any = None,
             model_id: str | None = None) -> "EPDParams":
        """Read and validate a parameter file; check it against ``k``, ``sigmas`` and ``model_id`` when given.

        Raises ``FileNotFoundError``, :class:`ParamsFileError` (not a safetensors EPD file: pickle,
        truncated, malformed, invalid values) or :class:`ParamsMismatchError`.
        """
        path = Path(path)
        try:
            if not path.is_file():
                raise FileNotFoundError(f"no parameter file at {path}")
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ParamsFileError(f"{path}: {size} bytes is too large for an EPD parameter file")
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:  # name too long, permission denied, a folder, ...
            raise ParamsFileError(f"cannot read the parameter file {str(path)[:200]!r}: "
                                  f"{e.strerror or e}") from None
        header, meta = _read_header(data, path)
        tensors = _read_tensors(data, path)
        params = _from_file(header, meta, tensors, path)
        params.check_compatible(sigmas=sigmas, k=k, model_id=model_id)
        return params


def _read_header(data: bytes, path: Path) -> tuple[dict, dict]:
    """Parse the safetensors header by hand (clear errors before the library sees the bytes)."""
    if len(data) < 9:
        raise ParamsFileError(f"{path}: truncated file ({len(data)} bytes, shorter than a safetensors header)")
    if data[8:9] != b"{":  # a safetensors file starts with an 8-byte length, then its JSON header
        if data[:2] == b"PK" or data[:1] == b"\x80":
            raise ParamsFileError(f"{path}: this is a pickle / torch.save file, not a safetensors EPD parameter "
                                  f"file; pickles are never loaded (they can run arbitrary code)")
        raise ParamsFileError(f"{path}: not a safetensors file (no JSON header)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ParamsFileError(f"{path}: truncated file (header of {n} bytes, file has {len(data)} bytes)")
    try:
        header = _loads(data[8: 8 + n].decode("utf-8"), "safetensors header")
    except UnicodeDecodeError as e:
        raise ParamsFileError(f"{path}: malformed safetensors header ({e})") from None
    except ParamsError as e:
        raise ParamsFileError(f"{path}: malformed {e}") from None
    if not isinstance(header, dict):
        raise ParamsFileError(f"{path}: malformed safetensors header (not a JSON object)")
    body = len(data) - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ParamsFileError(f"{path}: malformed entry for tensor {name!r}")
        if offsets[1] > body:
            raise ParamsFileError(f"{path}: truncated file (tensor {name!r} ends at byte {offsets[1]} of the data, "
                                  f"which has {body} bytes)")
    extra = header.get("__metadata__")
    if extra is not None and not isinstance(extra, dict):
        raise ParamsFileError(f"{path}: malformed safetensors header (__metadata__ must be an object of strings, "
                              f"got {type(extra).__name__}); re-save the parameters with EPDParams.save")
    text = (extra or {}).get(METADATA_KEY)
    if text is None:
        raise ParamsFileError(f"{path}: a safetensors file without EPD metadata (key {METADATA_KEY!r})")
    try:
        meta = _loads(text, f"EPD metadata {METADATA_KEY!r}")
    except ParamsError as e:
        raise ParamsFileError(f"{path}: malformed {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ParamsFileError(f"{path}: metadata is not in the {FORMAT!r} format")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ParamsFileError(f"{path}: format version {meta.get('format_version')!r} is not supported "
                              f"(this library reads version {FORMAT_VERSION})")
    missing, unknown = sorted(HEADER_KEYS - set(meta) - {"library_version"}), sorted(set(meta) - HEADER_KEYS)
    if missing or unknown:
        problems = ([f"lacks {missing}"] if missing else []) + ([f"has unknown keys {unknown}"] if unknown else [])
        raise ParamsFileError(f"{path}: the EPD metadata {' and '.join(problems)}; re-save it with EPDParams.save")
    if not isinstance(meta.get("library_version", ""), str):
        raise ParamsFileError(f"{path}: library_version must be a string, got {meta['library_version']!r}")
    return header, meta


def _read_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ParamsFileError(f"{path}: malformed safetensors data ({e})") from None


def _from_file(header: dict, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> EPDParams:
    solver = meta.get("solver")
    family = FAMILY_TENSORS.get(solver, ()) if isinstance(solver, str) else ()
    names = VALUE_NAMES + ("sigmas",) + family
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ParamsFileError(f"{path}: missing tensors {missing}")
    unknown = [n for n in tensors if n not in names and not n.startswith("raw.")]
    if unknown:
        raise ParamsFileError(f"{path}: unexpected tensors {unknown}")
    if not isinstance(meta.get("meta", {}), dict):
        raise ParamsFileError(f"{path}: malformed metadata ('meta' must be a JSON object)")
    for n, t in tensors.items():
        if not t.is_floating_point():
            raise ParamsFileError(f"{path}: tensor {n!r} has dtype {t.dtype}, expected floating point")
    try:
        params = EPDParams(
            tensors["r"], tensors["weights"], tensors["dir_scale"], tensors["time_scale"], tensors["sigmas"],
            afs=meta.get("afs"), plugin_order=meta.get("plugin_order"), solver=meta.get("solver"),
            parameterization=meta.get("parameterization"), scale_dir=meta.get("scale_dir"),
            scale_time=meta.get("scale_time"), raw={n[4:]: t for n, t in tensors.items() if n.startswith("raw.")},
            meta=meta.get("meta"), extra={n: tensors[n] for n in family})
    except ParamsError as e:
        raise ParamsFileError(f"{path}: {e}") from None
    _check_header(meta, params, path)
    return params


def _check_header(meta: dict, params: EPDParams, path: Path) -> None:
    """The file's own header must describe the loaded values: K, N, the grid, the NFE block, the config."""
    k, n = meta.get("k"), meta.get("num_points")
    if not _is_int(k) or not _is_int(n) or k != params.k or n != params.num_points:
        raise ParamsFileError(f"{path}: metadata (K = {k!r}, N = {n!r}) disagrees with "
                              f"the tensors (K = {params.k}, N = {params.num_points})")
    grid = meta.get("sigmas")
    if not isinstance(grid, list) or len(grid) != params.num_points or \
            not all(isinstance(v, float) or _is_int(v) and abs(v) < 2**53 for v in grid) or \
            not torch.equal(torch.tensor([float(v) for v in grid], dtype=torch.float64), params.sigmas):
        raise ParamsFileError(f"{path}: the sigma grid in the metadata disagrees with the stored tensor")
    if meta.get("plugin_order") != params.plugin_order:  # a plugin file names its order (no silent default)
        raise ParamsFileError(f"{path}: solver {params.solver!r} needs plugin_order in the metadata (1..4), got "
                              f"{meta.get('plugin_order')!r}")
    nfe = params.nfe()
    if meta.get("nfe") != nfe:
        raise ParamsFileError(f"{path}: the file's nfe block {meta.get('nfe')!r} disagrees with its values "
                              f"({nfe}, from afs = {params.afs}, K = {params.k}, {params.steps} steps)")
    config = params.meta.get("config")
    if isinstance(config, dict):  # the settings the distillation resolved must match what the file holds
        fields = {"solver": params.solver, "k": params.k, "afs": params.afs, "nfe": nfe["para_nfe"],
                  "plugin_order": params.plugin_order, "parameterization": params.parameterization,
                  "scale_dir": params.scale_dir, "scale_time": params.scale_time}
        recorded = {key: v for key, v in config.items() if key in fields and v is not None and v != "auto"}
        wrong = [f"{key} = {v!r} (the file holds {fields[key]!r})" for key, v in recorded.items()
                 if v != fields[key] or isinstance(v, bool) != isinstance(fields[key], bool)]
        if wrong:
            raise ParamsFileError(f"{path}: meta.config disagrees with the parameters: {', '.join(wrong)}")
