"""An assignment's hard constraints, checked against a model spec before any training."""
from __future__ import annotations

from dataclasses import dataclass

from .models import SpecNet, count_params
from .receptive_field import total_rf
from .spec import LayerSpec, parse_spec

__all__ = ['Constraints', 'ConstraintError']


class ConstraintError(ValueError):
    """A model or setting breaks its assignment's rules."""


def _options(l: LayerSpec) -> list[str]:
    """The /options that make layer `l` differ from its letter's plain conv (`/k3` on a C is no difference)."""
    if l.kind != 'conv': return []
    opts = {f'/k{l.ks}': l.ks != (3 if l.name[0] == 'C' else 1), f'/s{l.stride}': l.stride != 1,
            f'/d{l.dilation}': l.dilation != 1, '/dw': l.separable}
    return [o for o, on in opts.items() if on]


@dataclass(frozen=True)
class Constraints:
    """Limits a recipe must respect; `None` means unconstrained."""
    max_params: int | None = None
    min_rf: int | None = None  # RF must be strictly greater than this
    max_epochs: int | None = None
    skeleton: str | None = None  # layer names in order, e.g. 'C1 C2 c3 P1 ... GAP C10'
    blocks: str | None = None  # blocks in order up to GAP, e.g. 'C1 P1 C2 P2 C3 P3 C4 GAP' (C1a C1b c1c -> C1)
    block_convs: int | None = None  # conv layers every block must hold
    need_dilated: bool = False
    need_separable: bool = False
    need_gap: bool = True

    def check(self, model: SpecNet, epochs: int | None = None, size: int = 32) -> None:
        """Raise `ConstraintError` with one clear sentence on the first rule `model` (or `epochs`, or an input of
        `size` px) breaks."""
        layers, n = parse_spec(model.spec), count_params(model)
        names = ' '.join(l.name for l in layers)
        if self.skeleton and names != self.skeleton:
            raise ConstraintError(f"the model's layers are '{names}', "
                                  f"but the assignment's skeleton is '{self.skeleton}'")
        if self.skeleton and (l := next((l for l in layers if _options(l)), None)):
            raise ConstraintError(f"layer {l.name} has {''.join(_options(l))}, "
                                  "but the skeleton's layers take no /options "
                                  "(C = 3x3 conv, c = 1x1 conv, no stride, dilation or depthwise-separable)")
        if self.blocks:
            seq = [l.block for l in layers if l.kind != 'head']
            seq, head = (' '.join(b for i, b in enumerate(seq) if i == 0 or b != seq[i - 1]),
                         any(l.kind == 'head' for l in layers))
            if seq != self.blocks or not head:
                raise ConstraintError(f"the model's blocks are '{seq}' then {'a' if head else 'no'} head, "
                                      f"but the assignment needs '{self.blocks}' then a 1x1 conv to the classes")
        if self.block_convs is not None:
            for b in sorted({l.block for l in layers if l.kind == 'conv'}):
                if (k := sum(l.block == b for l in layers if l.kind == 'conv')) != self.block_convs:
                    raise ConstraintError(f"block {b} has {k} conv layers; "
                                          f"the assignment needs {self.block_convs} in every block")
        if self.max_params is not None and n >= self.max_params:
            raise ConstraintError(f"the model has {n:,} parameters; "
                                  f"the assignment allows fewer than {self.max_params:,}: narrow some layers")
        # the rule counts the 32 px image's pixels: on an input resized to `size` px a layer sees 32 / size as many
        if self.min_rf is not None and (rf := total_rf(model.spec)) * 32 / size <= self.min_rf:
            seen = f'{rf} px of the {size} px input, {rf * 32 / size:g} px of the image' if size != 32 else f'{rf}'
            raise ConstraintError(f"the receptive field is {seen}; "
                                  f"the assignment needs more than {self.min_rf}: add or dilate convs")
        # a 1x1 conv sees one pixel whatever its dilation, and its depthwise part is a per-channel scale
        if self.need_dilated and not any(l.dilation > 1 and l.ks > 1 for l in layers):
            raise ConstraintError("the assignment needs at least one dilated conv (e.g. C3:64/d2)")
        if self.need_separable and not any(l.separable and l.ks > 1 for l in layers):
            raise ConstraintError("the assignment needs at least one depthwise-separable conv (e.g. C4:64/dw)")
        if self.need_gap and not any(l.kind == 'gap' for l in layers):
            raise ConstraintError("the assignment needs global average pooling (GAP) before the classifier")
        if self.max_epochs is not None and epochs is not None and epochs > self.max_epochs:
            raise ConstraintError(f"--epochs {epochs} is above this recipe's cap of {self.max_epochs}: "
                                  "lower it, or pass --outside-assignment to run outside the assignment")
