"""Batched diffusers adapter: EPD batched = sequential, baselines = diffusers' own schedulers, row counts, loading.

Tiny random models built from configs (seed 0 before each, as diffusers' own tests do); nothing downloads.
Errors are relative: max |ours - reference| / max |reference|.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2DiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel,
                       UniPCMultistepScheduler)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from epd_solver.epd.params import EPDParams, ParamsMismatchError  # noqa: E402
from epd_solver.integrations import diffusers as epd_diffusers  # noqa: E402
from epd_solver.integrations.diffusers import (DiffusersModelError, default_sigmas, diffusers_denoiser,  # noqa: E402
                                               load_diffusers_model, sample)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
R = [[0.2, 0.7], [0.35, 0.8], [0.1, 0.5]]
LAM = [[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]
C = [[1.02, 0.97], [0.99, 1.01], [1.0, 1.03]]
A = [[0.97, 1.02], [1.03, 0.98], [0.96, 1.01]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


def table(grid: torch.Tensor) -> EPDParams:
    """A K = 2, 3-step table with every factor away from its neutral value."""
    return EPDParams.from_values(R, LAM, C, A, sigmas=grid)


# -- tiny models (sizes of diffusers' own tests) ------------------------------------------------------------
def tiny_unet2d() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, sample_size=16,
                       in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def tiny_sd_pipe(scheduler=None) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=64,
                                                layer_norm_eps=1e-05, num_attention_heads=8, num_hidden_layers=3,
                                                pad_token_id=1, vocab_size=1000))
    scheduler = scheduler or DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD_BETAS)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_embeddings(pipe, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt / negative embeddings from the tiny CLIP text encoder on random token ids (no tokenizer)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (2 * batch, 8), generator=g)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    return emb[:batch], emb[batch:]


def tiny_sd3_pipe(scheduler=None) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(
        shift=3.0), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_embeddings(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"prompt_embeds": torch.randn(batch, 8, 32, generator=g),
            "negative_prompt_embeds": torch.randn(batch, 8, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 64, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(batch, 64, generator=g)}


# -- EPD: batched adapter = sequential branches ---------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_epd_batched_equals_sequential_unet2d(prediction_type):
    unet, sched = tiny_unet2d(), DDPMScheduler(prediction_type=prediction_type)
    params = table(default_sigmas(diffusers_denoiser(unet, sched), 3))
    runs = [sample(unet, scheduler=sched, params=params, batch_size=2, strategy=s, output_type="latent",
                   generator=torch.Generator().manual_seed(0)) for s in ("batched", "sequential")]
    assert rel_err(runs[0].latents, runs[1].latents) <= 1e-5
    assert runs[0].info.nfe.para_nfe == 6 and runs[0].info.nfe.evaluations == 9  # 2 rounds, 1 + K calls per step


def test_epd_batched_equals_sequential_sd_with_cfg():
    pipe = tiny_sd_pipe()
    pe, ne = sd_embeddings(pipe, 2)
    params = table(default_sigmas(diffusers_denoiser(pipe), 3))
    runs = [sample(pipe, params=params, prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=3.0, height=16,
                   width=16, strategy=s, output_type="latent", generator=torch.Generator().manual_seed(0))
            for s in ("batched", "sequential")]
    assert runs[0].latents.shape == (2, 4, 8, 8)
    assert rel_err(runs[0].latents, runs[1].latents) <= 1e-5
    assert runs[0].info.nfe.cfg_multiplier == 2


def test_epd_batched_equals_sequential_sd3_with_cfg():
    pipe = tiny_sd3_pipe()
    params = table(default_sigmas(diffusers_denoiser(pipe), 3, pipe.scheduler))
    runs = [sample(pipe, params=params, guidance_scale=4.0, height=8, width=8, strategy=s, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **sd3_embeddings(2)) for s in ("batched", "sequential")]
    assert runs[0].latents.shape == (2, 4, 8, 8)
    assert rel_err(runs[0].latents, runs[1].latents) <= 1e-5


def test_one_network_call_per_round_with_2BK_rows():
    """B = 2, K = 2, CFG: the base round sees 2B rows, the branch round 2BK rows, one call each."""
    pipe = tiny_sd_pipe()
    pe, ne = sd_embeddings(pipe, 2)
    rows = []
    forward = pipe.unet.forward

    def counting_forward(sample, *args, **kwargs):
        rows.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = counting_forward
    params = table(default_sigmas(diffusers_denoiser(pipe), 3))
    sample(pipe, params=params, prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=3.0, height=16, width=16,
           output_type="latent", generator=torch.Generator().manual_seed(0))
    assert rows == [2 * 2, 2 * 2 * 2] * 3


def test_per_sample_negative_prompts_are_tiled_with_the_branches():
    """B different negative embeddings: each sample keeps its own through the B*K-row branch call."""
    pipe = tiny_sd_pipe()
    pe, ne = sd_embeddings(pipe, 2)
    params = table(default_sigmas(diffusers_denoiser(pipe), 3))
    kw = dict(params=params, guidance_scale=3.0, height=16, width=16, output_type="latent")
    both = sample(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(0), **kw)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for j in range(2):
        one = sample(pipe, prompt_embeds=pe[j:j + 1], negative_prompt_embeds=ne[j:j + 1], latents=z[j:j + 1], **kw)
        assert rel_err(both.latents[j:j + 1], one.latents) <= 1e-5


# -- baselines through the adapter = diffusers' schedulers ------------------------------------------------------
def run_diffusers_loop(unet, scheduler, steps: int, z: torch.Tensor) -> torch.Tensor:
    """The reference: a plain diffusers sampling loop (scale_model_input, model, step)."""
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x).prev_sample
    return x


def scheduler_grid(scheduler, steps: int) -> torch.Tensor:
    """sigma_n = sqrt((1 - abar_n)/abar_n) in float64 at the scheduler's step-boundary integer timesteps, then 0."""
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()[scheduler.timesteps[:: scheduler.order].long()]
    return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])


TRAILING = dict(timestep_spacing="trailing", **SD_BETAS)


@pytest.mark.parametrize("solver, scheduler, options, quantize", [
    ("euler", EulerDiscreteScheduler(**TRAILING), {}, True),
    ("euler", EulerDiscreteScheduler(timestep_spacing="leading", prediction_type="v_prediction", **SD_BETAS), {}, True),
    ("euler", DDIMScheduler(prediction_type="epsilon", clip_sample=False), {}, True),
    ("euler", DDIMScheduler(prediction_type="v_prediction", clip_sample=False), {}, True),
    ("euler", DDIMScheduler(prediction_type="sample", clip_sample=False), {}, True),
    ("heun", HeunDiscreteScheduler(**TRAILING), {}, True),
    ("dpm_2", KDPM2DiscreteScheduler(**TRAILING), {}, False),  # midpoints at fractional t, log-sigma interpolation
    ("dpmpp_2m", DPMSolverMultistepScheduler(**SD_BETAS), {"lower_order_final": False}, True),
    ("dpmpp_2m", DPMSolverMultistepScheduler(prediction_type="v_prediction"), {"lower_order_final": False}, True),
    ("unipc", UniPCMultistepScheduler(**SD_BETAS), {"max_order": 2, "lower_order_final": False}, True),
], ids=["euler-trailing", "euler-leading-v", "ddim-eps", "ddim-v", "ddim-sample", "heun", "kdpm2", "dpmpp2m",
        "dpmpp2m-v", "unipc-bh2"])
def test_baseline_through_adapter_matches_diffusers_scheduler(solver, scheduler, options, quantize):
    """Same UNet, same sigmas (the scheduler's boundary timesteps, final sigma 0), same start: the adapter + core
    sampler reproduce diffusers' scheduler loop to float32 rounding (measured 1e-7 .. 5e-7).

    Conventions: integer-timestep schedulers get ``quantize=True``; KDPM2's fractional midpoint timesteps use the
    adapter's default log-sigma index interpolation (rounding them instead is off by ~1e-3). diffusers lowers only
    the order of its final step to sigma = 0, which the core samplers take as x <- D(x), hence
    ``lower_order_final=False``; diffusers' UniPC default is order 2 (``max_order=2``).
    """
    unet, steps = tiny_unet2d(), 3
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = run_diffusers_loop(unet, scheduler, steps, z)
    grid = scheduler_grid(scheduler, steps)
    start = z * scheduler.init_noise_sigma  # VP-coordinate schedulers start at z = x / sqrt(1 + sigma_0^2)
    if scheduler.init_noise_sigma == 1.0:
        start = z * (1 + grid[0] ** 2).sqrt()
    run = dict(scheduler=scheduler, solver=solver, sigmas=grid, latents=start / float(grid[0]), output_type="latent",
               solver_options=options)
    assert rel_err(sample(unet, quantize=quantize, **run).latents, ref) <= 2e-6
    if solver == "dpm_2":
        assert rel_err(sample(unet, quantize=True, **run).latents, ref) > 1e-4


# -- errors, defaults, loading -------------------------------------------------------------------------------
def test_default_sigmas_follow_the_spec():
    """VP: discrete rho = 1 (indices 999, 666, 333, 0 for SD); flow: the FlowMatch scheduler's grid."""
    sd = diffusers_denoiser(tiny_unet2d(), DDPMScheduler(**SD_BETAS))
    torch.testing.assert_close(default_sigmas(sd, 3), torch.tensor([14.61, 2.918, 0.932, 0.0292], dtype=torch.float64),
                               rtol=2e-3, atol=0)
    pipe = tiny_sd3_pipe()
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(4)
    torch.testing.assert_close(default_sigmas(diffusers_denoiser(pipe), 3, pipe.scheduler), fm.sigmas[:-1].double())


def test_named_errors():
    unet, sched = tiny_unet2d(), DDPMScheduler()
    with pytest.raises(DiffusersModelError, match="alphas_cumprod"):
        diffusers_denoiser(unet)
    grid = default_sigmas(diffusers_denoiser(unet, sched), 3)
    params = table(grid)
    with pytest.raises(ParamsMismatchError, match="steps"):
        sample(unet, scheduler=sched, params=params, num_inference_steps=4, output_type="latent")
    with pytest.raises(ParamsMismatchError, match="K = 2"):
        sample(unet, scheduler=sched, params=params, k=3, output_type="latent")
    with pytest.raises(ParamsMismatchError, match="grid"):
        sample(unet, scheduler=sched, params=params, sigmas=default_sigmas(diffusers_denoiser(unet, sched), 4)[:4] * 0.9,
               output_type="latent")
    with pytest.raises(DiffusersModelError, match="learned"):
        sample(unet, scheduler=sched, solver="epd", num_inference_steps=3)
    pipe = tiny_sd_pipe()
    pe, _ = sd_embeddings(pipe, 1)
    with pytest.raises(DiffusersModelError, match="negative_prompt_embeds"):
        sample(pipe, solver="euler", num_inference_steps=2, prompt_embeds=pe, guidance_scale=3.0)


def test_params_timestep_rule_is_enforced():
    unet, sched = tiny_unet2d(), DDPMScheduler()
    grid = default_sigmas(diffusers_denoiser(unet, sched), 3)
    params = EPDParams.from_values(R, LAM, C, A, sigmas=grid, timestep_type="nearest")
    with pytest.raises(ParamsMismatchError, match="nearest"):
        sample(unet, scheduler=sched, params=params, quantize=False, output_type="latent")
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = sample(unet, scheduler=sched, params=params, latents=z, output_type="latent").latents
    b = sample(unet, scheduler=sched, params=EPDParams.from_values(R, LAM, C, A, sigmas=grid), quantize=True,
               latents=z, output_type="latent").latents
    assert torch.equal(a, b)


def test_load_local_folders(tmp_path):
    """A model folder with its scheduler beside it, and a saved pipeline, load into the same denoiser."""
    unet, sched = tiny_unet2d(), DDPMScheduler(prediction_type="v_prediction")
    ref = diffusers_denoiser(unet, sched)
    unet.save_pretrained(tmp_path / "model" / "unet")
    sched.save_pretrained(tmp_path / "model" / "scheduler")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([3.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        want = ref(x, sigma)
        for path in (tmp_path / "model" / "unet", tmp_path / "model", tmp_path / "pipe"):
            den = load_diffusers_model(path)
            assert den.kind == "vp_v" and den.shape == (3, 16, 16)
            loaded = den.net.model.state_dict()
            assert loaded.keys() == unet.state_dict().keys()
            assert all(torch.equal(v, loaded[k]) for k, v in unet.state_dict().items()), path  # the same weights
            # the same function: two model instances need not give the same bits (MKL's AVX2 kernels depend on
            # the buffers' alignment: 2.7e-7 apart there), so float32 rounding is allowed, nothing more
            torch.testing.assert_close(den(x, sigma), want, rtol=1e-6, atol=1e-6, msg=str(path))
    assert load_diffusers_model(tmp_path / "pipe").pipeline is not None
    sd3 = tiny_sd3_pipe()
    sd3.transformer.save_pretrained(tmp_path / "sd3" / "transformer")
    sd3.scheduler.save_pretrained(tmp_path / "sd3" / "scheduler")
    flow = load_diffusers_model(tmp_path / "sd3")
    g = torch.Generator().manual_seed(4)
    cond = {k: torch.randn(*shape, generator=g, dtype=torch.float64)
            for k, shape in (("encoder_hidden_states", (2, 8, 32)), ("pooled_projections", (2, 64)))}
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.2], dtype=torch.float64)
    with torch.no_grad():
        assert flow.kind == "flow"
        assert all(torch.equal(v, flow.net.model.state_dict()[k]) for k, v in sd3.transformer.state_dict().items())
        torch.testing.assert_close(flow(x, sigma, **cond), diffusers_denoiser(sd3)(x, sigma, **cond),
                                   rtol=1e-6, atol=1e-6)
        v = sd3.transformer(hidden_states=x.float(), timestep=sigma.float() * 1000, return_dict=False,
                            **{k: c.float() for k, c in cond.items()})[0]
    torch.testing.assert_close(flow(x, sigma, **cond), x - sigma.view(-1, 1, 1, 1) * v.double())  # D = x - sigma v
    with pytest.raises(DiffusersModelError, match="model_index.json"):
        load_diffusers_model(tmp_path / "model" / "scheduler")
    with pytest.raises(FileNotFoundError):
        load_diffusers_model(tmp_path / "missing")


def module_level_imports(tree) -> list[str]:
    """Names imported when a module is imported (imports inside functions run only when called)."""
    import ast

    names, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names += [node.module or ""] + [a.name for a in node.names]
        else:
            todo += list(ast.iter_child_nodes(node))
    return names


def test_module_is_optional():
    """diffusers stays optional: outside the two integration modules no module of the package imports it at import
    time (directly or through those modules), so ``import epd_solver`` never does."""
    import ast
    from pathlib import Path

    import epd_solver

    root = Path(epd_solver.__file__).parent
    own = {root / "integrations" / "diffusers.py", root / "integrations" / "diffusers_scheduler.py"}
    offenders = [str(path.relative_to(root)) for path in sorted(root.rglob("*.py")) if path not in own
                 and any(n.split(".")[0] in ("diffusers", "diffusers_scheduler") or n.endswith(".diffusers")
                         for n in module_level_imports(ast.parse(path.read_text())))]
    assert offenders == []
    assert epd_diffusers.EPDScheduler.__name__ == "EPDScheduler"


# -- epd distill --model diffusers:DIR ----------------------------------------------------------------------
def test_distill_cli_on_a_diffusers_folder_then_sample(tmp_path):
    """A tiny random UNet2DModel + DDPMScheduler folder (epsilon) distils from the command line, and the file
    samples through ``epd sample``, the batched adapter and ``EPDScheduler`` alike.

    The grid spans [sigma_min / (1 - s_t), sigma_max / (1 + s_t)] of the scheduler's range, so every branch
    evaluation a * tau a table can learn (a in 1 +- s_t, r in [0, 1]) is one of the scheduler's noise levels;
    before, the grid spanned the whole range and training stopped at 'sigma outside the model's range'."""
    import numpy as np

    from epd_solver.cli import main
    from epd_solver.integrations.diffusers_scheduler import EPDScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, sample_size=8,
                       in_channels=1, out_channels=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    sched = DDPMScheduler()
    unet.save_pretrained(tmp_path / "m" / "unet")
    sched.save_pretrained(tmp_path / "m" / "scheduler")
    out, s_t = tmp_path / "t.safetensors", 0.05
    assert main(["distill", "--model", f"diffusers:{tmp_path / 'm'}", "--nfe", "4", "--no-afs", "--out", str(out),
                 "--trajectories", "4", "--batch", "4", "--val-trajectories", "4", "--select-noises", "0",
                 "--init", "deterministic", "--schedule", "time_uniform", "--teacher-points", "1",
                 "--optimizer", "adam", "--epochs", "2", "--lr", "0.5", "--scale-time", str(s_t), "--no-cache",
                 "--quiet", "--allow-worse"]) == 0
    params = EPDParams.load(out)
    ref = diffusers_denoiser(unet, sched)
    grid = params.sigmas
    assert float(grid[0]) == pytest.approx(ref.sigma_max / (1 + s_t), rel=1e-12)
    assert float(grid[-1]) == pytest.approx(ref.sigma_min / (1 - s_t), rel=1e-12)
    steps = params.steps
    for r in (0.0, 1.0):  # the extreme tables of the run's bounds fit the scheduler's range (it refuses otherwise)
        for a in (1 - s_t, 1 + s_t):
            full = [[r] * 2] * steps
            EPDScheduler.from_params(EPDParams.from_values(full, [[0.5, 0.5]] * steps, [[1.0, 1.0]] * steps,
                                                           [[a, a]] * steps, sigmas=grid), sched)

    assert main(["sample", "--model", f"diffusers:{tmp_path / 'm'}", "--solver", "epd", "--params", str(out),
                 "--seeds", "0-1", "--out", str(tmp_path / "s"), "--format", "npy", "--dtype", "float64",
                 "--quiet"]) == 0
    cli = torch.from_numpy(np.stack([np.load(tmp_path / "s" / f"{j:06d}.npy") for j in (0, 1)]))
    z = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
                     for j in (0, 1)])
    batched = sample(unet, scheduler=sched, params=params, latents=z, output_type="latent").latents
    assert rel_err(cli, batched) <= 1e-5
    epd_sched = EPDScheduler.from_params(params, sched)
    epd_sched.set_timesteps(steps)
    x = z.float() * epd_sched.init_noise_sigma
    with torch.no_grad():
        for t in epd_sched.timesteps:
            x = epd_sched.step(unet(epd_sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert rel_err(x, batched) <= 1e-4


def test_grid_range_insets_only_bounded_models():
    """The inset applies to discrete-time models (also under CFG), not to continuous ones; the 'paper' time offset,
    which moves a branch by a fraction of its step, is refused there by name."""
    from epd_solver.denoisers import CFGDenoiser, EDMDenoiser
    from epd_solver.distillation.model_range import grid_range

    vp = diffusers_denoiser(tiny_unet2d(), DDPMScheduler())
    lo, hi = vp.sigma_min, vp.sigma_max
    assert grid_range(vp, lo, hi, 0.1, "ordered") == (lo / 0.9, hi / 1.1)
    assert grid_range(CFGDenoiser(vp, 2.0, {}), lo, hi, 0.1, "official") == (lo / 0.9, hi / 1.1)
    assert grid_range(vp, lo, hi, 0.0, "paper") == (lo, hi)
    assert grid_range(EDMDenoiser(lambda x, s: x), 0.002, 80.0, 0.1, "paper") == (0.002, 80.0)
    with pytest.raises(ValueError, match="'paper' parameterisation"):
        grid_range(vp, lo, hi, 0.05, "paper")


def test_a_pipeline_saved_without_some_components_loads(tmp_path):
    """An SD3 folder saved without its text encoders (null in model_index.json) loads, as diffusers saved it."""
    from epd_solver.integrations.diffusers import diffusers_denoiser, load_diffusers_model

    pipe = tiny_sd3_pipe()
    pipe.save_pretrained(tmp_path / "sd3")
    den = load_diffusers_model(str(tmp_path / "sd3"))
    assert den.pipeline.text_encoder_3 is None and den.pipeline.tokenizer is None
    want = pipe.transformer.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in den.pipeline.transformer.state_dict().items())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.3])
    e = sd3_embeddings(2)
    cond = {"encoder_hidden_states": e["prompt_embeds"], "pooled_projections": e["pooled_prompt_embeds"]}
    torch.testing.assert_close(den(x, sigma, **cond), diffusers_denoiser(pipe)(x, sigma, **cond), rtol=1e-6, atol=1e-6)
