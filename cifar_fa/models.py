"""Networks built from a spec string that reads like an assignment's skeleton."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import ConvBlock, norm_layer, whitening_filters
from .receptive_field import rf_table
from .spec import parse_spec

__all__ = ['SpecNet', 'count_params', 'norm_bias_split']

class SpecNet(nn.Module):
    """A CNN built from a spec string, with any normalization from `NORMS` by name."""
    def __init__(self, spec: str, norm: str = 'bn', n_in: int = 3, n_out: int = 10, dropout: float = 0.,
                 ws: bool = False, act: str = 'relu', whiten: bool = False):
        super().__init__()
        self.spec, self.norm, self.ws, self.act, self.whiten = spec, norm, ws, act, whiten
        make_norm, layers, width, shapes, specs = norm_layer(norm), {}, n_in, {}, parse_spec(spec)
        first = specs[0]
        if whiten and not (first.kind == 'conv' and not first.separable and first.dilation == first.stride == 1
                           and first.nf and first.nf % 2 == 0 and first.nf <= 2 * n_in * first.ks ** 2):
            raise ValueError('a whitened first layer must be a plain conv (not separable, dilated or strided) with an '
                             'even width of at most 2 x its patch size (54 for 3x3 on RGB)')
        for l in specs:
            if l.kind == 'conv':
                # standardizing would undo the whitening: each filter's mean and scale are what it whitens with
                first_whitened = whiten and not layers
                layers[l.name] = ConvBlock(width, l.nf, l.ks, l.stride, l.dilation, l.separable, make_norm, dropout,
                                           ws and not first_whitened, act)
                width = l.nf
            elif l.kind == 'pool': layers[l.name] = nn.MaxPool2d(2)
            elif l.kind == 'gap': layers[l.name] = nn.AdaptiveAvgPool2d(1)
            else:
                layers[l.name] = nn.Conv2d(width, l.nf or n_out, 1)
                width = l.nf or n_out
            if l.add and shapes[l.add] != width:
                raise ValueError(f"spec layer {l.name} ({width} channels) "
                                 f"cannot add {l.add} ({shapes[l.add]} channels)")
            shapes[l.name] = width
        side = int(rf_table(spec).n_out.iloc[-1])  # raises if a `+SOURCE` adds a map of another size (32x32 inputs)
        self.out_features = width * side * side  # per image: the class count when the spec ends with GAP and a head
        self.layers = nn.ModuleDict(layers)
        self.skips = {l.name: l.add for l in specs if l.add}
        self._sources = set(self.skips.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a plain tensor: with fastai's TensorImage every op runs its __torch_function__
        # (a CPU step of S8 measured 1.4-1.8x)
        x, saved = x.as_subclass(torch.Tensor), {}
        for name, layer in self.layers.items():
            x = layer(x)
            if name in self.skips: x = x + saved[self.skips[name]]
            if name in self._sources: saved[name] = x
        return x.flatten(1)

    def init_whitening(self, images: torch.Tensor) -> None:
        """Set the first conv's filters to `whitening_filters` of `images` (a batch as the network sees it)."""
        conv = next(iter(self.layers.values()))[0]
        with torch.no_grad(): conv.weight.copy_(whitening_filters(images, conv.out_channels, conv.kernel_size[0]))


def norm_bias_split(model: nn.Module) -> list[list[nn.Parameter]]:
    """A fastai splitter: the norm layers' biases, then every other parameter."""
    norms = (m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)))
    biases = {id(m.bias) for m in norms if m.bias is not None}
    params = list(model.parameters())
    return [[p for p in params if id(p) in biases], [p for p in params if id(p) not in biases]]


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters in `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
