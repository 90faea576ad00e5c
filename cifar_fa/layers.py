"""Normalization and activation factories, and the one conv block every model is built from."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['NORMS', 'GN_GROUPS', 'norm_layer', 'ACTIVATIONS', 'activation', 'WSConv2d', 'ConvBlock',
           'whitening_filters']

GN_GROUPS = 4  # `gn` splits channels into gcd(C, 4) groups: 4 groups for every width we use


def _batch_norm(c: int) -> nn.Module: return nn.BatchNorm2d(c)
def _group_norm(c: int) -> nn.Module: return nn.GroupNorm(math.gcd(c, GN_GROUPS), c)
def _layer_norm(c: int) -> nn.Module: return nn.GroupNorm(1, c)


NORMS: dict[str, Callable[[int], nn.Module]] = {
    'bn': _batch_norm,  # BatchNorm2d: statistics over (N, H, W) per channel
    'gn': _group_norm,  # GroupNorm(gcd(C, 4), C): per sample, over groups of channels and (H, W)
    'ln': _layer_norm,  # per-sample LayerNorm over (C, H, W) = GroupNorm(1, C): 2*C params, any H, W
}


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """Return the norm factory (a callable of the channel count) called `name`."""
    try: return NORMS[name]
    except KeyError: raise ValueError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}") from None


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    'relu': partial(nn.ReLU, inplace=True),
    'gelu': nn.GELU,  # smooth near zero: airbench's choice for short CIFAR-10 trainings
    'silu': partial(nn.SiLU, inplace=True),
}


def activation(name: str) -> Callable[[], nn.Module]:
    """Return the activation factory called `name`."""
    try: return ACTIVATIONS[name]
    except KeyError: raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}") from None


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardization: each filter is used with zero mean and unit variance (Qiao et al. 2019)."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, eps=1e-5).reshape_as(w)
        return self._conv_forward(x, w, self.bias)


class ConvBlock(nn.Sequential):
    """Conv (optionally dilated, depthwise-separable or weight-standardized) -> norm -> activation -> dropout."""
    def __init__(self, ni: int, nf: int, ks: int = 3, stride: int = 1, dilation: int = 1, separable: bool = False,
                 norm: Callable[[int], nn.Module] = _batch_norm, dropout: float = 0., ws: bool = False,
                 act: str = 'relu'):
        padding, conv = dilation * (ks - 1) // 2, WSConv2d if ws else nn.Conv2d
        if separable:
            convs = [conv(ni, ni, ks, stride, padding, dilation, groups=ni, bias=False), conv(ni, nf, 1, bias=False)]
        else:
            convs = [conv(ni, nf, ks, stride, padding, dilation, bias=False)]
        layers = [*convs, norm(nf), activation(act)()]
        if dropout: layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)
        self.ks, self.stride, self.dilation, self.padding, self.separable = ks, stride, dilation, padding, separable


def whitening_filters(images: torch.Tensor, n: int, ks: int = 3, eps: float = 5e-4) -> torch.Tensor:
    """`n` conv filters (`ks` x `ks`) that whiten `images`' patches: the `n // 2` principal directions of most variance,
    each scaled to unit variance and also negated, so that a ReLU after them keeps both signs (airbench)."""
    if n % 2: raise ValueError(f'whitening makes filters in pairs (+/-): {n} output channels is odd')
    c, d = images.shape[1], images.shape[1] * ks * ks
    if n // 2 > d: raise ValueError(f'{ks}x{ks} patches of {c} channels have {d} directions, fewer than {n // 2}')
    patches = images.float().unfold(2, ks, 1).unfold(3, ks, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d)
    variances, directions = torch.linalg.eigh(patches.T @ patches / len(patches))  # ascending
    top = slice(d - n // 2, d)
    w = (directions[:, top] / (variances[top] + eps).sqrt()).T.flip(0).reshape(-1, c, ks, ks)
    return torch.cat([w, -w])
