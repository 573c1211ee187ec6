"""EPD parameter files: bit-exact round trip, atomic no-clobber saves, and named errors on every bad file."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import epd_solver
from epd_solver.epd import EPDParams, EPDTables, ParamsError, ParamsFileError, ParamsMismatchError, sample_epd
from epd_solver.problems import digits_mixture
from epd_solver.schedules import polynomial, time_uniform

F64 = torch.float64
UNPICKLED = []


def _mark():
    UNPICKLED.append(True)
    return "payload"


class _Payload:
    def __reduce__(self):
        return (_mark, ())


def trained_params(kind="ordered", solver="epd", k=2, grid=None):
    grid = time_uniform(5) if grid is None else grid
    tables = EPDTables(grid.numel() - 1, k, kind, 0.05, 0.1, init="randn", seed=3, sigmas=grid)
    return EPDParams.from_tables(tables, sigmas=grid, afs=True, solver=solver, schedule="time_uniform",
                                 model_id="gmm:digits", teacher={"solver": "heun", "m": 3}, teacher_nfe=48,
                                 loss="per-step")


def _same(p, q):
    for name in ("r", "weights", "dir_scale", "time_scale", "sigmas"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
        assert getattr(q, name).dtype == F64
    assert p.raw.keys() == q.raw.keys() and all(torch.equal(p.raw[n], q.raw[n]) for n in p.raw)
    assert (p.solver, p.afs, p.plugin_order, p.parameterization, p.scale_dir, p.scale_time, p.meta) == \
           (q.solver, q.afs, q.plugin_order, q.parameterization, q.scale_dir, q.scale_time, q.meta)


@pytest.mark.parametrize("kind,solver", [("ordered", "epd"), ("official", "epd_plugin"), ("paper", "epd"),
                                         ("ordered", "amed_plugin")])
def test_round_trip_is_bit_exact(tmp_path, kind, solver):
    p = trained_params(kind, solver, k=1 if solver.startswith("amed") else 2)
    path = p.save(tmp_path / "p.safetensors")
    q = EPDParams.load(path, k=p.k, sigmas=time_uniform(5), model_id="gmm:digits")
    _same(p, q)
    assert q.meta["version"] == epd_solver.__version__ and q.meta["teacher_nfe"] == 48
    gmm = digits_mixture()
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(sample_epd(gmm, x, p.sigmas, p), sample_epd(gmm, x, p.sigmas, str(path)))
    # the header is plain JSON a person can read
    header = json.loads(path.read_bytes()[8: 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    meta = json.loads(header["__metadata__"]["epd_solver"])
    assert meta["solver"] == solver and meta["k"] == p.k and meta["sigmas"] == p.sigmas.tolist()
    assert meta["parameterization"] == kind and meta["afs"] is True and meta["meta"]["schedule"] == "time_uniform"


def test_raw_tables_restore_training_state(tmp_path):
    p = trained_params("official")
    tables = EPDParams.load(p.save(tmp_path / "p.safetensors")).to_tables()
    with torch.no_grad():
        nat = tables.natural()
    for v, ref in zip(nat, (p.r, p.weights, p.dir_scale, p.time_scale)):
        assert torch.equal(v, ref)


def test_save_never_clobbers(tmp_path):
    path = tmp_path / "p.safetensors"
    first = trained_params()
    first.save(path)
    before = path.read_bytes()
    second = EPDParams.from_values(torch.full((4, 2), 0.5), torch.full((4, 2), 0.5), sigmas=time_uniform(5))
    with pytest.raises(FileExistsError, match="overwrite"):
        second.save(path)
    assert path.read_bytes() == before
    second.save(path, overwrite=True)
    assert EPDParams.load(path).parameterization == "natural"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]  # no temporary files left


def test_mismatched_k_grid_model_and_solver(tmp_path):
    p = trained_params()
    path = p.save(tmp_path / "p.safetensors")
    with pytest.raises(ParamsMismatchError, match="K = 2"):
        EPDParams.load(path, k=3)
    with pytest.raises(ParamsMismatchError, match="grid"):
        EPDParams.load(path, sigmas=polynomial(5))
    with pytest.raises(ParamsMismatchError, match="grid"):
        EPDParams.load(path, sigmas=time_uniform(6))
    with pytest.raises(ParamsMismatchError, match="model"):
        EPDParams.load(path, model_id="edm-cifar10")
    grid = time_uniform(5)
    EPDParams.load(path, sigmas=torch.cat([grid * (1 + 1e-8), torch.zeros(1, dtype=F64)]))  # trailing 0, 1e-8 off
    gmm = digits_mixture()
    x = 80 * torch.randn(2, 64, dtype=F64)
    with pytest.raises(ParamsMismatchError, match="grid"):
        sample_epd(gmm, x, polynomial(5), p)
    from epd_solver.epd import sample_amed

    with pytest.raises(ParamsMismatchError, match="solver kind"):
        sample_amed(gmm, x, grid, params=p)


@pytest.mark.parametrize("bad,match", [
    (dict(weights=[[0.5, 0.6]] * 4), "simplex"),
    (dict(weights=[[1.2, -0.2]] * 4), "simplex"),
    (dict(r=[[0.2, 1.1]] * 4), r"\[0, 1\]"),
    (dict(dir_scale=[[1.0, -1.0]] * 4), "positive"),
    (dict(time_scale=[[1.0, float("nan")]] * 4), "NaN"),
    (dict(r=[[0.2, 0.3]] * 3), "shape"),
])
def test_invalid_values_are_refused(tmp_path, bad, match):
    values = dict(r=[[0.2, 0.7]] * 4, weights=[[0.5, 0.5]] * 4, dir_scale=[[1.0, 1.0]] * 4,
                  time_scale=[[1.0, 1.0]] * 4)
    values.update(bad)
    grid = time_uniform(5)
    with pytest.raises(ParamsError, match=match):
        EPDParams.from_values(values["r"], values["weights"], values["dir_scale"], values["time_scale"], sigmas=grid)
    # the same values written by hand into an otherwise well-formed file
    good = EPDParams.from_values([[0.2, 0.7]] * 4, [[0.5, 0.5]] * 4, sigmas=grid)
    tensors = {n: torch.as_tensor(v, dtype=F64) for n, v in values.items()}
    tensors["sigmas"] = grid
    meta = good.header()
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"epd_solver": json.dumps(meta)})
    with pytest.raises(ParamsFileError, match=match):
        EPDParams.load(path)


def test_scales_outside_their_bounds_are_refused():
    grid = time_uniform(5)
    with pytest.raises(ParamsError, match="scale_dir"):
        EPDParams.from_values([[0.3]] * 4, [[1.0]] * 4, [[1.2]] * 4, sigmas=grid, scale_dir=0.05)
    with pytest.raises(ParamsError, match="K = 1"):
        EPDParams.from_values([[0.3, 0.6]] * 4, [[0.5, 0.5]] * 4, sigmas=grid, solver="amed")
    with pytest.raises(ParamsError, match="plugin_order"):
        EPDParams.from_values([[0.3]] * 4, [[1.0]] * 4, sigmas=grid, solver="epd_plugin", plugin_order=5)
    with pytest.raises(ParamsError, match="plugin_order"):
        EPDParams.from_values([[0.3]] * 4, [[1.0]] * 4, sigmas=grid, solver="amed", plugin_order=3)
    with pytest.raises(ParamsError, match="sigmas"):
        EPDParams.from_values([[0.3]] * 4, [[1.0]] * 4, sigmas=torch.cat([grid[:-1], torch.zeros(1, dtype=F64)]))


def test_tampered_raw_tables_are_refused(tmp_path):
    p = trained_params("official")
    raw = dict(p.raw)
    raw["weight_logits"] = raw["weight_logits"] + torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ParamsError, match="raw tables"):
        EPDParams(p.r, p.weights, p.dir_scale, p.time_scale, p.sigmas, afs=True, parameterization="official",
                  scale_dir=0.05, scale_time=0.1, raw=raw)


def test_pickles_are_refused_without_unpickling(tmp_path):
    for i, dump in enumerate((lambda obj, f: torch.save(obj, f), lambda obj, f: pickle.dump(obj, f, protocol=2),
                              lambda obj, f: pickle.dump(obj, f, protocol=4))):
        path = tmp_path / f"p{i}.pt"
        with open(path, "wb") as f:
            dump({"r": _Payload()}, f)
        with pytest.raises(ParamsFileError, match="pickle"):
            EPDParams.load(path)
    assert UNPICKLED == []


def test_truncated_and_malformed_files(tmp_path):
    path = trained_params().save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = {"body": data[:-20], "header": data[: 8 + n // 2], "tiny": data[:5], "empty": b""}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ParamsFileError, match="truncated|not a safetensors"):
            EPDParams.load(bad)
    garbled = bytearray(data)
    garbled[9:20] = b"#" * 11
    (tmp_path / "garbled.safetensors").write_bytes(bytes(garbled))
    with pytest.raises(ParamsFileError, match="malformed"):
        EPDParams.load(tmp_path / "garbled.safetensors")
    save_file({"r": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ParamsFileError, match="without EPD metadata"):
        EPDParams.load(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("r = [0.5]\n")
    with pytest.raises(ParamsFileError, match="not a safetensors"):
        EPDParams.load(tmp_path / "text.safetensors")
    with pytest.raises(FileNotFoundError):
        EPDParams.load(tmp_path / "missing.safetensors")


def test_metadata_must_agree_with_tensors(tmp_path):
    p = trained_params()
    tensors = {n: getattr(p, n) for n in ("r", "weights", "dir_scale", "time_scale", "sigmas")}
    for key, value, match in (("k", 3, "disagrees"), ("sigmas", (p.sigmas * 1.001).tolist(), "disagrees"),
                              ("format_version", 99, "version"), ("format", "other", "format"),
                              ("solver", "dpm", "solver"), ("meta", [1, 2], "malformed")):
        meta = p.header()
        meta[key] = value
        path = tmp_path / f"{key}.safetensors"
        save_file(tensors, str(path), metadata={"epd_solver": json.dumps(meta)})
        with pytest.raises(ParamsFileError, match=match):
            EPDParams.load(path)
