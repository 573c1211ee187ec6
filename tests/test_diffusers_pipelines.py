"""The batched adapter on SDXL, FLUX and PixArt-Sigma = the same EPD table through EPDScheduler in the stock pipeline.

Tiny random pipelines built from configs (seed 0 before each model; no text encoders or tokenizers: random
embeddings are passed as the pipelines accept them), CPU, nothing downloads. Each runs with guidance (CFG for
SDXL and PixArt, the guidance embedding for FLUX) through ``sample(pipe, params=...)`` and through the pipeline's
own loop with ``EPDScheduler.from_params`` holding the same table; errors are relative,
max |pipeline - batched| / max |batched|.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, PixArtSigmaPipeline,
                       PixArtTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel)
from test_diffusers_adapter import A, C, LAM, R, SD_BETAS, rel_err  # noqa: E402

from epd_solver.epd.params import EPDParams  # noqa: E402
from epd_solver.integrations.diffusers import (DiffusersModelError, default_sigmas, diffusers_denoiser,  # noqa: E402
                                               sample)
from epd_solver.integrations.diffusers_scheduler import EPDScheduler  # noqa: E402

PIPE_TOL = 1e-4


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def tiny_vae(latent_channels: int, **kw) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, **kw)


def embeddings(batch: int, tokens: int, width: int, pooled: int | None = None, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(batch, tokens, width, generator=g),
           "negative_prompt_embeds": torch.randn(batch, tokens, width, generator=g)}
    if pooled:
        out.update(pooled_prompt_embeds=torch.randn(batch, pooled, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(batch, pooled, generator=g))
    return out


def tiny_sdxl_pipe() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                                cross_attention_dim=32, norm_num_groups=2)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(4), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=DDIMScheduler(steps_offset=1, **SD_BETAS),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipe() -> FluxPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(1, use_quant_conv=False, use_post_quant_conv=False,
                                                           shift_factor=0.0609, scaling_factor=1.5035),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipe() -> PixArtSigmaPipeline:
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(4), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def table(grid: torch.Tensor) -> EPDParams:
    return EPDParams.from_values(R, LAM, C, A, sigmas=grid)


def stock_vs_batched(pipe, params, stock_only=None, **kw) -> float:
    """The same table in the stock pipeline (EPDScheduler) and in the batched adapter, latents and decoded images
    (FLUX: unpacked first); the larger relative difference."""
    batched = {out: sample(pipe, params=params, generator=gen(), output_type=out, **kw).images
               for out in ("latent", "pt")}
    pipe.scheduler = EPDScheduler.from_params(params, pipe.scheduler)
    errors = []
    for out, want in batched.items():
        stock = pipe(num_inference_steps=params.steps, generator=gen(), output_type=out, **kw, **(stock_only or {}))
        assert stock.images.shape == want.shape, out
        errors.append(rel_err(stock.images, want))
    return max(errors)


def test_sdxl_with_cfg_matches_epd_scheduler():
    """SDXL: added time ids (size, crop, target) and pooled text embeddings beside the two CFG branches."""
    pipe = tiny_sdxl_pipe()
    params = table(default_sigmas(diffusers_denoiser(pipe), 3))
    err = stock_vs_batched(pipe, params, guidance_scale=3.0, height=16, width=16, **embeddings(2, 8, 32, 16))
    assert err <= PIPE_TOL


def tiny_clip_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters, written to ``folder`` (no hub): vocab.json + an empty merges.txt."""
    import json

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8, pad_token="!")


def test_sdxl_prompts_encoded_by_the_pipeline(tmp_path):
    """Prompts through SDXL's two text encoders (encode_prompt called by keyword: its second argument is prompt_2),
    the negative prompt's embeddings zeroed (force_zeros_for_empty_prompt) as in the stock pipeline."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    pipe = tiny_sdxl_pipe()
    config = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=16, intermediate_size=32,
                  num_attention_heads=2, num_hidden_layers=2, vocab_size=56, projection_dim=16)
    torch.manual_seed(0)
    pipe.register_modules(text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
                          text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)),
                          tokenizer=tiny_clip_tokenizer(tmp_path / "t1"),
                          tokenizer_2=tiny_clip_tokenizer(tmp_path / "t2"))
    params = table(default_sigmas(diffusers_denoiser(pipe), 3))
    prompts = ["a red cat", "a dog"]
    other = sample(pipe, params=params, prompt=prompts[::-1], guidance_scale=3.0, height=16, width=16,
                   generator=gen(), output_type="latent").latents
    assert stock_vs_batched(pipe, params, prompt=prompts, guidance_scale=3.0, height=16, width=16) <= PIPE_TOL
    batched = sample(pipe, params=params, prompt=prompts, guidance_scale=3.0, height=16, width=16, generator=gen(),
                     output_type="latent").latents
    assert rel_err(batched, other) > 1e-3  # the prompts reach the UNet


def test_flux_with_guidance_embedding_matches_epd_scheduler():
    """FLUX: packed latents with their image ids, the guidance embedding, the dynamically shifted grid (mu from the
    image's token count)."""
    pipe = tiny_flux_pipe()
    g = torch.Generator().manual_seed(6)
    emb = {"prompt_embeds": torch.randn(2, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)  # 8 x 8 pixels -> 4 x 4 tokens
    grid = default_sigmas(diffusers_denoiser(pipe), 3, pipe.scheduler, mu=mu)
    a = sample(pipe, solver="euler", num_inference_steps=3, generator=gen(), output_type="latent", height=8,
               width=8, **emb)
    torch.testing.assert_close(a.sigmas, grid)  # mu from the token count, as the pipeline computes it
    params = table(grid)
    low = sample(pipe, params=params, generator=gen(), output_type="latent", height=8, width=8,
                 guidance_scale=1.0, **emb).latents
    err = stock_vs_batched(pipe, params, guidance_scale=3.5, height=8, width=8, **emb)
    assert err <= PIPE_TOL
    high = sample(pipe, params=params, generator=gen(), output_type="latent", height=8, width=8,
                  guidance_scale=3.5, **emb).latents
    assert rel_err(low, high) > 1e-3  # the guidance embedding reaches the transformer


def test_pixart_sigma_with_cfg_matches_epd_scheduler():
    """PixArt-Sigma: attention masks of the prompt and negative tokens (padding masked out), learned-variance output."""
    pipe = tiny_pixart_pipe()
    params = table(default_sigmas(diffusers_denoiser(pipe), 3))
    emb = embeddings(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # padding of a shorter prompt
    kw = dict(guidance_scale=4.5, height=16, width=16, prompt_attention_mask=mask,
              negative_prompt_attention_mask=torch.ones(2, 8, dtype=torch.long), **emb)
    unmasked = sample(pipe, params=params, generator=gen(), output_type="latent",
                      **{**kw, "prompt_attention_mask": torch.ones(2, 8, dtype=torch.long)}).latents
    batched = sample(pipe, params=params, generator=gen(), output_type="latent", **kw).latents
    assert rel_err(batched[:1], unmasked[:1]) > 1e-4 and rel_err(batched[1:], unmasked[1:]) == 0
    assert stock_vs_batched(pipe, params, {"use_resolution_binning": False, "negative_prompt": None}, **kw) <= PIPE_TOL


def test_named_errors_for_pipelines():
    pixart = tiny_pixart_pipe()
    params = table(default_sigmas(diffusers_denoiser(pixart), 3))
    emb = embeddings(1, 8, 32)
    with pytest.raises(DiffusersModelError, match="prompt_attention_mask"):
        sample(pixart, params=params, output_type="latent", **emb)
    flux = tiny_flux_pipe()
    with pytest.raises(DiffusersModelError, match="negative prompt"):
        sample(flux, solver="euler", num_inference_steps=2, height=8, width=8, output_type="latent",
               **embeddings(1, 8, 32, 32))
    sdxl = tiny_sdxl_pipe()
    with pytest.raises(DiffusersModelError, match="pooled_prompt_embeds"):
        sample(sdxl, solver="euler", num_inference_steps=2, height=16, width=16, **embeddings(1, 8, 32))

    class OtherPipeline(DiffusionPipeline):  # a pipeline the adapter does not know
        pass

    other = OtherPipeline()
    other.register_modules(unet=sdxl.unet, scheduler=sdxl.scheduler)
    with pytest.raises(DiffusersModelError, match=r"OtherPipeline.*added_cond_kwargs.*EPDScheduler"):
        sample(other, solver="euler", num_inference_steps=2, output_type="latent")
