"""EPD parameter files: natural values + raw tables as safetensors, metadata as JSON in the header.

A file holds float64 tensors ``r``, ``weights``, ``dir_scale``, ``time_scale`` (each (N-1, K)),
``sigmas`` (N) and ``raw.<name>`` (the raw tables, if any), and one metadata entry ``"epd_solver"``: a JSON
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

SOLVERS = ("epd", "epd_plugin", "amed", "amed_plugin")
DEFAULT_PLUGIN_ORDER = {"epd_plugin": 3, "amed_plugin": 4}
FORMAT, FORMAT_VERSION = "epd-params", 1
METADATA_KEY = "epd_solver"
VALUE_NAMES = ("r", "weights", "dir_scale", "time_scale")
SIMPLEX_TOL = 1e-6
GRID_RTOL = 1e-6
MAX_FILE_BYTES = 64 * 2**20


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


class EPDParams:
    """Natural values of a learned EPD / EPD-Plugin / AMED / AMED-Plugin table, with their grid and metadata.

    ``r``, ``weights``, ``dir_scale``, ``time_scale``: float64 (N-1, K); ``sigmas``: float64 (N,), no
    trailing 0. Construction validates (``ParamsError``): shapes, finiteness, r in [0, 1], weights on the
    simplex within 1e-6, positive scales (within s_d / s_t of 1 when those are known), and the solver
    kind (``amed*``: K = 1; ``*_plugin``: a plugin order in 1..4).
    """

    def __init__(self, r: Any, weights: Any, dir_scale: Any, time_scale: Any, sigmas: Any, *, afs: bool = False,
                 plugin_order: int | None = None, solver: str = "epd", parameterization: str = "natural",
                 scale_dir: float | None = None, scale_time: float | None = None,
                 raw: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None):
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
        if not isinstance(parameterization, str) or not parameterization:
            raise ParamsError(f"parameterization must be a non-empty string, got {parameterization!r}")
        self.parameterization = parameterization
        self.scale_dir, self.scale_time = _opt_scale(scale_dir, "scale_dir"), _opt_scale(scale_time, "scale_time")
        self.raw = {str(n): _f64(v, f"raw[{n!r}]") for n, v in (raw or {}).items()}
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ParamsError(f"meta must be JSON-serialisable: {e}") from None
        self._validate()

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_values(cls, r: Any, weights: Any, dir_scale: Any = None, time_scale: Any = None, *, sigmas: Any,
                    afs: bool = False, plugin_order: int | None = None, solver: str | None = None,
                    **meta: Any) -> "EPDParams":
        """From natural values (lists or tensors of shape (N-1, K)); c = a = 1 where not given.

        ``solver`` defaults to ``"epd"`` (``"epd_plugin"`` when ``plugin_order`` is given). The keywords
        ``parameterization``, ``scale_dir``, ``scale_time`` and ``raw`` set those fields; all other
        keywords go to ``meta``.
        """
        r = _f64(r, "r")
        ones = torch.ones(r.shape, dtype=torch.float64)
        fields = {k: meta.pop(k) for k in ("parameterization", "scale_dir", "scale_time", "raw") if k in meta}
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
            r, lam, c, a = tables.natural()
        meta.setdefault("version", _library_version())
        return cls(r, lam, c, a, sig, afs=afs, plugin_order=plugin_order, solver=solver,
                   parameterization=tables.kind, scale_dir=tables.scale_dir, scale_time=tables.scale_time,
                   raw=tables.raw(), meta=meta)

    def to_tables(self, dtype: torch.dtype = torch.float64) -> Any:
        """An :class:`EPDTables` holding this file's raw tables (for warm starts / further training)."""
        from .parameterization import EPDTables

        if not self.raw:
            raise ParamsError("these parameters carry no raw tables; use EPDTables.from_natural")
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

    def nfe(self) -> dict[str, Any]:
        """NFE per sample on the grid (EPD.md §8): Para.NFE = 2(N-1) - [AFS]; evaluations = (N-1)(K+1) - [AFS]."""
        para = 2 * self.steps - int(self.afs)
        evals = self.steps * (self.k + 1) - int(self.afs)
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
        for name, scale in (("dir_scale", self.scale_dir), ("time_scale", self.scale_time)):
            v = getattr(self, name)
            if not torch.all(v > 0):
                raise ParamsError(f"{name} must be positive")
            if scale is not None and name == "dir_scale" and torch.any((v - 1).abs() > scale + 1e-12):
                raise ParamsError(f"dir_scale must lie within scale_dir = {scale} of 1")
            if scale is not None and name == "time_scale" and self.parameterization != "paper" \
                    and torch.any((v - 1).abs() > scale + 1e-12):
                raise ParamsError(f"time_scale must lie within scale_time = {scale} of 1")
        if self.solver.startswith("amed") and self.k != 1:
            raise ParamsError(f"solver {self.solver!r} has one inserted point per step (K = 1), got K = {self.k}")
        for n, v in self.raw.items():
            if not torch.isfinite(v).all():
                raise ParamsError(f"raw table {n!r} contains NaN or infinite values")
        from .parameterization import KINDS

        if self.raw and self.parameterization in KINDS:  # other names: raw tables are kept as opaque data
            self._check_raw()

    def _check_raw(self) -> None:
        """The stored raw tables must reproduce the stored natural values."""
        try:
            tables = self.to_tables()
            with torch.no_grad():
                nat = tables.natural()
        except ValueError as e:
            raise ParamsError(f"raw tables do not fit parameterisation {self.parameterization!r}: {e}") from None
        for name, v, ref in zip(VALUE_NAMES, nat, (self.r, self.weights, self.dir_scale, self.time_scale)):
            if not torch.allclose(v, ref, rtol=0, atol=1e-9):
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
        if not path.is_file():
            raise FileNotFoundError(f"no parameter file at {path}")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ParamsFileError(f"{path}: {size} bytes is too large for an EPD parameter file")
        data = path.read_bytes()
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
        header = json.loads(data[8: 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParamsFileError(f"{path}: malformed safetensors header ({e})") from None
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
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        raise ParamsFileError(f"{path}: a safetensors file without EPD metadata (key {METADATA_KEY!r})")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParamsFileError(f"{path}: malformed EPD metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ParamsFileError(f"{path}: metadata is not in the {FORMAT!r} format")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ParamsFileError(f"{path}: format version {meta.get('format_version')!r} is not supported "
                              f"(this library reads version {FORMAT_VERSION})")
    return header, meta


def _read_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ParamsFileError(f"{path}: malformed safetensors data ({e})") from None


def _from_file(header: dict, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> EPDParams:
    missing = [n for n in VALUE_NAMES + ("sigmas",) if n not in tensors]
    if missing:
        raise ParamsFileError(f"{path}: missing tensors {missing}")
    unknown = [n for n in tensors if n not in VALUE_NAMES + ("sigmas",) and not n.startswith("raw.")]
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
            meta=meta.get("meta"))
    except ParamsError as e:
        raise ParamsFileError(f"{path}: {e}") from None
    if meta.get("k") != params.k or meta.get("num_points") != params.num_points:
        raise ParamsFileError(f"{path}: metadata (K = {meta.get('k')}, N = {meta.get('num_points')}) disagrees with "
                              f"the tensors (K = {params.k}, N = {params.num_points})")
    grid = meta.get("sigmas")
    if not isinstance(grid, list) or len(grid) != params.num_points or \
            not torch.equal(torch.tensor(grid, dtype=torch.float64), params.sigmas):
        raise ParamsFileError(f"{path}: the sigma grid in the metadata disagrees with the stored tensor")
    return params
