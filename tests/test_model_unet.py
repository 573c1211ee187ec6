"""The digits U-Net, its EDM preconditioning and loss, its file format and ``epd train-model``."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from epd_solver.cli import main
from epd_solver.denoisers import Denoiser
from epd_solver.models import DigitsUNet, EDMPrecondNet, edm_loss, load_model_from


class _Probe(torch.nn.Module):
    """F(x_in, c_noise) = 0, recording its inputs."""

    def forward(self, x, c_noise):
        self.x_in, self.c_noise = x.clone(), c_noise.clone()
        return torch.zeros_like(x)


class _Const(torch.nn.Module):
    def forward(self, x, c_noise):
        return torch.ones_like(x)


def test_edm_preconditioning_numbers():
    # EDM Table 1 at sigma = sigma_data = 0.5: c_skip = 1/2, c_out = 0.5^2/sqrt(0.5), c_in = 1/sqrt(0.5)
    x = torch.full((1, 1, 8, 8), 2.0, dtype=torch.float64)
    sigma = torch.tensor([0.5], dtype=torch.float64)
    probe = _Probe()
    d = EDMPrecondNet(probe)(x, sigma)
    assert torch.allclose(d, torch.full_like(x, 1.0))                          # c_skip x = 0.5 * 2
    assert torch.allclose(probe.x_in, torch.full_like(x, 2.0 * 1.4142135623730951))
    assert probe.c_noise.item() == pytest.approx(math.log(0.5) / 4)
    d1 = EDMPrecondNet(_Const())(x, sigma)
    assert torch.allclose(d1 - d, torch.full_like(x, 0.25 / 0.7071067811865476))  # c_out
    # sigma = 80: c_skip = 0.25/6400.25, c_out = 40/sqrt(6400.25)
    sigma = torch.tensor([80.0], dtype=torch.float64)
    d = EDMPrecondNet(_Const())(x, sigma)
    assert d[0, 0, 0, 0].item() == pytest.approx(2 * 0.25 / 6400.25 + 40 / math.sqrt(6400.25), rel=1e-12)


def test_edm_loss_with_zero_network_matches_closed_form():
    # F = 0 gives D = c_skip (y + sigma n); with n = 0: lambda (D - y)^2 = sigma^2 y^2 / (sd^2 (sigma^2 + sd^2))
    y = torch.linspace(-1, 1, 2 * 64, dtype=torch.float64).reshape(2, 1, 8, 8)
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    loss = edm_loss(EDMPrecondNet(_Probe()), y, sigma, torch.zeros_like(y))
    per = [s**2 / (0.25 * (s**2 + 0.25)) * (y[i] ** 2).mean().item() for i, s in enumerate(sigma.tolist())]
    assert loss.item() == pytest.approx(sum(per) / 2, rel=1e-12)
    # with noise: lambda (c_skip (y + s n) - y)^2 computed by hand
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    lam = (s**2 + 0.25) / (0.25 * s**2)
    expected = (lam * (0.25 / (s**2 + 0.25) * (y + s * n) - y) ** 2).mean()
    assert edm_loss(EDMPrecondNet(_Probe()), y, sigma, n).item() == pytest.approx(expected.item(), rel=1e-12)


def _random_net(seed=0, **kw) -> DigitsUNet:
    torch.manual_seed(seed)
    net = DigitsUNet(**kw).double().eval()
    for p in net.parameters():  # zero-initialised output layers would make every check trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def test_rows_are_independent_and_sigma_is_per_sample():
    net = EDMPrecondNet(_random_net(channels=8))
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    batched = net(x, sigma)
    single = torch.cat([net(x[i: i + 1], sigma[i: i + 1]) for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-12)
    assert not torch.allclose(batched[2], net(x[2:3], sigma[3:4])[0])  # sigma matters


def test_upsampling_is_nearest_neighbour():
    from torch.nn import functional as F

    from epd_solver.models.unet import _upsample2x

    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(_upsample2x(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def _args(out, steps=6, channels=4, *extra):
    return ["train-model", "--out", str(out), "--steps", str(steps), "--batch", "8", "--channels", str(channels),
            "--checkpoint-every", "3", "--threads", "1", "--quiet", "--name", "tiny", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(_args(out)) == 0
    return out, _args(out)


def test_train_model_writes_a_loadable_model(tiny_run):
    out, _ = tiny_run
    model = load_model_from(out)
    assert isinstance(model, Denoiser) and model.kind == "edm" and model.name == "tiny"
    assert (model.sigma_min, model.sigma_max, model.shape) == (0.002, 80.0, (1, 8, 8))
    # the model file holds the EMA weights of the checkpoint
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == {k[4:] for k in ckpt if k.startswith("ema.")}
    assert all(torch.equal(weights[k], ckpt[f"ema.{k}"]) for k in weights)
    assert not all(torch.equal(weights[k], ckpt[f"net.{k}"]) for k in weights)  # EMA lags the raw weights
    # load_model_from(path to .safetensors) is the same model; float64 input gives float64 output
    same = load_model_from(out / "model.safetensors")
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = model(x, torch.tensor([0.5, 2.0, 9.0]))
    assert y.dtype == torch.float64 and torch.equal(y, same(x, torch.tensor([0.5, 2.0, 9.0])))


def test_train_model_resume_equals_uninterrupted_run(tiny_run, tmp_path):
    out, _ = tiny_run
    part = tmp_path / "part"
    assert main(_args(part, 3)) == 0
    assert main(_args(part, 6, 4, "--resume")) == 0
    a, b = load_file(str(out / "checkpoint.safetensors")), load_file(str(part / "checkpoint.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_model_refuses_to_overwrite(tiny_run, capsys):
    out, args = tiny_run
    before = (out / "model.safetensors").read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(_args(out, 6, 8, "--resume")) == 2  # resuming with another architecture is refused
    assert "channels" in capsys.readouterr().err
    assert main(_args(out, 3, 4, "--resume")) == 2  # the checkpoint is already past step 3
    assert "beyond --steps" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def test_gradient_reaches_the_input_not_the_weights(tiny_run):
    model = load_model_from(tiny_run[0])
    assert not any(p.requires_grad for p in model.net.parameters())
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    model(x, torch.tensor([1.0, 3.0])).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_inputs_are_refused(tiny_run):
    model = load_model_from(tiny_run[0])
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 1, 7, 7), torch.ones(2))
    with pytest.raises(ValueError, match="sigma > 0"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="unconditional"):
        model(torch.zeros(2, 1, 8, 8), torch.ones(2), class_labels=torch.zeros(2))
    with pytest.raises(FileNotFoundError):
        load_model_from(tiny_run[0] / "nothing.safetensors")
