"""``epd distill/sample --prompts`` on diffusers text pipelines, end to end.

Tiny random Stable-Diffusion- and SD3-style pipelines with local single-letter CLIP tokenizers are saved to a tmp
folder (nothing downloads). ``epd distill --prompts --guidance-scale 7.5`` writes a no-AFS table; it samples
through the batched adapter (prompts encoded there by the pipeline), through ``EPDScheduler`` in the stock pipeline
and through ``epd sample --prompts`` (seed s gets prompts[s % n]), all on the same noises. Errors are relative,
max |a - b| / max |b|.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from test_diffusers_adapter import SD_BETAS, rel_err  # noqa: E402
from test_diffusers_pipelines import tiny_clip_tokenizer  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,  # noqa: E402
                          T5EncoderModel, T5TokenizerFast)

from epd_solver.cli import main  # noqa: E402
from epd_solver.commands.conditioning import CLIConditioningError, conditioning_of  # noqa: E402
from epd_solver.distributed import noise_for_seeds  # noqa: E402
from epd_solver.epd.params import EPDParams  # noqa: E402
from epd_solver.integrations.diffusers import load_diffusers_model, sample  # noqa: E402
from epd_solver.integrations.diffusers_scheduler import EPDScheduler  # noqa: E402
from epd_solver.integrations.prompts import PromptError  # noqa: E402

PROMPTS = ["red cat", "", "a dog", "  "]  # blank lines are ignored
USED = ["red cat", "a dog"]
W = 7.5
SEEDS = [0, 1, 2, 3]


def clip_config(hidden: int, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=hidden,
                          intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2, vocab_size=56, **kw)


def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=1)


def sd_folder(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=2)
    torch.manual_seed(1)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=CLIPTextModel(clip_config(16)),
                                   tokenizer=tiny_clip_tokenizer(tmp_path / "tok"), unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                                           **SD_BETAS),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd")
    return tmp_path / "sd"


def tiny_t5_tokenizer(folder) -> T5TokenizerFast:
    """A unigram tokenizer over letters (and word-initial letters) in T5's format, built locally (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in letters] \
        + [("\u2581" + c, -1.5) for c in letters]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0, pad_token="<pad>",
                           eos_token="</s>", unk_token="<unk>")


def sd3_folder(tmp_path):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    torch.manual_seed(1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(),
        text_encoder=CLIPTextModelWithProjection(clip_config(16, projection_dim=32)),
        tokenizer=tiny_clip_tokenizer(tmp_path / "tok1"),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(16, projection_dim=32)),
        tokenizer_2=tiny_clip_tokenizer(tmp_path / "tok2"), tokenizer_3=tiny_t5_tokenizer(tmp_path / "tok3"),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=56, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)))
    pipe.save_pretrained(tmp_path / "sd3")
    return tmp_path / "sd3"


DISTILL = ["--nfe", "4", "--no-afs", "--trajectories", "4", "--batch", "4", "--val-trajectories", "4",
           "--select-noises", "0", "--init", "deterministic", "--schedule", "time_uniform", "--teacher-points", "1",
           "--optimizer", "adam", "--epochs", "2", "--lr", "0.1", "--scale-time", "0.05", "--quiet", "--allow-worse"]


@pytest.mark.parametrize("build", [sd_folder, sd3_folder], ids=["sd", "sd3"])
def test_distill_with_prompts_then_sample_three_ways(tmp_path, monkeypatch, capsys, build):
    monkeypatch.setenv("EPD_SOLVER_CACHE", str(tmp_path / "cache"))
    folder = build(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "t.safetensors"
    assert main(["distill", "--model", f"diffusers:{folder}", "--prompts", str(tmp_path / "prompts.txt"),
                 "--guidance-scale", str(W), "--out", str(out), *DISTILL]) == 0
    params = EPDParams.load(out)
    rec = params.meta["conditioning"]
    assert rec["guidance_scale"] == W and rec["conditions"] == len(USED)
    cached = list((tmp_path / "cache" / "prompt-embeds").glob("*.safetensors"))
    assert len(cached) == 1  # encoded once, kept for the next command

    assert main(["sample", "--model", f"diffusers:{folder}", "--solver", "epd", "--params", str(out),
                 "--prompts", str(tmp_path / "prompts.txt"), "--guidance-scale", str(W), "--seeds", "0-3",
                 "--out", str(tmp_path / "s"), "--format", "npy", "--dtype", "float64", "--quiet"]) == 0
    assert list((tmp_path / "cache" / "prompt-embeds").glob("*.safetensors")) == cached  # sample reused it
    assert main(["sample", "--model", f"diffusers:{folder}", "--solver", "epd", "--params", str(out),
                 "--prompts", str(tmp_path / "prompts.txt"), "--guidance-scale", str(W), "--seeds", "0-3",
                 "--negative-prompt", "blurry", "--out", str(tmp_path / "neg"), "--quiet"]) == 2
    assert "distilled with no negative prompt (the empty prompt), not --negative-prompt 'blurry'" in \
        capsys.readouterr().err
    cli = torch.from_numpy(np.stack([np.load(tmp_path / "s" / f"{s:06d}.npy") for s in SEEDS]))

    pipe = load_diffusers_model(folder).pipeline
    pipe.set_progress_bar_config(disable=True)
    z = noise_for_seeds(SEEDS, (4, 8, 8), torch.float64)
    prompts = [USED[s % len(USED)] for s in SEEDS]
    batched = sample(pipe, params=params, prompt=prompts, guidance_scale=W, latents=z.float(),
                     output_type="latent").latents
    assert rel_err(cli, batched) <= 1e-5
    flipped = sample(pipe, params=params, prompt=prompts[::-1], guidance_scale=W, latents=z.float(),
                     output_type="latent").latents
    assert rel_err(flipped, batched) > 1e-3  # the prompts reach the network

    pipe.scheduler = EPDScheduler.from_params(params, pipe.scheduler)
    stock = pipe(prompt=prompts, guidance_scale=W, num_inference_steps=params.steps, latents=z.float(),
                 output_type="latent").images
    assert rel_err(stock, batched) <= 1e-4


def args(**kw) -> argparse.Namespace:
    base = dict(prompts=None, prompt_embeds=None, negative_prompt=None, class_labels=None, null_label=None,
                guidance_scale=None, no_cache=True, cache_dir=None, model="")
    return argparse.Namespace(**{**base, **kw})


def test_named_errors_before_any_work(tmp_path):
    from safetensors.torch import save_file

    folder = sd_folder(tmp_path)
    model = load_diffusers_model(folder)
    with pytest.raises(CLIConditioningError, match="text-conditional: pass --prompts"):
        conditioning_of(model, args())
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PromptError, match="holds no prompts"):
        conditioning_of(model, args(prompts=str(tmp_path / "empty.txt")))
    with pytest.raises(PromptError, match="cannot read it"):
        conditioning_of(model, args(prompts=str(tmp_path / "missing.txt")))
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(PromptError, match="two kinds of conditioning"):
        conditioning_of(model, args(prompts=str(tmp_path / "p.txt"), class_labels="0-3"))
    save_file({"prompt_embeds": torch.zeros(3, 8, 16), "pooled_prompt_embeds": torch.zeros(2, 16)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(PromptError, match="row counts disagree"):
        conditioning_of(model, args(prompt_embeds=str(tmp_path / "bad.safetensors")))
    model.pipeline.text_encoder = None  # a pipeline without its text encoder
    with pytest.raises(PromptError, match="needs a pipeline folder with its text encoders"):
        conditioning_of(model, args(prompts=str(tmp_path / "p.txt"), model=f"diffusers:{folder}"))
    with pytest.raises(CLIConditioningError, match="--negative-prompt is the unconditional branch"):
        conditioning_of(model, args(negative_prompt="blurry"))


def test_prompt_embeds_file_equals_prompts(tmp_path):
    """Precomputed embeddings (with a negative row) give the same conditioning rows as the prompts file."""
    from safetensors.torch import save_file

    folder = sd_folder(tmp_path)
    model = load_diffusers_model(folder)
    pipe = model.pipeline
    (tmp_path / "p.txt").write_text("\n".join(USED))
    enc = conditioning_of(model, args(prompts=str(tmp_path / "p.txt"), negative_prompt="blur", guidance_scale=W,
                                      model=f"diffusers:{folder}"))
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompt=USED, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=["blur"] * 2)
    save_file({"prompt_embeds": pe.contiguous(), "negative_prompt_embeds": ne[:1].contiguous()},
              str(tmp_path / "e.safetensors"))
    given = conditioning_of(model, args(prompt_embeds=str(tmp_path / "e.safetensors"), guidance_scale=W))
    assert torch.equal(enc.conditions["encoder_hidden_states"], given.conditions["encoder_hidden_states"])
    assert torch.equal(enc.model.uncond["encoder_hidden_states"], given.model.uncond["encoder_hidden_states"])
    assert torch.equal(enc.for_seeds([0, 1, 2, 3])["encoder_hidden_states"], pe[[0, 1, 0, 1]])


def test_sample_refuses_another_negative_prompt_than_the_tables(tmp_path, monkeypatch, capsys):
    """The table records the digest of its unconditional branch (the negative prompt's embeddings) and the text;
    epd sample with another negative prompt, or none, is refused by name; --allow-guidance-mismatch allows it."""
    monkeypatch.setenv("EPD_SOLVER_CACHE", str(tmp_path / "cache"))
    folder = sd_folder(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(USED) + "\n")
    table = tmp_path / "t.safetensors"
    common = ["--model", f"diffusers:{folder}", "--prompts", str(tmp_path / "prompts.txt"), "--guidance-scale", str(W)]
    assert main(["distill", *common, "--negative-prompt", "blurry", "--out", str(table), *DISTILL]) == 0
    rec = EPDParams.load(table).meta["conditioning"]
    assert rec["negative_prompt"] == "blurry" and rec["uncond_digest"] is not None
    capsys.readouterr()

    def sample_with(*extra, out):
        return main(["sample", *common, "--solver", "epd", "--params", str(table), "--seeds", "0-1", "--out",
                     str(tmp_path / out), "--format", "npy", "--quiet", *extra])

    assert sample_with(out="none") == 2
    err = capsys.readouterr().err
    assert "distilled with negative prompt 'blurry', not no --negative-prompt" in err
    assert "--allow-guidance-mismatch" in err and not (tmp_path / "none").exists()
    assert sample_with("--negative-prompt", "sharp", out="other") == 2
    assert "not --negative-prompt 'sharp'" in capsys.readouterr().err
    assert sample_with("--negative-prompt", "blurry", out="same") == 0
    assert sample_with("--negative-prompt", "sharp", "--allow-guidance-mismatch", out="allowed") == 0
    a, b = (np.load(tmp_path / d / "000000.npy") for d in ("same", "allowed"))
    assert np.abs(a - b).max() > 1e-4 * np.abs(a).max()  # the negative prompt reaches the unconditional branch
