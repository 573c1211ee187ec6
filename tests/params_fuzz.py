"""Seeded mutations of EPD parameter files, and the check every load must pass.

Used by ``tests/test_params_strict.py`` (2,000 mutations of one shipped file) and, run as a script, the full
campaign over every shipped file::

    PYTHONPATH=src python tests/params_fuzz.py --per-file 400 --seed 0

which prints the counts (refused, loaded harmlessly, other exceptions, slowest load) and exits non-zero if
any load raised another exception type or loaded a file whose header or values differ from the original.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

PALETTE = [None, True, False, 0, -1, 1, 2, 3, 5, 1.5, -0.5, 0.05, 1e308, 2**70, "", "epd", "ordered", "paper",
           "natural", "x" * 300, [], [1], [None], {}, {"a": 1}, [[[[]]]]]
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "src" / "epd_solver" / "data" / "params"


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def join(header: dict | str, body: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


def with_meta(meta: dict | str, data: bytes) -> bytes:
    """``data`` (a parameter file) with its EPD metadata replaced (an object, or raw JSON text)."""
    header, body = split(data)
    header["__metadata__"] = {"epd_solver": meta if isinstance(meta, str) else json.dumps(meta)}
    return join(header, body)


def epd_header(data: bytes) -> dict:
    header, _ = split(data)
    return json.loads(header["__metadata__"]["epd_solver"])


def _nodes(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, path + (i,))


def mutate_json(meta: dict, rng: random.Random) -> dict:
    meta = json.loads(json.dumps(meta))
    paths = [p for p in _nodes(meta) if p]
    if rng.random() < 0.7:  # mostly the fields the library reads, not the free-form record in meta
        paths = [p for p in paths if p[0] != "meta" or len(p) <= 2 or p[1] in ("config", "nfe")]
    path = rng.choice(paths)
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.25 and isinstance(parent[path[-1]], (int, float)) and not isinstance(parent[path[-1]], bool):
        parent[path[-1]] = parent[path[-1]] * rng.choice([-1, 0.5, 1 + 1e-9, 2, 10])
    elif op < 0.3 and isinstance(parent, dict):
        parent[rng.choice(["extra", "afs_", "nfe"])] = rng.choice(PALETTE)
    else:
        parent[path[-1]] = rng.choice(PALETTE)
    return meta


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutation: a metadata value (55 %), a tensor entry of the header (15 %), a header byte (15 %) or a
    tensor-data byte (15 %)."""
    header, body = split(data)
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.random()
    if kind < 0.55:
        return with_meta(mutate_json(epd_header(data), rng), data)
    if kind < 0.7:
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(PALETTE + ["F32", "I64", "F16", [3, 2], [0, 8]])
        return join(header, body)
    blob = bytearray(data)
    i = rng.randrange(8, 8 + n) if kind < 0.85 else rng.randrange(8 + n, len(blob))
    blob[i] = rng.choice([blob[i] ^ (1 << rng.randrange(8)), rng.randrange(256)])
    return bytes(blob)


def check_load(path: Path, ref) -> str:
    """Load ``path``: "refused" (a ParamsFileError) or "loaded" (header and values those of ``ref``, the
    unmutated file, up to 1e-9). Anything else raises AssertionError (or the unexpected exception)."""
    from epd_solver.epd import EPDParams, ParamsFileError

    try:
        params = EPDParams.load(path)
    except ParamsFileError:
        return "refused"
    want = {k: v for k, v in params.header().items() if k != "library_version"}
    have = {k: v for k, v in epd_header(path.read_bytes()).items() if k != "library_version"}
    assert have == want, "a loaded file's header differs from what its values give"
    assert torch.equal(params.sigmas, ref.sigmas), "a loaded file has another grid"
    for a, b in zip(params.natural(), ref.natural()):
        assert torch.allclose(a, b, rtol=0, atol=1e-9), "a loaded file has other values"
    assert set(params.extra) == set(ref.extra), "a loaded file has other family tensors"
    for name, b in ref.extra.items():
        assert torch.allclose(params.extra[name], b, rtol=0, atol=1e-9), f"a loaded file has another {name}"
    return "loaded"


def campaign(files: list[Path], per_file: int, seed: int) -> dict:
    from epd_solver.epd import EPDParams

    counts = {"files": len(files), "mutations": 0, "refused": 0, "loaded": 0, "other": 0, "slowest_s": 0.0}
    other: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        for j, f in enumerate(files):
            rng, data, ref = random.Random(seed * 1000 + j), f.read_bytes(), EPDParams.load(f)
            for _ in range(per_file):
                path.write_bytes(mutate(data, rng))
                started = time.perf_counter()
                try:
                    counts[check_load(path, ref)] += 1
                except Exception as e:  # noqa: BLE001  (the campaign counts them)
                    counts["other"] += 1
                    other.append(f"{f.name}: {type(e).__name__}: {str(e)[:200]}")
                counts["slowest_s"] = max(counts["slowest_s"], time.perf_counter() - started)
                counts["mutations"] += 1
    counts["examples"] = other[:10]
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-file", type=int, default=400, help="mutations per shipped file (default 400)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = sorted(SHIPPED_DIR.glob("*.safetensors"))
    started = time.perf_counter()
    counts = campaign(files, args.per_file, args.seed)
    counts["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(counts, indent=2))
    return 1 if counts["other"] else 0


if __name__ == "__main__":
    sys.exit(main())
