"""Invalid parameter files never load: every bad file a named ParamsError, every loaded file's header true.

The files are mutations of a shipped table (gmm-digits-epd-nfe5), written byte by byte so that headers a
safetensors writer would refuse (a list as __metadata__, 2,000-level nesting) can be tried too.
"""

import json
import random
from pathlib import Path

import pytest
import torch

from epd_solver.epd import EPDParams, ParamsError, ParamsFileError, ParamsMismatchError, sample_epd
from epd_solver.problems import digits_mixture
from epd_solver.schedules import time_uniform

import params_fuzz as fuzz
from params_fuzz import join, split

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "epd_solver" / "data" / "params" / \
    "gmm-digits-epd-nfe5.safetensors"
F64 = torch.float64


def with_meta(meta, data=None):
    return fuzz.with_meta(meta, data or SHIPPED.read_bytes())


def shipped_meta() -> dict:
    header, _ = split(SHIPPED.read_bytes())
    return json.loads(header["__metadata__"]["epd_solver"])


def load_bytes(tmp_path: Path, blob: bytes, name: str = "p.safetensors") -> EPDParams:
    path = tmp_path / name
    path.write_bytes(blob)
    return EPDParams.load(path)


def refused(tmp_path: Path, blob: bytes, match: str) -> None:
    with pytest.raises(ParamsFileError, match=match):
        load_bytes(tmp_path, blob)


# -- the six classes that used to load although invalid ------------------------------------------------------

def test_another_models_file_is_refused_by_sample_epd_unless_allowed():
    gmm = digits_mixture()
    params = EPDParams.load(SHIPPED)
    assert params.meta["model_id"] == gmm.name == "gmm:digits"
    x = 80 * torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = sample_epd(gmm, x, params.sigmas, params)
    params.meta["model_id"] = "gauss:model"
    with pytest.raises(ParamsMismatchError, match="'gauss:model', not 'gmm:digits'.*allow_other_model=True"):
        sample_epd(gmm, x, params.sigmas, params)
    assert torch.equal(sample_epd(gmm, x, params.sigmas, params, allow_other_model=True), ours)
    with pytest.raises(TypeError, match="allow_other_model must be True or False"):
        sample_epd(gmm, x, params.sigmas, params, allow_other_model="yes")


@pytest.mark.parametrize("grid,what", [([0.5, 0.2, 0.05, 0.002], "starts below sigma_max"),
                                       ([80.0, 6.9, 1.3, 5e-324], "ends below sigma_min"),
                                       ([160.0, 6.9, 1.3, 0.002], "starts above sigma_max")])
def test_grid_outside_the_models_range_is_refused(grid, what):
    gmm = digits_mixture()  # sigma range [0.002, 80]
    sig = torch.tensor(grid, dtype=F64)
    params = EPDParams.from_values([[0.3, 0.7]] * 3, [[0.5, 0.5]] * 3, sigmas=sig, afs=True)
    x = sig[0] * torch.randn(2, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.raises(ParamsMismatchError, match="model's range is \\[0.002, 80\\].*--allow-other-model"):
        sample_epd(gmm, x, sig, params)
    out = sample_epd(gmm, x, sig, params, allow_other_model=True)  # what the override gives: a finite run
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_a_grid_inside_the_range_starting_at_sigma_max_samples():
    gmm = digits_mixture()
    sig = time_uniform(4)
    params = EPDParams.from_values([[0.3, 0.7]] * 3, [[0.5, 0.5]] * 3, sigmas=sig, afs=True)
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.isfinite(sample_epd(gmm, x, sig, params)).all()


def _natural_file(tmp_path: Path, dir_scale: float, **fields) -> bytes:
    """A raw-free file whose header is written by EPDParams (then edited): dir_scale everywhere."""
    from safetensors.torch import save_file

    good = EPDParams.from_values([[0.3, 0.7]] * 3, [[0.5, 0.5]] * 3, sigmas=time_uniform(4), afs=True)
    meta = {**good.header(), **fields}
    tensors = {n: getattr(good, n) for n in ("r", "weights", "time_scale", "sigmas")}
    tensors["dir_scale"] = torch.full((3, 2), dir_scale, dtype=F64)
    save_file(tensors, str(tmp_path / "n.safetensors"), metadata={"epd_solver": json.dumps(meta)})
    return (tmp_path / "n.safetensors").read_bytes()


def test_scale_dir_null_with_a_far_dir_scale_is_refused(tmp_path):
    refused(tmp_path, _natural_file(tmp_path, 100.0), "dir_scale must lie in \\(0, 2\\)")
    refused(tmp_path, _natural_file(tmp_path, 100.0, parameterization="ordered", scale_dir=None, scale_time=0.05),
            "needs its scale bounds")
    # the shipped file with its scale_dir removed: the raw tables cannot be read without their bound
    meta = shipped_meta()
    meta["scale_dir"] = None
    refused(tmp_path, with_meta(meta), "needs its scale bounds")
    assert load_bytes(tmp_path, _natural_file(tmp_path, 1.5)).dir_scale.max() == 1.5  # in (0, 2): a valid file


def test_unknown_parameterization_is_refused(tmp_path):
    meta = shipped_meta()
    assert meta["parameterization"] == "ordered"
    meta["parameterization"] = "ordeRed"  # one flipped byte
    refused(tmp_path, with_meta(meta), "parameterization must be one of \\('ordered', 'official', 'paper', "
                                       "'natural'\\), got 'ordeRed'")


def test_afs_contradicting_the_nfe_block_is_refused(tmp_path):
    meta = shipped_meta()
    assert meta["afs"] is True and meta["nfe"]["para_nfe"] == 5
    meta["afs"] = False
    refused(tmp_path, with_meta(meta), "nfe block .*'para_nfe': 5.* disagrees .*'para_nfe': 6")
    meta = shipped_meta()
    meta["meta"]["config"]["afs"] = False  # the recorded distillation setting contradicts the table
    refused(tmp_path, with_meta(meta), "meta.config disagrees .*afs = False")


def test_non_integer_cfg_multiplier_is_refused(tmp_path):
    for bad in (1.5, "2", True, 0):
        meta = shipped_meta()
        meta["meta"]["cfg_multiplier"] = bad
        refused(tmp_path, with_meta(meta), "cfg_multiplier must be a positive integer")
        with pytest.raises(ParamsError, match="cfg_multiplier"):
            EPDParams.from_values([[0.5]], [[1.0]], sigmas=[80.0, 0.002], cfg_multiplier=bad)
    meta = shipped_meta()
    meta["meta"]["cfg_multiplier"] = 2
    meta["nfe"].update(cfg_multiplier=2, network_rows=2 * meta["nfe"]["evaluations"])
    assert load_bytes(tmp_path, with_meta(meta)).nfe()["network_rows"] == 2 * meta["nfe"]["evaluations"]


# -- the malformed files that used to raise other exception types -------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("case", ["metadata-list", "metadata-string", "metadata-number", "metadata-value-number",
                                  "deep-header", "deep-meta", "deep-meta-dicts", "sigma-string", "sigma-null",
                                  "sigma-huge-int", "sigma-bool", "sigma-nested", "sigma-inf", "sigma-nan",
                                  "epd-number", "epd-object", "epd-list", "int-5000-digits", "unknown-key",
                                  "missing-key", "k-bool", "meta-deep-value"])
def test_malformed_files_raise_params_file_error(tmp_path, case):
    data = SHIPPED.read_bytes()
    header, body = split(data)
    meta = shipped_meta()
    text = None
    if case.startswith("metadata-"):
        value = {"metadata-list": "[1, 2]", "metadata-string": '"x"', "metadata-number": "3",
                 "metadata-value-number": json.dumps({"epd_solver": 7})}[case]
        header.pop("__metadata__")
        header_text = json.dumps(header)[:-1] + f', "__metadata__": {value}}}'
        blob, match = join(header_text, body), "__metadata__|must be a JSON string"
    elif case == "deep-header":
        blob, match = join(json.dumps(header)[:-1] + f', "x": {_nested(5000)}}}', body), "nested"
    elif case in ("deep-meta", "deep-meta-dicts", "meta-deep-value"):
        deep = _nested(1200) if case == "deep-meta" else '{"a":' * 1200 + "1" + "}" * 1200
        if case == "meta-deep-value":
            deep = _nested(40)  # under Python's limit, over the library's
        text = json.dumps(meta)[:-1] + f', "deep": {deep}}}'
        match = "nested"
    elif case.startswith("sigma-"):
        bad = {"sigma-string": '"80"', "sigma-null": "null", "sigma-huge-int": "1" + "0" * 400,
               "sigma-bool": "true", "sigma-nested": "[80.0]", "sigma-inf": "1e999", "sigma-nan": "NaN"}[case]
        grid = json.dumps(meta["sigmas"])
        text = json.dumps(meta).replace(grid, "[" + bad + grid[grid.index(","):])
        assert text != json.dumps(meta)
        match = "sigma grid|finite number|valid JSON"
    elif case.startswith("epd-"):
        header["__metadata__"]["epd_solver"] = {"epd-number": 5, "epd-object": {"format": "epd-params"},
                                                "epd-list": ["epd-params"]}[case]
        blob, match = join(header, body), "must be a JSON string"
    elif case == "int-5000-digits":
        text, match = json.dumps(meta)[:-1] + f', "big": {"9" * 5000}}}', "valid JSON"
    elif case == "unknown-key":
        text, match = json.dumps({**meta, "afs_": True}), "unknown keys \\['afs_'\\]"
    elif case == "missing-key":
        meta.pop("plugin_order")
        text, match = json.dumps(meta), "lacks \\['plugin_order'\\]"
    elif case == "k-bool":
        meta["k"] = True  # K = 2 in the shipped file; True == 1 would pass a plain comparison for K = 1
        text, match = json.dumps(meta), "metadata \\(K = True"
    if text is not None:
        blob = with_meta(text, data)
    refused(tmp_path, blob, match)


def test_over_long_names_are_a_named_error(tmp_path):
    with pytest.raises(ParamsFileError, match="cannot read the parameter file.*too long"):
        EPDParams.load(tmp_path / ("p" * 300 + ".safetensors"))
    with pytest.raises(ParamsFileError, match="cannot read the parameter file"):
        EPDParams.load(tmp_path / ("d" * 300) / "p.safetensors")
    with pytest.raises(FileNotFoundError):  # a missing file keeps its own error
        EPDParams.load(tmp_path / "missing.safetensors")


# -- fuzzing ----------------------------------------------------------------------------------------------------

def test_fuzzed_files_load_truthfully_or_raise_a_params_file_error(tmp_path):
    """2,000 seeded mutations of a shipped file: each refused (ParamsFileError) or loaded with the header and
    values of the original; never another exception type (the full campaign: tests/params_fuzz.py)."""
    rng, data, ref = random.Random(20260), SHIPPED.read_bytes(), EPDParams.load(SHIPPED)
    counts = {"loaded": 0, "refused": 0}
    path = tmp_path / "f.safetensors"
    for _ in range(2000):
        path.write_bytes(fuzz.mutate(data, rng))
        counts[fuzz.check_load(path, ref)] += 1
    assert counts["refused"] > 900 and counts["loaded"] > 50, counts  # both outcomes occur


# -- sampler calls --------------------------------------------------------------------------------------------

class _Labelled:
    """The mixture's denoiser taking (and ignoring) class labels of any size: a model that tolerates a
    wrongly sized conditioning tensor, so only the sampler's own check can catch it."""

    def __init__(self):
        self.inner = digits_mixture()
        self.name, self.sigma_min, self.sigma_max = self.inner.name, self.inner.sigma_min, self.inner.sigma_max

    def __call__(self, x, sigma, class_labels=None):
        return self.inner(x, sigma)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "epd"])
def test_every_sampler_refuses_conditioning_of_another_batch_size(solver):
    from epd_solver.sampling import sample

    model, params = _Labelled(), EPDParams.load(SHIPPED)
    knobs = {"params": params} if solver == "epd" else {}
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    with pytest.raises(ValueError, match="'class_labels' has shape \\(3,\\).*batch size 2"):
        sample(model, x, params.sigmas, solver, extra_args={"class_labels": torch.zeros(3)}, **knobs)
    ok, _ = sample(model, x, params.sigmas, solver, extra_args={"class_labels": torch.zeros(2)}, **knobs)
    one, _ = sample(model, x, params.sigmas, solver, extra_args={"class_labels": torch.zeros(1)}, **knobs)
    assert torch.equal(ok, one) and torch.isfinite(ok).all()


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_bool_options_take_only_bools(value):
    from epd_solver.sampling import sample

    gmm, grid = digits_mixture(), time_uniform(4)
    x = 80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    with pytest.raises(TypeError, match=f"option afs must be True or False, got {value!r}"):
        sample(gmm, x, grid, "euler", afs=value)
    with pytest.raises(TypeError, match="option thresholding must be True or False"):
        sample(gmm, x, grid, "dpmpp_3m", thresholding=value)
    plain, _ = sample(gmm, x, grid, "euler", afs=False)
    first, _ = sample(gmm, x, grid, "euler", afs=True)
    assert not torch.equal(plain, first)  # afs really switches the first step


def test_float16_with_a_learned_solver_names_the_dtype():
    gmm, params = digits_mixture(), EPDParams.load(SHIPPED)
    x = (80 * torch.randn(2, 64, generator=torch.Generator().manual_seed(3))).half()
    with pytest.raises(ParamsMismatchError, match="float32 or float64: torch.float16 cannot hold the distilled "
                                                  "sigma grid"):
        sample_epd(gmm, x, params.sigmas, params)
    with pytest.raises(ParamsMismatchError, match="torch.bfloat16"):
        sample_epd(gmm, x.bfloat16(), params.sigmas, params)
    # float32 with the same noise: the grid fits and the run is finite
    assert torch.isfinite(sample_epd(gmm, x.float(), params.sigmas.float(), params)).all()


def test_a_plugin_file_without_its_order_is_refused(tmp_path):
    from epd_solver.epd import EPDTables

    grid = time_uniform(5)
    tables = EPDTables(4, 2, "official", 0.05, 0.1, init="randn", seed=3, sigmas=grid)
    blob = EPDParams.from_tables(tables, sigmas=grid, afs=True, solver="epd_plugin", plugin_order=2).save(
        tmp_path / "plug.safetensors").read_bytes()
    assert load_bytes(tmp_path, blob, "ok.safetensors").plugin_order == 2
    meta = fuzz.epd_header(blob)
    meta["plugin_order"] = None  # would load as the default order 3, not the 2 it was trained with
    refused(tmp_path, fuzz.with_meta(meta, blob), "needs plugin_order in the metadata")


def test_model_id_check_leaves_the_guidance_scale_to_its_own_check():
    from epd_solver.denoisers import CFGDenoiser
    from epd_solver.epd.sampler import check_model_fit
    from epd_solver.problems import get_problem

    model = get_problem("gmm:digits-cond")
    params = EPDParams.load(SHIPPED)
    params.meta["model_id"] = f"{model.name}+cfg2"
    uncond = {"class_labels": torch.tensor([model.null_label])}
    check_model_fit(params, CFGDenoiser(model, 3.0, uncond))  # same model, another scale: passes
    params.meta["model_id"] = "another-model+cfg3"
    with pytest.raises(ParamsMismatchError, match="distilled for model 'another-model\\+cfg3'"):
        check_model_fit(params, CFGDenoiser(model, 3.0, uncond))
