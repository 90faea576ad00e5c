"""Small fastai callbacks: GroupNorm treated like BatchNorm, plain epoch lines, resumable history and checkpoints."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import CSVLogger
from fastai.callback.schedule import ParamScheduler
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.learner import Recorder
from fastai.torch_core import set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .distributed import unwrapped, unwrapped_model
from .system import interrupts_held, signalled

__all__ = ['GroupNormLikeBN', 'NormBiasRate', 'PlainProgress', 'ResumableCSVLogger', 'EpochCheckpoint', 'EpochState',
           'StopOnNaN', 'PhaseTimes', 'FloatLosses', 'DivergedError', 'StopWhenSignalled', 'WeightsEMA', 'ema_update',
           'last_epoch']


class GroupNormLikeBN(Callback):
    """Treat GroupNorm parameters as BatchNorm's: no weight decay unless `wd_bn_bias`, trainable under `train_bn`."""
    order = -5  # fastai's `norm_types` lacks nn.GroupNorm, so `Learner.create_opt` skips these

    def before_fit(self):
        if self.learn.opt is None: return  # get_preds and summary run the fit events without an optimizer
        for m in self.learn.model.modules():
            if not isinstance(m, nn.GroupNorm): continue
            for p in m.parameters():
                state = self.learn.opt.state[p]
                if not self.learn.wd_bn_bias: state['do_wd'] = False
                if self.learn.train_bn: state['force_train'] = True


class NormBiasRate(Callback):
    """The first parameter group (`norm_bias_split`'s norm biases) trains at `multiple` times the rate that the
    schedule, or a plain `fit`, gives the rest."""
    order = ParamScheduler.order + 1  # after the schedule has set this step's rate; it records the last group's

    def __init__(self, multiple: float): self.multiple = multiple

    def before_batch(self):
        if self.training: self.opt.hypers[0]['lr'] = self.multiple * self.opt.hypers[-1]['lr']


class FloatLosses(Callback):
    """Keep the Recorder's per-batch training losses as Python floats."""
    # fastai keeps one 0-dim CPU tensor per batch (copied there on CUDA too, so `.item()` waits for nothing); each one's
    # few small C++ allocations land between the freed activation blocks of glibc's heap and pin them, so a fresh S9
    # run's heap grew by 0.7-0.95 GB an epoch until forking the DataLoader workers failed (benchmarks/memory/)
    order = Recorder.order + 1

    def after_batch(self):
        losses = self.recorder.losses
        if self.training and losses and isinstance(losses[-1], torch.Tensor): losses[-1] = losses[-1].item()


class DivergedError(RuntimeError):
    """Training produced a non-finite loss."""


class StopOnNaN(TerminateOnNaNCallback):
    """fastai's `TerminateOnNaNCallback` on training batches, but the run stops with `DivergedError` (one line, exit
    status 2, nothing exported) instead of `fit` ending as if it had finished."""

    def after_batch(self):
        if not self.training: return  # get_preds(with_loss=True) gives one loss per image
        try: super().after_batch()
        except CancelFitException:
            raise DivergedError(f"the training loss became {self.loss.item()} in epoch {self.epoch}; "
                                "the learning rate is too high: lower --lr (or use --lr find)") from None


class StopWhenSignalled(Callback):
    """Stop at the next batch when Ctrl-C or SIGTERM arrived during `fit` but its KeyboardInterrupt was swallowed on
    the way (`cifar_fa.system.stop_on_signals`)."""

    def before_fit(self): signalled(clear=True)  # one handled before, by the caller of an earlier fit, is spent

    def before_batch(self):
        if signalled(): raise KeyboardInterrupt


class PhaseTimes(Callback):
    """Seconds spent training and validating, summed over the epochs `fit` runs."""
    order = -20  # first on every event

    def before_fit(self): self.train_s = self.valid_s = 0.

    def before_train(self): self._t = time.perf_counter()
    def after_train(self): self.train_s += time.perf_counter() - self._t
    def before_validate(self): self._t = time.perf_counter()
    def after_validate(self): self.valid_s += time.perf_counter() - self._t


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


def epoch_state(learn) -> dict:
    """What the next epoch depends on besides weights and optimizer: every RNG it draws from and the smoothed loss."""
    v, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=[v, list(mt), gauss], numpy=[name, keys.tolist(), pos, has_gauss, cached],
                 torch=torch.get_rng_state().tolist(),
                 dls=[list(unwrapped(dl).rng.getstate()[1]) for dl in learn.dls.loaders])
    device = learn.dls.device
    if device.type == 'cuda': state['cuda'] = torch.cuda.get_rng_state(device).tolist()  # the training GPU's only
    smooth = learn.recorder.smooth_loss
    state['smooth_loss'] = [smooth.count, float(smooth.val)]  # the logged train_loss is a running average across epochs
    return state


def set_epoch_state(learn, state: dict) -> None:
    """Restore what `epoch_state` saved."""
    v, mt, gauss = state['python']
    random.setstate((v, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state['torch'], dtype=torch.uint8))
    for dl, mt in zip(learn.dls.loaders, state['dls']): unwrapped(dl).rng.setstate((3, tuple(mt), None))
    device, cuda = learn.dls.device, state.get('cuda')
    if cuda and device.type == 'cuda': torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8), device)
    smooth = learn.recorder.smooth_loss
    smooth.count, smooth.val = state['smooth_loss'][0], torch.tensor(state['smooth_loss'][1])


class EpochState(Callback):
    """Make each epoch follow from the state at its start (`epoch_state`), restored from `state` on --resume; with
    `reseed` (seed, rank), from those and the epoch instead: the processes after the first of a data-parallel run keep
    no checkpoint, and each draws its own augmentations."""
    order = 71  # after SkipToEpoch, so the states are restored at the first epoch that really trains

    def __init__(self, state: dict | None = None, reseed: tuple[int, int] | None = None):
        self.state, self.reseed = state, reseed

    def before_epoch(self):
        if self.reseed is not None: set_seed(hash((*self.reseed, self.epoch)) % 2 ** 32)  # ints hash the same anywhere
        elif self.state is not None:
            set_epoch_state(self.learn, self.state)
            self.state = None
        # augmentations reseed from `random` (workers are reseeded by fastai)
        for tfm in unwrapped(self.dls.train).after_item.fs:
            if hasattr(tfm, 'reseed'): tfm.reseed()


def ema_update(decay: float) -> Callable:
    """`AveragedModel`'s `multi_avg_fn` for a moving average with `decay`, warmed up as timm's `ModelEmaV3` is: after
    `n` updates the decay is min(`decay`, (1 + n) / (10 + n)), so that the first steps' weights fade from the average
    within a few hundred steps rather than lingering in it (0.999 ** 3,500: 3 % after a 10-epoch S9 screen)."""
    def update(averages: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        get_ema_multi_avg_fn(min(decay, (1 + float(n)) / (10 + float(n))))(averages, params, n)
    return update


class WeightsEMA(Callback):
    """Keep an exponential moving average of the weights and norm buffers (torch's `AveragedModel`), updated after
    every optimizer step; validate with it, and leave it in the model when `fit` ends, for the review and the export.
    `state` (`state_dict`'s, from a checkpoint) continues an average on --resume."""

    def __init__(self, decay: float, state: dict | None = None):
        self.decay, self.state, self.ema = decay, state, None

    def before_fit(self):
        if self.learn.opt is None: return  # get_preds and summary run the fit events without an optimizer
        live = unwrapped_model(self.learn.model)
        self.ema = AveragedModel(live, multi_avg_fn=ema_update(self.decay), use_buffers=True)
        if self.state is not None: self.ema.load_state_dict(self.state)
        self.state = None

    def after_step(self): self.ema.update_parameters(unwrapped_model(self.learn.model))

    def _swap(self):
        if self.ema is None: return  # validation outside `fit`
        with torch.no_grad():
            for live, avg in zip(unwrapped_model(self.learn.model).state_dict().values(),
                                 self.ema.module.state_dict().values()):
                tmp = live.clone()
                live.copy_(avg)
                avg.copy_(tmp)

    def before_validate(self): self._swap()
    def after_validate(self): self._swap()

    def after_fit(self):
        if self.ema is None: return
        unwrapped_model(self.learn.model).load_state_dict(self.ema.module.state_dict())
        self.ema = None

    def state_dict(self) -> dict:
        """The average so far, for a checkpoint."""
        return self.ema.state_dict()


class EpochCheckpoint(Callback):
    """After each trained epoch, atomically save model, optimizer, epoch and `epoch_state` to `model_dir/last.*`, and
    the average of a `WeightsEMA` to `model_dir/last.ema.pth`."""
    order = 65  # after the Recorder and the CSV logger have written the epoch

    def before_epoch(self): self.trained = False
    def after_train(self): self.trained = True

    def after_epoch(self):
        if not self.trained: return
        tmp = self.learn.save('last.tmp', with_opt=True)
        info = tmp.with_name('last.json.tmp')
        info.write_text(json.dumps({'epoch': self.epoch, 'n_epoch': self.n_epoch, 'state': epoch_state(self.learn)}))
        files = {tmp: 'last.pth', info: 'last.json'}
        if ema := next((cb for cb in self.learn.cbs if isinstance(cb, WeightsEMA)), None):
            torch.save(ema.state_dict(), ema_tmp := tmp.with_name('last.ema.pth.tmp'))
            files = {ema_tmp: 'last.ema.pth', **files}
        with interrupts_held():  # the weights of one epoch never sit beside the epoch number of another
            for f, name in files.items(): os.replace(f, f.with_name(name))


def last_epoch(model_dir: Path) -> int | None:
    """The last finished epoch recorded by `EpochCheckpoint` in `model_dir`, or None."""
    f = Path(model_dir) / 'last.json'
    return json.loads(f.read_text())['epoch'] if f.exists() and (Path(model_dir) / 'last.pth').exists() else None
