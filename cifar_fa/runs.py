"""Finished run folders: their Learner loaded back, reviewed again on the test split, or asked about one image."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import fields
from pathlib import Path

from fastai.learner import Learner, load_learner

from .config import Recipe, RunConfig
from .constraints import Constraints
from .data import DataError, check_layout, cifar10_path, data_fingerprint, data_name, image_files
from .interpret import flip_tta_accuracy, review
from .train import build_learner

__all__ = ['load_run', 'review_run', 'predict_image']


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
    cfg = json.loads((run_dir / 'config.json').read_text())
    recipe = Recipe(cfg['recipe'], cfg['spec'], augs=(), constraints=Constraints())
    # all of them: --ws changes the convs without changing the weights' shapes
    known = {f.name for f in fields(RunConfig)}
    run_cfg = RunConfig(**{**{k: v for k, v in cfg.items() if k in known}, 'data': _run_data(cfg, data),
                           'outside_assignment': True})
    learn = build_learner(recipe, run_cfg)
    _check_classes(learn.dls.path, list(learn.dls.vocab), cfg['classes'])  # the rebuilt Learner took the data's classes
    learn.load(Path(weights).resolve().with_suffix(''), with_opt=False)
    return learn


def _check_classes(root: Path, classes: list[str], learned: list[str]) -> None:
    if classes != learned:
        raise DataError(f"{root} holds the classes {', '.join(classes)}, but the run learned {', '.join(learned)}; "
                        "pass the run's data with --data")


def review_run(run_dir: Path, k: int = 16, data: str | None = None, weights: Path | None = None,
               tta: bool = False, gradcam: bool = False, gradcam_layer: str | None = None) -> dict:
    """(Re)write the review figures of a finished run on the test split (`gradcam`: gradcam.png too); return its
    metrics (`tta`: with flip TTA)."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / 'config.json').read_text())
    learn, root = load_run(run_dir, weights, data), cifar10_path(_run_data(cfg, data))
    _check_classes(root, check_layout(root), list(learn.dls.vocab))
    trained_on, given = cfg.get('data_fingerprint'), data_fingerprint(root)
    if trained_on and trained_on['test'] != given['test']:
        warnings.warn(f"{root}'s test split ({data_name(given)}) is not the one this run was measured on "
                      f"({cfg['data_name']}): its accuracy here is not the run's published figure", stacklevel=2)
    tests = [f for f in image_files(root) if f.parent.parent.name == 'test']
    dl = learn.dls.test_dl(tests, with_labels=True)
    with learn.no_bar():
        metrics = review(learn, run_dir, f"{cfg['recipe']} --norm {cfg['norm']}", k=k, dl=dl, gradcam=gradcam,
                         gradcam_layer=gradcam_layer)
    if tta: metrics['flip_tta_test_accuracy'] = flip_tta_accuracy(learn, dl)
    return metrics


def predict_image(learn: Learner, image: Path, top: int = 3) -> list[tuple[str, float]]:
    """The `top` most probable classes of one image file, with their probabilities."""
    with learn.no_bar(): _, _, probs = learn.predict(Path(image))
    best = probs.topk(min(top, len(probs)))
    return [(learn.dls.vocab[i], float(p)) for p, i in zip(best.values, best.indices)]
