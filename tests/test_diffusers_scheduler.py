"""EPDScheduler in stock diffusers pipelines reproduces the batched path; config round trip; named refusals.

The pipelines' own loops (StableDiffusionPipeline, StableDiffusion3Pipeline) run EPD one model call per
timestep through the scheduler's state machine; the reference is the batched adapter + core EPD sampler
(an independent execution path). Errors are relative: max |pipeline - batched| / max |batched|.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from test_diffusers_adapter import (A, C, LAM, R, SD_BETAS, rel_err, sd3_embeddings, sd_embeddings,  # noqa: E402
                                    tiny_sd3_pipe, tiny_sd_pipe, tiny_unet2d)

from epd_solver.epd.params import EPDParams, ParamsMismatchError  # noqa: E402
from epd_solver.epd.step import rollout  # noqa: E402
from epd_solver.integrations.diffusers import default_sigmas, diffusers_denoiser, sample  # noqa: E402
from epd_solver.integrations.diffusers_scheduler import EPDScheduler, EPDSchedulerError  # noqa: E402
from epd_solver.schedules import discrete, polynomial  # noqa: E402

SD_GRID = discrete(4, DDPMScheduler(**SD_BETAS).alphas_cumprod)  # 3 steps, indices 999, 666, 333, 0
PIPE_TOL = 1e-4  # measured: <= 2e-6 (float32 pipeline state vs float64 batched solver)


def sd_params(plugin_order=None) -> EPDParams:
    return EPDParams.from_values(R, LAM, C, A, sigmas=SD_GRID, plugin_order=plugin_order)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("prediction_type, plugin_order", [("epsilon", None), ("v_prediction", 2)])
def test_sd_pipeline_with_epd_scheduler_matches_batched(prediction_type, plugin_order):
    """StableDiffusionPipeline + EPDScheduler (B = 2, K = 2, CFG 3) = batched EPD / EPD-Plugin, latents and images."""
    params = sd_params(plugin_order)
    base = DDIMScheduler(prediction_type=prediction_type, steps_offset=1, clip_sample=False, **SD_BETAS)
    pipe = tiny_sd_pipe(EPDScheduler.from_params(params, base))
    assert pipe.scheduler.order == 3 and len(pipe.scheduler) == 1000
    pe, ne = sd_embeddings(pipe, 2)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=3.0, height=16, width=16)
    for output_type in ("latent", "pt"):
        stock = pipe(num_inference_steps=3, generator=gen(), output_type=output_type, **kw).images
        batched = sample(pipe, generator=gen(), output_type=output_type, **kw).images  # the scheduler's table
        assert stock.shape == batched.shape
        assert rel_err(stock, batched) <= PIPE_TOL, output_type


def test_sd3_pipeline_with_epd_scheduler_matches_batched():
    """StableDiffusion3Pipeline + flow EPDScheduler (timestep sigma * 1000, no input scaling) = batched EPD."""
    pipe = tiny_sd3_pipe()
    grid = default_sigmas(diffusers_denoiser(pipe), 3, pipe.scheduler)
    params = EPDParams.from_values(R, LAM, C, A, sigmas=grid)
    pipe.scheduler = EPDScheduler.from_params(params, pipe.scheduler)
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.init_noise_sigma == 1.0
    kw = dict(guidance_scale=4.0, height=8, width=8, output_type="latent", **sd3_embeddings(2))
    stock = pipe(num_inference_steps=3, generator=gen(), **kw).images
    batched = sample(pipe, params=params, generator=gen(), **kw).images
    assert rel_err(stock, batched) <= PIPE_TOL
    torch.testing.assert_close(pipe.scheduler.timesteps[::3], (grid[:-1] * 1000).float())


def test_hand_loop_from_a_later_step_matches_rollout():
    """img2img-style start at step 1 (set_begin_index + add_noise) with a sample-prediction UNet = the batched
    rollout over the rest of the grid and table."""
    unet = tiny_unet2d()
    base = DDPMScheduler(prediction_type="sample", **SD_BETAS)
    params = sd_params()
    sched = EPDScheduler.from_params(params, base)
    sched.set_timesteps(3)
    sched.set_begin_index(sched.order)
    x0, noise = torch.randn(2, 2, 3, 16, 16, generator=gen())
    x = sched.add_noise(x0, noise, sched.timesteps[sched.order:sched.order + 1])
    with torch.no_grad():
        for t in sched.timesteps[sched.order:]:
            out = unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(out, t, x).prev_sample
        tables = [v[1:] for v in params.natural()]
        ref = rollout(diffusers_denoiser(unet, base), (x0 + SD_GRID[1] * noise).double(), SD_GRID[1:], *tables)
    assert rel_err(x, ref) <= PIPE_TOL
    with pytest.raises(EPDSchedulerError, match="step boundary"):
        sched.set_begin_index(1)


def test_save_pretrained_round_trip(tmp_path):
    params = sd_params(plugin_order=3)
    sched = EPDScheduler.from_params(params, DDIMScheduler(prediction_type="v_prediction", **SD_BETAS))
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = EPDScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    public = lambda s: {k: v for k, v in s.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded) == public(sched)
    for name, v in zip(("r", "weights", "dir_scale", "time_scale"), params.natural()):
        assert torch.equal(torch.tensor(loaded.config[name], dtype=torch.float64), v), name
    pipe = tiny_sd_pipe(sched)
    pe, ne = sd_embeddings(pipe, 1)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=2.0, height=16, width=16,
              num_inference_steps=3, output_type="latent")
    first = pipe(generator=gen(), **kw).images
    pipe.scheduler = loaded
    assert torch.equal(pipe(generator=gen(), **kw).images, first)
    assert torch.equal(pipe(generator=gen(), **kw).images, first)  # set_timesteps resets the state machine
    back = loaded.to_params()
    assert torch.equal(back.sigmas, params.sigmas) and back.plugin_order == 3


def test_refusals(tmp_path):
    with pytest.raises(EPDSchedulerError, match="learned tables"):
        EPDScheduler()
    with pytest.raises(EPDSchedulerError, match="learned tables"):
        EPDScheduler.from_config(DDIMScheduler().config)  # swapping in without a table must not default silently
    with pytest.raises(EPDSchedulerError, match="AFS"):
        EPDScheduler.from_params(EPDParams.from_values(R, LAM, sigmas=SD_GRID, afs=True), DDIMScheduler(**SD_BETAS))
    edm_grid = polynomial(4)  # 80 ... 0.002: another model's grid
    with pytest.raises(EPDSchedulerError, match="outside"):
        EPDScheduler.from_params(EPDParams.from_values(R, LAM, sigmas=edm_grid), DDIMScheduler(**SD_BETAS))

    path = sd_params().save(tmp_path / "table.safetensors")
    with pytest.raises(ParamsMismatchError, match="K = 2"):
        EPDScheduler.from_params(path, DDIMScheduler(**SD_BETAS), k=3)
    with pytest.raises(ParamsMismatchError, match="grid"):
        EPDScheduler.from_params(path, DDIMScheduler(**SD_BETAS), sigmas=discrete(4, DDIMScheduler().alphas_cumprod))
    sched = EPDScheduler.from_params(path, DDIMScheduler(**SD_BETAS), k=2, sigmas=SD_GRID)
    with pytest.raises(EPDSchedulerError, match="3 steps"):
        sched.set_timesteps(4)
    with pytest.raises(EPDSchedulerError, match="grid"):
        sched.set_timesteps(sigmas=SD_GRID * 0.9)
    sched.set_timesteps(sigmas=torch.cat([SD_GRID, torch.zeros(1, dtype=torch.float64)]).tolist())
    with pytest.raises(EPDSchedulerError, match="custom timesteps"):
        sched.set_timesteps(timesteps=[999, 500])

    pipe = tiny_sd_pipe(sched)
    pe, ne = sd_embeddings(pipe, 1)
    with pytest.raises(EPDSchedulerError, match="distilled for 3 steps"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=10, height=16, width=16,
             output_type="latent")


@pytest.mark.parametrize("plugin_order", [None, 3])
def test_entering_mid_step_on_a_straight_trajectory_is_exact(plugin_order):
    """A fresh scheduler handed a branch timestep (as diffusers' multi-stage schedulers accept any scheduled
    timestep): with D(x) = x0 the trajectory through x0 + sigma n is a straight line, on which every direction is
    n, so entering at branch k with the branch point (add_noise places it at tau_k) must give the same rollout
    as entering at the start of that step."""
    base = DDPMScheduler(prediction_type="sample", **SD_BETAS)
    x0, noise = torch.randn(2, 2, 3, 4, 4, generator=gen(), dtype=torch.float64)

    def run(j):
        sched = EPDScheduler.from_params(sd_params(plugin_order), base)
        x = sched.add_noise(x0, noise, sched.timesteps[j:j + 1])
        for t in sched.timesteps[j:]:
            sched.scale_model_input(x, t)
            x = sched.step(x0, t, x).prev_sample
        return sched, x

    sched, _ = run(0)
    order = sched.order
    for j in range(1, sched.timesteps.numel()):
        i, stage = divmod(j, order)
        want_x = x0 + (sched._tau[i, stage - 1] if stage else sched._grid[i]) * noise
        fresh = EPDScheduler.from_params(sd_params(plugin_order), base)
        torch.testing.assert_close(fresh.add_noise(x0, noise, fresh.timesteps[j:j + 1]), want_x, rtol=1e-6, atol=0)
        got = run(j)[1]
        ref = run(i * order)[1]  # the same step entered at its start
        assert rel_err(got, ref) <= 1e-12, j
    off_line = x0 + SD_GRID[-1] * noise  # c != 1: EPD leaves the line, so the check above is not trivial
    assert rel_err(run(order)[1], off_line) > 1e-3


def test_index_for_timestep():
    """Scheduled timesteps give their own index (a step start before a branch of equal value), t = 0 the last
    evaluation, another timestep in range the nearest one, and a timestep out of range a named error."""
    r_end = [row[:1] + [1.0] for row in R]  # branch 2 at the next grid point: its timestep equals the next step's
    a_end = [row[:1] + [1.0] for row in A]
    params = EPDParams.from_values(r_end, LAM, C, a_end, sigmas=SD_GRID)
    sched = EPDScheduler.from_params(params, DDIMScheduler(**SD_BETAS))
    ts, order = sched.timesteps, sched.order
    for j, t in enumerate(ts):
        shared = j % order == order - 1 and j + 1 < ts.numel()
        assert sched.index_for_timestep(t) == (j + 1 if shared else j), j
    assert ts[order - 1] == ts[order]
    assert sched.index_for_timestep(0.0) == ts.numel() - 1
    assert sched.index_for_timestep((0.9 * ts[1] + 0.1 * ts[2]).item()) == 1
    with pytest.raises(EPDSchedulerError, match="outside"):
        sched.index_for_timestep(1e6)
