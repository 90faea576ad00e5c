"""Review figures and test-set metrics for a trained Learner: curves, misclassified grid, top losses, confusion."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import fields
from itertools import zip_longest
from pathlib import Path

import albumentations as A
import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch
import fastai.vision.learner  # noqa: F401 (registers plot_top_losses for images)
from fastai.interpret import ClassificationInterpretation
from fastai.data.load import DataLoader
from fastai.learner import Learner, load_learner
from fastai.torch_core import show_image

from .data import AlbumentationsTransform, DataError

__all__ = ['plot_curves', 'plot_misclassified', 'review', 'flip_tta', 'flip_tta_accuracy', 'load_run', 'review_run', 'predict_image']


def _save(fig: matplotlib.figure.Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close('all')


def plot_curves(history: pd.DataFrame, title: str) -> matplotlib.figure.Figure:
    """Loss and accuracy per epoch, train and test, from a `history.csv` table."""
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = history.epoch + 1
    for split, style in (('train', '-o'), ('valid', '-s')):
        label = 'test' if split == 'valid' else 'train'
        ax_l.plot(ep, history[f'{split}_loss'], style, ms=3, label=label)
        ax_a.plot(ep, 100 * history[f'{split}_accuracy'], style, ms=3, label=label)
    ax_l.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_a.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
    for ax in (ax_l, ax_a): ax.grid(alpha=.3); ax.legend()
    fig.suptitle(title)
    return fig


def plot_misclassified(interp: ClassificationInterpretation, probs: torch.Tensor, targs: torch.Tensor, title: str,
                       n: int = 10) -> matplotlib.figure.Figure:
    """`n` misclassified test images, each true class in turn, in a 5-wide grid with true and predicted label and confidence."""
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


def review(learn: Learner, out: Path, title: str, k: int = 9, dl: DataLoader | None = None) -> dict:
    """Write top_losses.png, misclassified.png and confusion.png for `dl` (default: the test split); return its metrics."""
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
    return dict(test_accuracy=float(correct.float().mean()), n_test=len(targs), per_class_accuracy=per_class,
                most_confused=confused)


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


def _run_data(cfg: dict, data: str | None) -> str:
    """`data`, else the data the run trained on if it is on this machine, else `$CIFAR10_DIR`."""
    if data: return data
    if Path(cfg['data_path']).exists(): return cfg['data_path']
    if os.environ.get('CIFAR10_DIR'): return os.environ['CIFAR10_DIR']
    raise DataError(f"the run's data ({cfg['data_path']}) is not on this machine; pass --data or set CIFAR10_DIR")


def load_run(run_dir: Path, weights: Path | None = None, data: str | None = None) -> Learner:
    """The Learner of a finished run: unpickled from its model.pkl (runs code from it: trusted folders only), or,
    with `weights`, rebuilt from its config.json with plain weights loaded by `learn.load` (no code is run)."""
    run_dir = Path(run_dir)
    if weights is None: return load_learner(run_dir / 'model.pkl')
    from .constraints import Constraints
    from .train import Recipe, RunConfig, build_learner
    cfg = json.loads((run_dir / 'config.json').read_text())
    recipe = Recipe(cfg['recipe'], cfg['spec'], augs=(), constraints=Constraints())
    known = {f.name for f in fields(RunConfig)}  # all of them: --ws changes the convs without changing the weights' shapes
    run_cfg = RunConfig(**{**{k: v for k, v in cfg.items() if k in known}, 'data': _run_data(cfg, data),
                           'outside_assignment': True})
    learn = build_learner(recipe, run_cfg)
    metrics = run_dir / 'metrics.json'  # runs made before config.json recorded the classes name them there
    learned = cfg.get('classes') or (list(json.loads(metrics.read_text())['per_class_accuracy']) if metrics.exists() else None)
    if learned: _check_classes(learn.dls.path, list(learn.dls.vocab), learned)  # the rebuilt Learner took the data's classes
    learn.load(Path(weights).resolve().with_suffix(''), with_opt=False)
    return learn


def _check_classes(root: Path, classes: list[str], learned: list[str]) -> None:
    if classes != learned:
        raise DataError(f"{root} holds the classes {', '.join(classes)}, but the run learned {', '.join(learned)}; "
                        "pass the run's data with --data")


def review_run(run_dir: Path, k: int = 16, data: str | None = None, weights: Path | None = None, tta: bool = False) -> dict:
    """(Re)write the review figures of a finished run on the test split; return its metrics (`tta`: with flip TTA)."""
    from .data import check_layout, cifar10_path, data_fingerprint, data_name, image_files
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / 'config.json').read_text())
    learn, root = load_run(run_dir, weights, data), cifar10_path(_run_data(cfg, data))
    _check_classes(root, check_layout(root), list(learn.dls.vocab))
    trained_on, given = cfg.get('data_fingerprint'), data_fingerprint(root)
    if trained_on and trained_on['test'] != given['test']:
        warnings.warn(f"{root}'s test split ({data_name(given)}) is not the one this run was measured on "
                      f"({cfg['data_name']}): its accuracy here is not the run's published figure")
    tests = [f for f in image_files(root) if f.parent.parent.name == 'test']
    dl = learn.dls.test_dl(tests, with_labels=True)
    with learn.no_bar(): metrics = review(learn, run_dir, f"{cfg['recipe']} --norm {cfg['norm']}", k=k, dl=dl)
    if tta: metrics['flip_tta_test_accuracy'] = flip_tta_accuracy(learn, dl)
    return metrics


def predict_image(learn: Learner, image: Path, top: int = 3) -> list[tuple[str, float]]:
    """The `top` most probable classes of one image file, with their probabilities."""
    with learn.no_bar(): _, _, probs = learn.predict(Path(image))
    best = probs.topk(min(top, len(probs)))
    return [(learn.dls.vocab[i], float(p)) for p, i in zip(best.values, best.indices)]
