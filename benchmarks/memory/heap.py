"""Print the main process's glibc heap and resident memory every 100 batches of a fresh S9 training on CIFAR-10."""
import argparse
import time

# cifar_fa before fastai: it filters the deprecation warning fastai's import raises (hence I001 off for this file)
from cifar_fa.callbacks import FloatLosses, PlainProgress
from cifar_fa.cli import one_line_errors, positive
from cifar_fa.config import RunConfig
from cifar_fa.registry import get_recipe
from cifar_fa.train import build_learner

from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback

RECIPE = get_recipe('s9')


def heap_mb() -> int:
    """Size of the `[heap]` mapping (glibc's main arena, grown with brk) in MB."""
    for line in open('/proc/self/maps'):
        if line.rstrip().endswith('[heap]'):
            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))
            return (hi - lo) >> 20
    return 0


def rss_mb() -> int:
    return next(int(line.split()[1]) >> 10 for line in open('/proc/self/status') if line.startswith('VmRSS'))


class MemoryLog(Callback):
    """Print heap and resident memory every `every` training batches."""
    order = 99

    def __init__(self, every: int = 100): self.every, self.t0 = every, time.time()

    def after_batch(self):
        if self.training and self.iter % self.every == 0:
            print(f'epoch {self.epoch} batch {self.iter:3d}  heap {heap_mb():5d} MB  resident {rss_mb():5d} MB  '
                  f'{time.time() - self.t0:4.0f} s', flush=True)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--data', default=None, help='CIFAR-10 folder or .tgz (default $CIFAR10_DIR, else untar_data)')
    p.add_argument('--epochs', type=positive(int), default=2)
    p.add_argument('--tensor-losses', action='store_true', help="keep fastai's per-batch loss tensors (no FloatLosses)")
    args = p.parse_args()
    cfg = RunConfig('s9', **{**RECIPE.defaults, 'epochs': args.epochs}, data=args.data, device='cpu')
    with one_line_errors(): learn = build_learner(RECIPE, cfg, '/tmp/heap_benchmark')
    learn.remove_cb(ProgressCallback).add_cbs([PlainProgress(), MemoryLog()])  # as in a logged run
    if args.tensor_losses: learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, FloatLosses)))
    learn.fit_one_cycle(cfg.epochs, cfg.lr)
