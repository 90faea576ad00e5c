"""The recipes' pad-crop-flip as one fastai batch transform on the DataLoaders' device (`--batch-augs`): an opt-in
alternative to the per-image albumentations item transform, for augmentations that have a batch version."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from fastai.torch_core import TensorImage
from fasttransform import Transform

from .augment import A

__all__ = ['PadCropFlip', 'batch_tfms_for']

_REFLECT_101 = 4  # cv2.BORDER_REFLECT_101: albumentations' reflection, the one torch's 'reflect' padding does


class PadCropFlip(Transform):
    """Reflect-pad each image by `pad` px, crop it back to its size at a random offset, and flip it left-right with
    probability `flip_p`: training batches only, drawing from torch's generator on the batch's device."""
    split_idx, order = 0, 15  # after IntToFloatTensor (10), before Normalize (99)

    def __init__(self, pad: int = 4, flip_p: float = 0.5):
        super().__init__()
        self.pad, self.flip_p = pad, flip_p

    def encodes(self, x: TensorImage) -> TensorImage:
        x = x.as_subclass(torch.Tensor)  # TensorImage's __torch_function__ would run on every op
        n, c, h, w = x.shape
        dev, p = x.device, self.pad
        if p:
            padded = F.pad(x, (p, p, p, p), mode='reflect')
            dy, dx = torch.randint(0, 2 * p + 1, (2, n, 1), device=dev)
            rows = (dy + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx + torch.arange(w, device=dev))[:, None, None, :]
            x = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[:, None, None],
                       rows, cols]
        if self.flip_p:
            x = torch.where((torch.rand(n, device=dev) < self.flip_p)[:, None, None, None], x.flip(3), x)
        return x.contiguous(memory_format=torch.channels_last).as_subclass(TensorImage)


def _pad_crop(pad: A.BasicTransform, crop: A.BasicTransform) -> int | None:
    """The padding of a centred reflect-pad followed by a random crop back to 32x32, or None if they are not that."""
    if not (isinstance(pad, A.PadIfNeeded) and type(crop) is A.RandomCrop): return None
    margin = pad.min_height - crop.height
    same = (pad.min_height == pad.min_width and crop.height == crop.width == 32 and margin > 0 and margin % 2 == 0
            and pad.border_mode == _REFLECT_101 and pad.position == 'center' and pad.p == crop.p == 1)
    return margin // 2 if same else None


def batch_tfms_for(augs: Sequence[A.BasicTransform]) -> list[Transform]:
    """`augs` as batch transforms: a reflect-pad and random crop back to 32x32, then a horizontal flip, each optional,
    become one `PadCropFlip`; a ValueError names an augmentation that has no batch version."""
    augs, pad, flip = list(augs), 0, 0.
    if len(augs) >= 2 and (p := _pad_crop(*augs[:2])) is not None: pad, augs = p, augs[2:]
    if augs and type(augs[0]) is A.HorizontalFlip: flip, augs = augs[0].p, augs[1:]
    if augs:
        raise ValueError(f"{', '.join(type(a).__name__ for a in augs)} has no batch version (only a reflect-pad and "
                         "random crop back to 32x32, then a horizontal flip, have one); drop --batch-augs")
    return [PadCropFlip(pad, flip)] if pad or flip else []
