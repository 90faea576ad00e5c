"""Review figures and test-set metrics for a trained Learner: curves, misclassified grid, top losses, confusion."""
from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

import fastai.vision.learner  # noqa: F401 (registers plot_top_losses for images)
import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch
from fastai.data.load import DataLoader
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastai.torch_core import show_image

from .augment import A
from .data import AlbumentationsTransform

__all__ = ['plot_curves', 'plot_misclassified', 'review', 'flip_tta', 'flip_tta_accuracy']


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
    vocab, wrong, true = interp.vocab, (probs.argmax(1) != targs).nonzero().flatten().tolist(), targs.tolist()
    per_class = [[i for i in wrong if true[i] == c] for c in range(len(vocab))]  # the test set is sorted by class
    wrong = [i for turn in zip_longest(*per_class) for i in turn if i is not None][:n]
    fig, axs = plt.subplots((n + 4) // 5, 5, figsize=(12.5, 2.7 * ((n + 4) // 5)))
    for ax, i in zip(axs.flat, wrong):
        img = interp.dl.dataset[i][0]
        p = int(probs[i].argmax())
        show_image(img, ax=ax, title=f'true: {vocab[targs[i]]}\npred: {vocab[p]} ({probs[i, p]:.2f})')
    for ax in list(axs.flat)[len(wrong):]: ax.axis('off')
    fig.suptitle(title)
    return fig


def review(learn: Learner, out: Path, title: str, k: int = 9, dl: DataLoader | None = None,
           split: str = 'test') -> dict:
    """Write top_losses.png, misclassified.png and confusion.png for `dl` (default: the validation split, named
    `split` in the metrics returned: test or holdout)."""
    out = Path(out)
    interp = ClassificationInterpretation.from_learner(learn, dl=dl)
    probs, targs = learn.get_preds(dl=interp.dl)
    correct = probs.argmax(1) == targs
    per_class = {c: float(correct[targs == i].float().mean()) for i, c in enumerate(interp.vocab) if (targs == i).any()}
    interp.plot_top_losses(k, figsize=(9, 9))
    _save(plt.gcf(), out / 'top_losses.png')
    _save(plot_misclassified(interp, probs, targs, title), out / 'misclassified.png')
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
