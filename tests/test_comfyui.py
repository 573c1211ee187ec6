"""The node pack (comfyui/epd_solver_nodes) inside the real ComfyUI: ../shared/vendor/ComfyUI, or the checkout
named by COMFYUI_PATH. A tiny SD1.5-style BaseModel in a ModelPatcher on CPU; nothing is downloaded."""

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import shared_path

from epd_solver import EPDParams, sample_epd
from epd_solver.denoisers import BranchMaskError, repeat_cond

PACK = Path(__file__).resolve().parents[1] / "comfyui" / "epd_solver_nodes"
B = 2


def _comfy_root() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"])
    try:
        return shared_path("vendor", "ComfyUI")
    except pytest.skip.Exception as e:
        pytest.skip(f"{e.msg}; or set COMFYUI_PATH to a ComfyUI checkout")


def _placeholder_torchvision() -> None:
    """torchvision's registry build does not import beside this torch; ComfyUI uses it only in model families
    this test never builds (cosmos, cascade, ace), so those imports get an empty module."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        tr.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
        tv.transforms = tr
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr})


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = _comfy_root()
    sys.path.insert(0, str(root))
    _placeholder_torchvision()
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)
    finally:
        sys.argv = argv
    import comfy.model_base
    import comfy.model_patcher
    import comfy.samplers
    import comfy.supported_models
    import comfy_extras.nodes_custom_sampler as ncs
    import folder_paths

    base = tmp_path_factory.mktemp("comfy")
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.models_dir = str(base / "models")
    folder_paths.folder_names_and_paths.pop("epd_solver", None)
    pack = _load_pack()
    ns = types.SimpleNamespace(comfy=comfy, ncs=ncs, folder_paths=folder_paths, pack=pack,
                               mappings=pack.NODE_CLASS_MAPPINGS)
    ns.patcher, ns.rows = _tiny_sd15(comfy)
    return ns


def _load_pack():
    """Import the folder as ComfyUI's nodes.load_custom_node does (a module from its __init__.py, named by its
    path); ComfyUI's nodes.py itself needs PyAV, absent here."""
    spec = importlib.util.spec_from_file_location(str(PACK).replace(".", "_x_"), PACK / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_sd15(comfy):
    unet = {"use_checkpoint": False, "image_size": 8, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
            "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32,
            "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
    config = comfy.supported_models.SD15(unet)
    config.unet_config["num_heads"] = 2
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI skips weight initialisation
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6 / max(1, p[0].numel()) ** 0.5)
    model.diffusion_model.float()
    rows = []
    model.diffusion_model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu")), rows


def _cond(seed, rows=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(rows, 4, 32, generator=g), {"pooled_output": None}]]


def _table(sigmas, k, solver="epd", seed=0):
    """A valid, non-trivial table for a grid (values drawn, not distilled)."""
    g = torch.Generator().manual_seed(seed)
    n = sigmas.numel() - 1
    r = torch.rand(n, k, generator=g, dtype=torch.float64)
    w = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.5
    c = 1 + 0.04 * (torch.rand(n, k, generator=g, dtype=torch.float64) - 0.5)
    a = 1 + 0.04 * (torch.rand(n, k, generator=g, dtype=torch.float64) - 0.5)
    plugin = 3 if solver == "epd_plugin" else (4 if solver == "amed_plugin" else None)
    return EPDParams.from_values(r, w / w.sum(1, keepdim=True), c, a, sigmas=sigmas, afs=False, solver=solver,
                                 plugin_order=plugin, scale_dir=0.05, scale_time=0.05)


def _model_grid(ns, steps):
    ms = ns.patcher.get_model_object("model_sampling")
    return ns.comfy.samplers.calculate_sigmas(ms, "karras", steps + 1)[:-1].double()  # steps + 1 points


def _save(ns, params, name):
    folder = Path(ns.folder_paths.get_folder_paths("epd_solver")[0])
    folder.mkdir(parents=True, exist_ok=True)
    params.save(folder / name, overwrite=True)
    return name


class _Fixed:  # ComfyUI's NOISE contract
    def __init__(self, noise, seed=7):
        self.noise, self.seed = noise, seed

    def generate_noise(self, latent):
        return self.noise.clone()


def _run(ns, sampler, sigmas, cfg, noise, latent=None, positive=None):
    guider = ns.ncs.CFGGuider().get_guider(ns.patcher, positive or _cond(1), _cond(2), cfg)[0]
    latent = {"samples": torch.zeros_like(noise) if latent is None else latent}
    out, _ = ns.ncs.SamplerCustomAdvanced().sample(_Fixed(noise), guider, sampler, sigmas, latent)
    return out["samples"]


def _reference_sampler(ns, params, strategy):
    """The library's own EPD on the same ComfyUI model wrapper, ComfyUI's extra_args bound outside the library."""
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        host = dict(extra_args)
        # a plain lambda has no model id: the table's (ComfyUI's model sampling) is checked by the node itself
        return sample_epd(lambda xb, s: model(xb, s, **host), x, sigmas, params, strategy=strategy,
                          allow_other_model=True)
    return ns.comfy.samplers.KSAMPLER(fn)


def test_node_contract(comfy):
    m = comfy.mappings
    for name, returns in (("EPDSampler", ("SAMPLER",)), ("EPDSigmas", ("SIGMAS",)), ("EPDDistill", ("STRING", "STRING"))):
        cls = m[name]
        assert cls.RETURN_TYPES == returns
        assert cls.CATEGORY == "sampling/custom_sampling/epd_solver"
        assert callable(getattr(cls(), cls.FUNCTION))
        assert comfy.pack.NODE_DISPLAY_NAME_MAPPINGS[name] == {"EPDSampler": "EPD Sampler", "EPDSigmas": "EPD Sigmas",
                                                                "EPDDistill": "EPD Distill"}[name]
    req = m["EPDSampler"].INPUT_TYPES()
    assert req["required"]["model"] == ("MODEL",) and req["optional"]["sigmas"] == ("SIGMAS",)
    dreq = m["EPDDistill"].INPUT_TYPES()["required"]
    assert {"model", "positive", "negative", "cfg", "latent_image", "nfe", "trajectories"} <= set(dreq)
    assert dreq["positive"] == ("CONDITIONING",) and dreq["latent_image"] == ("LATENT",)
    assert m["EPDDistill"].OUTPUT_NODE is True


def test_rule_with_comfyui_extra_args(comfy):
    """ComfyUI's real extra_args: model_options (nested, with per-step tensors), seed, denoise_mask."""
    seen = {}

    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen.update(extra_args)
        return x

    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    _run(comfy, comfy.comfy.samplers.KSAMPLER(fn), _model_grid(comfy, 3).float(), 4.0, noise)
    assert set(seen) == {"model_options", "seed", "denoise_mask"}
    assert seen["model_options"]["transformer_options"]["sample_sigmas"].shape == (4,)
    out = repeat_cond(dict(seen, emb=torch.arange(B)), 3, B)
    assert out["model_options"] is seen["model_options"] and out["seed"] == seen["seed"]
    assert out["emb"].tolist() == [0, 1] * 3
    mask = torch.ones(B, 1, 8, 8)
    assert repeat_cond(dict(seen, denoise_mask=mask), 1, B)["denoise_mask"] is mask
    with pytest.raises(BranchMaskError, match="strategy='sequential'"):
        repeat_cond(dict(seen, denoise_mask=mask), 2, B)


@pytest.mark.parametrize("cfg,k", [(1.0, 2), (4.0, 2), (1.0, 3), (4.0, 3)])
def test_epd_sampler_equals_library(comfy, cfg, k):
    grid = _model_grid(comfy, 3)
    name = _save(comfy, _table(grid, k, seed=k), f"t_k{k}.safetensors")
    sigmas = comfy.mappings["EPDSigmas"]().get_sigmas(comfy.patcher, name)[0]
    sampler = comfy.mappings["EPDSampler"]().get_sampler(comfy.patcher, name, sigmas)[0]
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(k))
    comfy.rows.clear()
    got = _run(comfy, sampler, sigmas, cfg, noise)
    rows = list(comfy.rows)
    params = EPDParams.load(Path(comfy.folder_paths.get_folder_paths("epd_solver")[0]) / name)
    ref_b = _run(comfy, _reference_sampler(comfy, params, "batched"), sigmas, cfg, noise)
    ref_s = _run(comfy, _reference_sampler(comfy, params, "sequential"), sigmas, cfg, noise)
    cfg_rows = 1 if cfg == 1 else 2  # ComfyUI skips the uncond rows at cfg 1
    assert rows == [cfg_rows * B, cfg_rows * B * k] * 3 + [cfg_rows * B]  # 3 steps + final denoise at sigma -> 0
    for ref in (ref_b, ref_s):
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-5, rel
    assert (got - noise * sigmas[0]).abs().max() > 0.1  # it sampled


@pytest.mark.parametrize("solver,k", [("epd_plugin", 2), ("amed", 1), ("amed_plugin", 1)])
def test_other_solver_kinds(comfy, solver, k):
    grid = _model_grid(comfy, 3)
    name = _save(comfy, _table(grid, k, solver, seed=5), f"t_{solver}.safetensors")
    sigmas = comfy.mappings["EPDSigmas"]().get_sigmas(comfy.patcher, name)[0]
    sampler = comfy.mappings["EPDSampler"]().get_sampler(comfy.patcher, name, sigmas)[0]
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = _run(comfy, sampler, sigmas, 4.0, noise)
    params = EPDParams.load(Path(comfy.folder_paths.get_folder_paths("epd_solver")[0]) / name)
    ref = _run(comfy, _reference_sampler(comfy, params, "sequential"), sigmas, 4.0, noise)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_inpainting_mask_as_comfyui(comfy):
    """With a denoise_mask the branches run as K calls of B rows; the kept region ends on the latent exactly as
    under ComfyUI's own euler."""
    grid = _model_grid(comfy, 3)
    name = _save(comfy, _table(grid, 2, seed=9), "t_mask.safetensors")
    sigmas = comfy.mappings["EPDSigmas"]().get_sigmas(comfy.patcher, name)[0]
    sampler = comfy.mappings["EPDSampler"]().get_sampler(comfy.patcher, name, sigmas)[0]
    g = torch.Generator().manual_seed(4)
    noise, latent = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    mask = torch.zeros(B, 1, 8, 8)
    mask[:, :, :, 4:] = 1
    guider = comfy.ncs.CFGGuider().get_guider(comfy.patcher, _cond(1), _cond(2), 4.0)[0]
    comfy.rows.clear()
    lat = {"samples": latent, "noise_mask": mask}
    got = comfy.ncs.SamplerCustomAdvanced().sample(_Fixed(noise), guider, sampler, sigmas, lat)[0]["samples"]
    assert max(comfy.rows) == 2 * B  # never B*K rows
    euler = comfy.ncs.SamplerCustomAdvanced().sample(_Fixed(noise), guider, comfy.comfy.samplers.sampler_object(
        "euler"), sigmas, lat)[0]["samples"]
    assert torch.allclose(got[..., :4], latent[..., :4], atol=1e-6)
    assert torch.allclose(euler[..., :4], latent[..., :4], atol=1e-6)
    assert (got[..., 4:] - latent[..., 4:]).abs().max() > 0.1


def test_mismatched_tables_fail_in_the_node(comfy):
    grid = _model_grid(comfy, 3)
    edm = torch.tensor([80.0, 10.0, 1.0, 0.002], dtype=torch.float64)  # another sigma range (EDM)
    other = _save(comfy, _table(edm, 2), "t_edm.safetensors")
    good = _save(comfy, _table(grid, 2), "t_good.safetensors")
    sampler_node, sigmas_node = comfy.mappings["EPDSampler"](), comfy.mappings["EPDSigmas"]()
    with pytest.raises(ValueError, match="sigma range mismatch.*80"):
        sampler_node.get_sampler(comfy.patcher, other)
    with pytest.raises(ValueError, match="sigma range mismatch"):
        sigmas_node.get_sigmas(comfy.patcher, other)
    five = torch.cat([_model_grid(comfy, 5), torch.zeros(1, dtype=torch.float64)]).float()
    with pytest.raises(ValueError, match="step count mismatch: the table has 3 steps.*SIGMAS has 5 steps"):
        sampler_node.get_sampler(comfy.patcher, good, five)
    # the grid only at sampling time (SIGMAS not wired into the node): the sampler refuses before any model call
    sampler = sampler_node.get_sampler(comfy.patcher, good)[0]
    comfy.rows.clear()
    with pytest.raises(ValueError, match="sigma grid mismatch"):
        _run(comfy, sampler, five, 4.0, torch.randn(B, 4, 8, 8))
    assert comfy.rows == []
    with pytest.raises(ValueError, match="no parameter file 'missing.safetensors'"):
        sampler_node.get_sampler(comfy.patcher, "missing.safetensors")
    vpred = _table(grid, 2)
    vpred.meta["comfyui"] = {"model_sampling": "ModelSamplingDiscrete/V_PREDICTION"}  # same sigma range, SD2-v
    with pytest.raises(ValueError, match="model family mismatch.*V_PREDICTION.*ModelSamplingDiscrete/EPS"):
        sampler_node.get_sampler(comfy.patcher, _save(comfy, vpred, "t_vpred.safetensors"))
    import comfy.model_sampling as cms

    class Flow(cms.ModelSamplingDiscreteFlow, cms.CONST):  # what ComfyUI builds for SD3-style models
        pass

    flow_table = _table(torch.tensor([1.0, 0.3, 0.05, 0.005], dtype=torch.float64), 2)
    flow_table.afs = True
    with pytest.raises(ValueError, match="AFS.*flow-matching"):
        comfy.pack.bridge.check_against_model(flow_table, Flow())
    flow_table.afs = False
    comfy.pack.bridge.check_against_model(flow_table, Flow())


def test_distill_node_refuses_bad_settings_before_work(comfy, tmp_path):
    node = comfy.mappings["EPDDistill"]()
    comfy.rows.clear()
    args = (comfy.patcher, _cond(1), _cond(2), 4.0, {"samples": torch.zeros(1, 4, 4, 4)}, "epd", 6, "default", 8, 0)
    for prefix, options, message in (("ok", '{"k": ', "options must be a JSON object"),
                                     ("ok", '{"no_such_setting": 1}', "distillation settings rejected"),
                                     ("../up", "{}", "filename_prefix must be a plain file name")):
        with pytest.raises(ValueError, match=message):
            node.distill(*args, prefix, "output", options)
    assert comfy.rows == []
    out = Path(comfy.folder_paths.get_output_directory()) / "epd_solver"
    assert not out.exists() or not any(out.glob("ok_*"))


@pytest.mark.parametrize("k", [1, 2])
def test_midpoint_table_equals_comfyui_dpm_2(comfy, k):
    """An independent reference: with every branch at the geometric midpoint (r = 1/2, weights 1/K, c = a = 1)
    EPD is the midpoint rule ComfyUI's own dpm_2 sampler runs (its midpoint is the geometric mean of sigma and
    sigma_next); the final step to sigma 0 is an Euler step in both."""
    grid = _model_grid(comfy, 3)
    half = torch.full((3, k), 0.5, dtype=torch.float64)
    name = _save(comfy, EPDParams.from_values(half, torch.full((3, k), 1.0 / k, dtype=torch.float64), sigmas=grid),
                 f"t_mid{k}.safetensors")
    sigmas = comfy.mappings["EPDSigmas"]().get_sigmas(comfy.patcher, name)[0]
    sampler = comfy.mappings["EPDSampler"]().get_sampler(comfy.patcher, name, sigmas)[0]
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    comfy.rows.clear()
    got = _run(comfy, sampler, sigmas, 4.0, noise)
    assert max(comfy.rows) == 2 * B * k
    ref = _run(comfy, comfy.comfy.samplers.sampler_object("dpm_2"), sigmas, 4.0, noise)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5


DISTILL_OPTIONS = '{"schedule": "polynomial", "schedule_kwargs": {"rho": 7.0}, "teacher_points": 3, "select_noises": 0, "init": "deterministic", ' \
                  '"val_trajectories": 16, "batch": 16, "lbfgs_rounds": 2, "lbfgs_iterations": 10, "afs": false}'


def test_untrained_lw_table_equals_comfyui_ipndm(comfy):
    """An independent reference: the learned-weights table at its init (iPNDM's coefficients, time scale 1) is
    iPNDM, which ComfyUI ships as its own "ipndm" sampler (its last step to sigma 0 returns D, as the EPD Sampler
    does)."""
    from epd_solver.epd import LWTables

    grid = _model_grid(comfy, 5)
    table = EPDParams.from_tables(LWTables(5), sigmas=grid, afs=False, solver="lw", plugin_order=4)
    name = _save(comfy, table, "t_lw.safetensors")
    sigmas = comfy.mappings["EPDSigmas"]().get_sigmas(comfy.patcher, name)[0]
    sampler = comfy.mappings["EPDSampler"]().get_sampler(comfy.patcher, name, sigmas)[0]
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    comfy.rows.clear()
    got = _run(comfy, sampler, sigmas, 4.0, noise)
    assert max(comfy.rows) == 2 * B  # one evaluation per step (the CFG pair in one call)
    ref = _run(comfy, comfy.comfy.samplers.sampler_object("ipndm"), sigmas, 4.0, noise)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_epd_distill_node(comfy):
    """Distils for the tiny model under CFG 4 inside ComfyUI's inference mode (as ComfyUI runs nodes); the file
    validates, beats the best training-free solver on the held-out noises and then drives the EPD Sampler."""
    node = comfy.mappings["EPDDistill"]()
    taken = Path(comfy.folder_paths.get_folder_paths("epd_solver")[0]) / _save(
        comfy, _table(_model_grid(comfy, 3), 2), "tiny_epd_nfe6_00001.safetensors")
    before = taken.read_bytes()
    progress = []
    comfy.comfy.utils.set_progress_bar_global_hook(lambda v, total, preview, node_id=None: progress.append((v, total)))
    try:
        with torch.inference_mode():
            positive, negative = _cond(1), _cond(2)
            latent = {"samples": torch.zeros(1, 4, 4, 4)}
            out = node.distill(comfy.patcher, positive, negative, 4.0, latent, "epd", 6, "default", 16, 0, "tiny",
                               "models", DISTILL_OPTIONS)
    finally:
        comfy.comfy.utils.set_progress_bar_global_hook(None)
    name, report = out["result"]
    assert name == "tiny_epd_nfe6_00002.safetensors"
    path = Path(comfy.folder_paths.get_folder_paths("epd_solver")[0]) / name
    params = EPDParams.load(path)  # the library validates the file
    v = params.meta["validation"]
    assert v["better"] and v["student_rmse"] < v["baseline_rmse"], report
    assert "better" in report and params.meta["comfyui"]["cfg"] == 4.0
    assert params.meta["comfyui"]["model_sampling"] == "ModelSamplingDiscrete/EPS"
    assert progress and progress[-1] == (20, 20)
    assert name in comfy.mappings["EPDSampler"].INPUT_TYPES()["required"]["params_name"][0]
    sigmas = comfy.mappings["EPDSigmas"]().get_sigmas(comfy.patcher, name)[0]
    assert torch.equal(sigmas[:-1].double(), params.sigmas.float().double()) and sigmas[-1] == 0
    sampler = comfy.mappings["EPDSampler"]().get_sampler(comfy.patcher, name, sigmas)[0]
    noise = torch.randn(B, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    got = _run(comfy, sampler, sigmas, 4.0, noise)
    ref = _run(comfy, _reference_sampler(comfy, params, "sequential"), sigmas, 4.0, noise)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert taken.read_bytes() == before  # never overwritten: the node took the next number


def test_timestep_range_conditioning_runs_b_rows(comfy):
    """ComfyUI judges timestep_start/end on a call's first row, so with timestep-range conditioning (what
    ConditioningSetTimestepRange makes) the branches run as K calls of B rows, as ComfyUI's own samplers call."""
    import node_helpers

    early = node_helpers.conditioning_set_values(_cond(1), {"start_percent": 0.0, "end_percent": 0.5})
    late = node_helpers.conditioning_set_values(_cond(3), {"start_percent": 0.5, "end_percent": 1.0})
    grid = _model_grid(comfy, 3)
    name = _save(comfy, _table(grid, 3, seed=2), "t_range.safetensors")
    sigmas = comfy.mappings["EPDSigmas"]().get_sigmas(comfy.patcher, name)[0]
    sampler = comfy.mappings["EPDSampler"]().get_sampler(comfy.patcher, name, sigmas)[0]
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    comfy.rows.clear()
    got = _run(comfy, sampler, sigmas, 4.0, noise, positive=early + late)
    assert max(comfy.rows) <= 2 * B
    params = EPDParams.load(Path(comfy.folder_paths.get_folder_paths("epd_solver")[0]) / name)
    ref = _run(comfy, _reference_sampler(comfy, params, "sequential"), sigmas, 4.0, noise, positive=early + late)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    plain = _run(comfy, sampler, sigmas, 4.0, noise, positive=_cond(1))
    assert (plain - got).abs().max() > 1e-3  # the ranges took effect
