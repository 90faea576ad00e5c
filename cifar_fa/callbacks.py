"""Small fastai callbacks: GroupNorm treated like BatchNorm, plain epoch lines, resumable history and checkpoints."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch.nn as nn
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger

__all__ = ['GroupNormLikeBN', 'PlainProgress', 'ResumableCSVLogger', 'EpochCheckpoint', 'StopOnNaN', 'atomic_write',
           'DivergedError', 'last_epoch']


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


class GroupNormLikeBN(Callback):
    """Give GroupNorm parameters BatchNorm's treatment: no weight decay unless `wd_bn_bias`, trainable under `train_bn`."""
    order = -5  # fastai's `norm_types` lacks nn.GroupNorm, so `Learner.create_opt` skips these

    def before_fit(self):
        if self.learn.opt is None: return  # get_preds and summary run the fit events without an optimizer
        for m in self.learn.model.modules():
            if not isinstance(m, nn.GroupNorm): continue
            for p in m.parameters():
                state = self.learn.opt.state[p]
                if not self.learn.wd_bn_bias: state['do_wd'] = False
                if self.learn.train_bn: state['force_train'] = True


class DivergedError(RuntimeError):
    """Training produced a non-finite loss."""


class StopOnNaN(Callback):
    """Stop with `DivergedError` as soon as the training loss is not finite."""
    order = 40

    def after_batch(self):
        if self.training and not math.isfinite(self.loss.item()):
            raise DivergedError(f"the training loss became {self.loss.item()} in epoch {self.epoch}; "
                                "the learning rate is too high: lower --lr (or use --lr find)")


class PlainProgress(Callback):
    """Print one plain line per epoch (for logs and non-interactive terminals) instead of progress bars."""
    order = 59  # wraps the logger before CSVLogger (order 60) does, so both see every epoch

    def before_fit(self):
        self.old_logger, self.learn.logger = self.learn.logger, self._log

    def _log(self, log):
        names = self.recorder.metric_names
        if len(log) != len(names): return  # an epoch skipped on --resume
        print('  '.join(f'{n} {v:.4f}' if isinstance(v, float) else f'{n} {v}' for n, v in zip(names, log)), flush=True)

    def after_fit(self): self.learn.logger = self.old_logger


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that appends to an earlier run's history without a second header or rows for skipped epochs."""
    def before_fit(self):
        path = self.path / self.fname
        fresh = not (self.append and path.exists() and path.stat().st_size)
        self.file = path.open('a' if self.append else 'w')
        if fresh: self.file.write(','.join(self.recorder.metric_names) + '\n')
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        if len(log) == len(self.recorder.metric_names): super()._write_line(log)
        else: self.old_logger(log)


class EpochCheckpoint(Callback):
    """After each trained epoch, save model and optimizer to `model_dir/last.pth` and the epoch number, atomically."""
    order = 65  # after the Recorder and the CSV logger have written the epoch

    def before_epoch(self): self.trained = False
    def after_train(self): self.trained = True

    def after_epoch(self):
        if not self.trained: return
        tmp = self.learn.save('last.tmp', with_opt=True)
        os.replace(tmp, tmp.with_name('last.pth'))
        atomic_write(tmp.with_name('last.json'), json.dumps({'epoch': self.epoch, 'n_epoch': self.n_epoch}))


def last_epoch(model_dir: Path) -> int | None:
    """The last finished epoch recorded by `EpochCheckpoint` in `model_dir`, or None."""
    f = Path(model_dir) / 'last.json'
    return json.loads(f.read_text())['epoch'] if f.exists() and (Path(model_dir) / 'last.pth').exists() else None
