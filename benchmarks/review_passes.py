"""Time a finished run's review (figures and test metrics) as cifar_fa makes it, in one pass over the test split,
against fastai's `ClassificationInterpretation` path, which reads it four times.

    python benchmarks/review_passes.py RUN_FOLDER [--data CIFAR10] [--repeat 2]

Works on a copy of the run folder; alternates the two, `--repeat` times each. Not a test: figures vary by machine.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
from fastai.interpret import ClassificationInterpretation

import cifar_fa.runs as runs
from cifar_fa.interpret import plot_misclassified, review


def fastai_review(learn, out: Path, title: str, k: int = 9, dl=None, **_) -> dict:
    """The same figures and accuracy from fastai's interpretation: its losses, the predictions again, and the
    confusion matrix computed anew by each of the two calls that need it."""
    interp = ClassificationInterpretation.from_learner(learn, dl=dl)
    probs, targs = learn.get_preds(dl=interp.dl)
    interp.plot_top_losses(k, figsize=(9, 9))
    plt.gcf().savefig(out / 'top_losses.png', dpi=110, bbox_inches='tight')
    plot_misclassified(interp, probs, targs, title).savefig(out / 'misclassified.png', dpi=110, bbox_inches='tight')
    interp.plot_confusion_matrix(title=title, figsize=(7, 7))
    plt.gcf().savefig(out / 'confusion.png', dpi=110, bbox_inches='tight')
    plt.close('all')
    interp.most_confused(min_val=1)
    return {'test_accuracy': float((probs.argmax(1) == targs).float().mean())}


def main() -> None:
    """Parse the arguments, time both reviews in turn, print one line each."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run', type=Path, help='a finished run folder (e.g. results/s7)')
    p.add_argument('--data', help="CIFAR-10 folder or .tgz (default: the run's data, else CIFAR10_DIR)")
    p.add_argument('--repeat', type=int, default=2)
    a = p.parse_args()
    copy = Path(tempfile.mkdtemp()) / a.run.name
    shutil.copytree(a.run, copy)
    for _ in range(a.repeat):
        for name, fn in (('one pass (cifar_fa)', review), ('four passes (fastai)', fastai_review)):
            runs.review = fn
            t = time.perf_counter()
            acc = runs.review_run(copy, k=9, data=a.data)['test_accuracy']
            print(f'{name}: {time.perf_counter() - t:.1f} s, test accuracy {100 * acc:.2f} %', flush=True)
    shutil.rmtree(copy.parent)


if __name__ == '__main__':
    main()
