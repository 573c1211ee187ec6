"""The bundled class-conditional digits model (``digits-cond``), its label handling and its training."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

from epd_solver.cli import main
from epd_solver.denoisers import CFGDenoiser
from epd_solver.models import COND_MODEL_FILE, DigitsUNet, MissingConditioningError, TrainConfig, load_model_from
from epd_solver.problems import digits_data, digits_labels
from epd_solver.resolve import load_model
from epd_solver.sampling import sample
from epd_solver.schedules import polynomial


@pytest.fixture(scope="module")
def model():
    return load_model("digits-cond")


def test_bundled_model_loads_with_its_conditioning_record(model):
    assert model.name == "digits-cond-v1" and model.kind == "edm" and model.shape == (1, 8, 8)
    assert (model.sigma_min, model.sigma_max, model.prior_scale) == (0.002, 80.0, 80.0)
    assert (model.num_classes, model.null_label, model.conditional) == (10, 10, True)
    assert model.config["conditioning"]["key"] == "class_labels"
    assert model.config["training"]["config"]["conditional"] is True
    assert model.net.net.label_emb.weight.shape[0] == 11  # ten classes and the null label
    with resources.as_file(resources.files("epd_solver.data").joinpath(COND_MODEL_FILE)) as path:
        assert path.stat().st_size < 1.5e6  # shipped in the wheel: keep it as small as the unconditional one
    y = model(torch.zeros(3, 1, 8, 8), torch.tensor([0.5, 2.0, 9.0]), class_labels=torch.tensor([1, 2, 10]))
    assert y.shape == (3, 1, 8, 8) and y.dtype == torch.float32 and torch.isfinite(y).all()
    y64 = model(torch.zeros(3, 1, 8, 8, dtype=torch.float64), torch.ones(3), class_labels=torch.tensor(4))
    assert y64.dtype == torch.float64


def test_bad_conditioning_gets_named_errors(model):
    x, s = torch.zeros(2, 1, 8, 8), torch.ones(2)
    with pytest.raises(MissingConditioningError, match="class_labels=LongTensor"):
        model(x, s)
    assert issubclass(MissingConditioningError, ValueError)
    with pytest.raises(TypeError, match="only 'class_labels'"):
        model(x, s, class_labels=torch.tensor([1, 2]), y=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        model(x, s, class_labels=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"0\.\.10"):
        model(x, s, class_labels=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match=r"0\.\.10"):
        model(x, s, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(x, s, class_labels=torch.tensor([1, 2, 3]))


def test_null_label_is_the_unconditional_branch_of_cfg(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
    s = torch.full((10,), 1.5, dtype=torch.float64)
    labels = torch.arange(10)
    d_c = model(x, s, class_labels=labels)
    d_u = model(x, s, class_labels=torch.full((10,), 10))
    # the null label broadcast from one row (as CFGDenoiser passes it) is the same unconditional D
    assert torch.allclose(model(x, s, class_labels=torch.tensor([10])), d_u, rtol=0, atol=1e-6)
    null = model.null_condition()
    assert torch.allclose(CFGDenoiser(model, 0.0, null)(x, s, class_labels=labels), d_u, rtol=0, atol=1e-6)
    assert torch.allclose(CFGDenoiser(model, 1.0, null)(x, s, class_labels=labels), d_c, rtol=0, atol=1e-6)
    guided = CFGDenoiser(model, 3.0, null)(x, s, class_labels=labels)
    assert torch.allclose(guided, d_u + 3.0 * (d_c - d_u), rtol=0, atol=1e-5)
    # rows are independent: a mixed-label batch equals one call per row
    rows = torch.cat([model(x[i: i + 1], s[i: i + 1], class_labels=labels[i: i + 1]) for i in range(10)])
    assert torch.allclose(rows, d_c, rtol=0, atol=1e-6)
    # and the label matters: every class's D differs from the unconditional one at this noise level
    assert ((d_c - d_u).flatten(1).norm(dim=1) > 0.5).all()


def _nearest_class_mean(samples: torch.Tensor) -> torch.Tensor:
    data, target = digits_data().to(torch.float32), digits_labels()
    means = torch.stack([data[target == c].mean(0) for c in range(10)])
    return torch.cdist(samples.reshape(len(samples), -1), means).argmin(1)


def test_conditional_samples_look_like_the_requested_digit(model):
    # 12 samples per class, EDM Heun with 12 steps, judged by the nearest class mean of the real digits (which
    # labels 90.5 % of the real digits right); measured: conditional 0.908 (109/120), guided w = 2 0.983
    # (118/120), unconditional (null label, same noise) 0.092 against the same "requested" labels, i.e. chance
    labels = torch.arange(10).repeat_interleave(12)
    z = torch.randn((120, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    sigmas = polynomial(13, 0.002, 80.0)
    with torch.no_grad():
        cond, _ = sample(model, 80 * z, sigmas, "heun", extra_args={"class_labels": labels}, disable=True)
        guided, _ = sample(CFGDenoiser(model, 2.0, model.null_condition()), 80 * z, sigmas, "heun",
                           extra_args={"class_labels": labels}, disable=True)
        uncond, _ = sample(model, 80 * z, sigmas, "heun", extra_args={"class_labels": torch.tensor(10)},
                           disable=True)
    acc = lambda s: (_nearest_class_mean(s) == labels).float().mean().item()  # noqa: E731
    assert acc(cond) >= 0.8
    assert acc(guided) >= 0.9
    assert acc(uncond) <= 0.25


def _args(out, steps=3, *extra):
    return ["train-model", "--out", str(out), "--steps", str(steps), "--batch", "8", "--channels", "4",
            "--checkpoint-every", "2", "--threads", "1", "--quiet", "--conditional", *extra]


def test_conditional_training_is_seeded_and_resumable(tmp_path):
    a, b, part, other = (tmp_path / n for n in ("a", "b", "part", "other"))
    assert main(_args(a)) == 0 and main(_args(b)) == 0
    ta, tb = load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors"))
    assert set(ta) == set(tb) and any(k.startswith("net.net.") or "label_emb" in k for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert main(_args(part, 2)) == 0 and main(_args(part, 3, "--resume")) == 0
    tp = load_file(str(part / "checkpoint.safetensors"))
    assert all(torch.equal(ta[k], tp[k]) for k in ta)
    # the dropout coin is part of the stream: another label dropout gives other weights
    assert main(_args(other, 3, "--label-dropout", "0.5")) == 0
    to = load_file(str(other / "checkpoint.safetensors"))
    assert not torch.equal(ta["net.label_emb.weight"], to["net.label_emb.weight"])
    m = load_model_from(a)
    assert m.name == "digits-cond-v1" and (m.num_classes, m.null_label) == (10, 10)
    assert m.config["conditioning"]["label_dropout"] == 0.1
    assert "--conditional" in m.config["training"]["command"]
    with pytest.raises(MissingConditioningError):
        m(torch.zeros(1, 1, 8, 8), torch.ones(1))
    assert main(_args(other, 3, "--resume", "--label-dropout", "0.2")) == 2  # a different recipe cannot resume


def test_unconditional_records_are_unchanged():
    # the bundled unconditional model's training record is what TrainConfig writes for it today, and its
    # network has no label table, so its files and checkpoints still load and resume
    with resources.as_file(resources.files("epd_solver.data").joinpath("digits_unet.json")) as path:
        shipped = json.loads(path.read_text())["training"]["config"]
    assert TrainConfig(steps=5000, seed=0).fixed() == shipped
    assert not any("label" in k for k in DigitsUNet().state_dict())
    with pytest.raises(ValueError, match="unconditional"):
        DigitsUNet(channels=4)(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.tensor([0]))
