"""Review figures and test-set metrics for a trained Learner: curves, misclassified grid, top losses, confusion."""
from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

import fastai.vision.learner  # noqa: F401 (registers plot_top_losses for images)
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.data.load import DataLoader
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastai.torch_core import show_image, to_device, to_np

from .augment import A
from .config import RunError
from .data import AlbumentationsTransform

__all__ = ['plot_curves', 'plot_misclassified', 'misclassified', 'grad_cam', 'plot_gradcam', 'Interpretation',
           'review', 'flip_tta', 'flip_tta_accuracy']


def _save(fig: matplotlib.figure.Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close('all')


def plot_curves(history: pd.DataFrame, title: str, valid_name: str = 'test') -> matplotlib.figure.Figure:
    """Loss and accuracy per epoch, train and validation (`valid_name`: test or hold-out), from a `history.csv`."""
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = history.epoch + 1
    for split, style in (('train', '-o'), ('valid', '-s')):
        label = valid_name if split == 'valid' else 'train'
        ax_l.plot(ep, history[f'{split}_loss'], style, ms=3, label=label)
        ax_a.plot(ep, 100 * history[f'{split}_accuracy'], style, ms=3, label=label)
    ax_l.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_a.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
    for ax in (ax_l, ax_a): ax.grid(alpha=.3); ax.legend()
    fig.suptitle(title)
    return fig


def plot_misclassified(interp: ClassificationInterpretation, probs: torch.Tensor, targs: torch.Tensor, title: str,
                       n: int = 10) -> matplotlib.figure.Figure:
    """`n` misclassified test images, each true class in turn, in a 5-wide grid
    with true and predicted label and confidence."""
    return _grid(interp, probs, targs, misclassified(probs, targs, n), title, n)


def misclassified(probs: torch.Tensor, targs: torch.Tensor, n: int = 10) -> list[int]:
    """Indices of `n` misclassified images, taking each true class in turn."""
    wrong, true = (probs.argmax(1) != targs).nonzero().flatten().tolist(), targs.tolist()
    per_class = [[i for i in wrong if true[i] == c] for c in range(probs.shape[1])]  # the test set is sorted by class
    return [i for turn in zip_longest(*per_class) for i in turn if i is not None][:n]


def _grid(interp: ClassificationInterpretation, probs: torch.Tensor, targs: torch.Tensor, idxs: list[int], title: str,
          n: int, heat: torch.Tensor | None = None) -> matplotlib.figure.Figure:
    """Images `idxs` of `interp.dl` in a grid of `n`, 5 wide, titled with true and predicted label and confidence,
    with `heat` maps (one per image) over them."""
    rows = (n + 4) // 5
    fig, axs = plt.subplots(rows, 5, figsize=(12.5, 2.7 * rows), squeeze=False)
    for j, (ax, i) in enumerate(zip(axs.flat, idxs)):
        p = int(probs[i].argmax())
        title_i = f'true: {interp.vocab[targs[i]]}\npred: {interp.vocab[p]} ({probs[i, p]:.2f})'
        show_image(interp.dl.dataset[i][0], ax=ax, title=title_i)
        if heat is not None: ax.imshow(heat[j].cpu(), cmap='jet', alpha=0.45, extent=(-0.5, 31.5, 31.5, -0.5))
    for ax in list(axs.flat)[len(idxs):]: ax.axis('off')
    fig.suptitle(title)
    return fig


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Grad-CAM maps (N, H, W, in [0, 1]) of images `x` for `classes`: the feature map weighted by the mean gradient of
    each class score, taken where it enters global average pooling (after any residual addition), or at the output of
    the module named `layer`."""
    modules = dict(model.named_modules())
    if layer is None:
        layer = next((n for n, m in modules.items() if isinstance(m, nn.AdaptiveAvgPool2d)), None)
        if layer is None:
            raise RunError('the model has no nn.AdaptiveAvgPool2d to take the map from: pass --gradcam-layer')
        at_input = True
    elif layer not in modules:
        raise RunError(f"the model has no layer {layer!r} for --gradcam-layer; "
                       f"its layers: {', '.join(list(modules)[1:])}")
    else: at_input = False
    maps = []

    def keep(module, args, output=None):
        fmap = args[0] if at_input else output
        fmap.retain_grad()
        maps.append(fmap)
    hook = (modules[layer].register_forward_pre_hook if at_input else modules[layer].register_forward_hook)(keep)
    try:
        with torch.enable_grad(): model.eval()(x).gather(1, classes[:, None]).sum().backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    fmap = maps[0]
    cam = F.relu((fmap.grad.mean((2, 3), keepdim=True) * fmap).sum(1)).detach()
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode='bilinear')[:, 0]
    return cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)


def plot_gradcam(learn: Learner, interp: ClassificationInterpretation, probs: torch.Tensor, targs: torch.Tensor,
                 title: str, n: int = 10, layer: str | None = None) -> matplotlib.figure.Figure:
    """`plot_misclassified`'s images, each with its Grad-CAM map (`grad_cam`) for the predicted class."""
    idxs, dl = misclassified(probs, targs, n), interp.dl
    if not idxs: return _grid(interp, probs, targs, idxs, title, n)
    xb = dl.after_batch(to_device(dl.do_batch([dl.do_item(i) for i in idxs]), dl.device))[0]
    heat = grad_cam(learn.model, xb.as_subclass(torch.Tensor).float(), probs[idxs].argmax(1).to(xb.device), layer)
    return _grid(interp, probs, targs, idxs, f'Grad-CAM for the predicted class: {title}', n, heat)


class Interpretation(ClassificationInterpretation):
    """fastai's `ClassificationInterpretation` from one pass over `dl` that also keeps the probabilities and targets;
    fastai's own makes a pass for its losses and another for each confusion matrix it plots or reads."""

    def __init__(self, learn: Learner, dl: DataLoader, probs: torch.Tensor, targs: torch.Tensor, losses: torch.Tensor):
        super().__init__(learn, dl, losses)
        self.probs, self.targs = probs, targs

    @classmethod
    def from_learner(cls, learn: Learner, ds_idx: int = 1, dl: DataLoader | None = None) -> Interpretation:
        """Predictions, targets and losses of `learn` on `dl` (default: `learn.dls[ds_idx]`, in order)."""
        if dl is None: dl = learn.dls[ds_idx].new(shuffle=False, drop_last=False)
        probs, targs, losses = learn.get_preds(dl=dl, with_loss=True)
        return cls(learn, dl, probs, targs, losses)

    def confusion_matrix(self) -> np.ndarray:
        """Counts of (true class, predicted class), from the kept predictions."""
        n = len(self.vocab)
        return to_np(torch.bincount(self.targs * n + self.probs.argmax(1), minlength=n * n).view(n, n))


def review(learn: Learner, out: Path, title: str, k: int = 9, dl: DataLoader | None = None,
           split: str = 'test', gradcam: bool = False, gradcam_layer: str | None = None) -> dict:
    """Write top_losses.png, misclassified.png and confusion.png (and with `gradcam`, gradcam.png) for `dl` (default:
    the validation split, named `split` in the metrics returned: test or holdout)."""
    out = Path(out)
    interp = Interpretation.from_learner(learn, dl=dl)
    probs, targs = interp.probs, interp.targs
    correct = probs.argmax(1) == targs
    per_class = {c: float(correct[targs == i].float().mean()) for i, c in enumerate(interp.vocab) if (targs == i).any()}
    interp.plot_top_losses(k, figsize=(9, 9))
    _save(plt.gcf(), out / 'top_losses.png')
    _save(plot_misclassified(interp, probs, targs, title), out / 'misclassified.png')
    if gradcam: _save(plot_gradcam(learn, interp, probs, targs, title, layer=gradcam_layer), out / 'gradcam.png')
    interp.plot_confusion_matrix(title=f'confusion matrix: {title}', figsize=(7, 7))
    _save(plt.gcf(), out / 'confusion.png')
    confused = [(a, b, int(n)) for a, b, n in interp.most_confused(min_val=1)[:10]]
    return {f'{split}_accuracy': float(correct.float().mean()), f'n_{split}': len(targs),
            'per_class_accuracy': per_class, 'most_confused': confused}


def flip_tta(learn: Learner, dl: DataLoader | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-set probabilities averaged with those of the mirrored images (their mean), and the targets: `learn.tta`."""
    dl = learn.dls.valid if dl is None else dl  # `or` would ask a DataLoader for its length
    flip = AlbumentationsTransform([A.HorizontalFlip(p=1.)])
    with learn.no_bar():  # tta rebuilds the loader from the transforms given: pass the batch ones on too
        return learn.tta(dl=dl, n=1, item_tfms=flip, batch_tfms=list(dl.after_batch.fs), beta=0.5)


def flip_tta_accuracy(learn: Learner, dl: DataLoader | None = None) -> float:
    """Test-set accuracy with flip test-time augmentation (`flip_tta`)."""
    probs, targs = flip_tta(learn, dl)
    return float((probs.argmax(1) == targs).float().mean())
