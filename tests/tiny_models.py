"""Small user models for the CLI tests: an EDM-form float32 conv net (a `module:function` model)."""

import torch
from torch import nn


class TinyConvDenoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x) with a 3x3 conv F, float32 parameters, data (1, 4, 4)."""

    shape = (1, 4, 4)
    sigma_min, sigma_max, sigma_data = 0.002, 80.0, 0.5

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, sigma, **cond):
        s = sigma.reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip, c_out = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1 / (s ** 2 + sd2).sqrt()
        return c_skip * x + c_out * self.conv(c_in * x)


def tiny_conv():
    return TinyConvDenoiser()


class TinyCondConvDenoiser(TinyConvDenoiser):
    """The same net plus a label embedding: 3 classes and the null label 3, float32 parameters."""

    num_classes, null_label = 3, 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(4, 16)

    def forward(self, x, sigma, class_labels=None, **cond):
        base = super().forward(x, sigma)
        return base + 0.1 * self.emb(class_labels).reshape(x.shape)


def tiny_cond_conv():
    return TinyCondConvDenoiser()
