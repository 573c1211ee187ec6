"""A small U-Net for 1x8x8 images with EDM preconditioning (Karras et al. 2022).

``DigitsUNet`` is the raw network F(c_in x, c_noise); ``EDMPrecondNet`` wraps it into the denoiser
D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with sigma_data = 0.5.

Layout (C = ``channels``, E = 4C, n = ``blocks``; the shipped model has C = 16, n = 1, 287 073 parameters)::

    noise:  c_noise = ln(sigma)/4 -> sinusoidal(C) -> Linear(C, E) -> SiLU -> Linear(E, E)
    label:  (``num_classes`` > 0 only) + Embedding(num_classes + 1, E)[class_labels]; the last row is the
            null label (label dropout in training), so one network gives conditional and unconditional D
    in:     conv3x3 1 -> C                                            8x8
    down:   n ResBlocks C -> C                                        8x8
            conv3x3 stride 2, n ResBlocks C -> 2C                     4x4
            conv3x3 stride 2, n ResBlocks 2C -> 2C                    2x2
    mid:    ResBlock, self-attention (4 tokens, 4 heads), ResBlock    2x2
    up:     n + 1 ResBlocks per level on [h, skip] concatenations, nearest upsampling + conv3x3
    out:    GroupNorm -> SiLU -> conv3x3 C -> 1 (zero-initialised)

A ResBlock is GN -> SiLU -> conv3x3 -> adaptive scale/shift from the embedding -> GN -> SiLU -> dropout
-> conv3x3, plus a (1x1 conv) skip, as in EDM's DDPM++ blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DigitsUNet", "EDMPrecondNet", "SIGMA_DATA"]

SIGMA_DATA = 0.5


def _groups(ch: int) -> int:
    return min(8, ch // 4) if ch >= 4 else 1


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling whose backward is a plain sum (deterministic on CUDA too)."""
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return (self.skip(x) + h) / math.sqrt(2)


class _Attention(nn.Module):
    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        att = torch.softmax(torch.einsum("bhcn,bhcm->bhnm", q, k) / math.sqrt(c // self.heads), dim=-1)
        h = torch.einsum("bhnm,bhcm->bhcn", att, v).reshape(b, c, hgt, wid)
        return (x + self.proj(h)) / math.sqrt(2)


class DigitsUNet(nn.Module):
    """The raw network F(x_in, c_noise) -> [B, 1, 8, 8]; see the module docstring for the layout."""

    def __init__(self, channels: int = 16, mults: tuple[int, ...] = (1, 2, 2), blocks: int = 1,
                 in_channels: int = 1, dropout: float = 0.0, heads: int = 4, num_classes: int = 0):
        super().__init__()
        c, e = channels, 4 * channels
        self.config = {"channels": channels, "mults": list(mults), "blocks": blocks, "in_channels": in_channels,
                       "dropout": dropout, "heads": heads}
        self.blocks = blocks
        self.emb = nn.Sequential(nn.Linear(c, e), nn.SiLU(), nn.Linear(e, e))
        self.num_classes = int(num_classes)
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if self.num_classes:  # rows 0..num_classes-1 are the classes, row num_classes the null label
            self.config["num_classes"] = self.num_classes
            self.label_emb = nn.Embedding(self.num_classes + 1, e)
        self.inp = nn.Conv2d(in_channels, c, 3, padding=1)
        widths = [c * m for m in mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch = [c], c
        for level, w in enumerate(widths):
            if level > 0:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
            for _ in range(blocks):
                self.down.append(_ResBlock(ch, w, e, dropout))
                ch = w
                skips.append(ch)
        self.mid1 = _ResBlock(ch, ch, e, dropout)
        self.mid_att = _Attention(ch, heads)
        self.mid2 = _ResBlock(ch, ch, e, dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), w, e, dropout))
                ch = w
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.levels = len(widths)

    def _embed(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.emb[0].in_features // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=c_noise.dtype, device=c_noise.device) / half)
        arg = (c_noise * 250.0)[:, None] * freqs[None]  # c_noise in ~[-1.6, 1.1]: spread it over the frequencies
        return self.emb(torch.cat([arg.cos(), arg.sin()], dim=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self._embed(c_noise)
        if self.num_classes:
            if class_labels is None:
                raise ValueError("this network is class-conditional: pass class_labels (the null label "
                                 f"{self.num_classes} for an unconditional call)")
            emb = emb + self.label_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("this network is unconditional: it takes no class_labels")
        emb = F.silu(emb)
        h = self.inp(x)
        hs = [h]
        blocks, downs = iter(self.down), iter(self.downsample)
        for level in range(self.levels):
            if level > 0:
                h = next(downs)(h)
                hs.append(h)
            for _ in range(self.blocks):
                h = next(blocks)(h, emb)
                hs.append(h)
        h = self.mid2(self.mid_att(self.mid1(h, emb)), emb)
        blocks, ups = iter(self.up), iter(self.upsample)
        for level in reversed(range(self.levels)):
            for _ in range(self.blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if level > 0:
                h = next(ups)(_upsample2x(h))
        return self.out(F.silu(self.out_norm(h)))


class EDMPrecondNet(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4) with sigma_data = 0.5 (EDM Table 1)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sd2, s2 = self.sigma_data**2, sigma**2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        v = lambda c: c.reshape(-1, 1, 1, 1)  # noqa: E731
        if class_labels is None:  # plain F(x_in, c_noise) networks (and the unconditional U-Net)
            return v(c_skip) * x + v(c_out) * self.net(v(c_in) * x, c_noise)
        return v(c_skip) * x + v(c_out) * self.net(v(c_in) * x, c_noise, class_labels)
