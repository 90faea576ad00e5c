"""The one runner every recipe calls: model, constraints, data, Learner, one-cycle training, written run folder."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import fastai
import fastai.callback.all  # noqa: F401 (patches fit_one_cycle, lr_find, summary, to_channelslast onto Learner)
import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn as nn
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastcore.foundation import L

from .augment import A
from .batch_augs import batch_tfms_for
from .callbacks import (
    EpochCheckpoint,
    EpochState,
    FloatLosses,
    GroupNormLikeBN,
    NormBiasRate,
    PhaseTimes,
    PlainProgress,
    ResumableCSVLogger,
    StopOnNaN,
    StopWhenSignalled,
    WeightsEMA,
    last_epoch,
)
from .config import OPTIMIZERS, Recipe, RunConfig, RunError
from .data import DataError, cifar10_path, cifar_dls, data_fingerprint, data_name
from .distributed import Processes, alone, check_launch, data_parallel, launched
from .interpret import flip_tta_accuracy, plot_curves, review
from .models import SpecNet, count_params, norm_bias_split
from .optim import lookahead
from .receptive_field import rf_table, total_rf
from .runfolder import prepare_out
from .system import atomic_write, keep_freed_memory, memory_bytes, process_age

__all__ = ['build_model', 'build_learner', 'describe', 'export_small', 'run', 'pick_device']


def pick_device(name: str, procs: Processes | None = None) -> torch.device:
    """`auto` is CUDA when present, else CPU; `cuda` without a GPU is an error. Of several processes on a machine, each
    takes the GPU of its local rank."""
    if name == 'auto': name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try: device = torch.device(name)
    except RuntimeError: device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise RunError(f"--device {name} is not one the recipes run on; use auto, cpu, cuda or cuda:N")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RunError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise RunError(f"--device {name} was asked for but {torch.cuda.device_count()} CUDA GPUs are visible "
                       "(cuda:0 is the first)")
    if device.type == 'cuda' and procs and procs.count > 1:
        if device.index is not None:
            raise RunError(f"--device {name} picks one GPU, but {procs.count} processes share the run: pass "
                           "--device cuda (each process takes the GPU of its local rank)")
        if (n := torch.cuda.device_count()) < procs.local_count:
            raise RunError(f"{procs.local_count} processes on this machine need a GPU each, but {n} "
                           f"{'is' if n == 1 else 'are'} visible: launch at most {n}, or pass --device cpu")
        device = torch.device('cuda', procs.local_rank)
    return device


def build_model(recipe: Recipe, cfg: RunConfig) -> SpecNet:
    """The recipe's network with `cfg`'s norm, dropout and seed, checked against the assignment's constraints."""
    make = partial(SpecNet, recipe.spec if cfg.spec is None else cfg.spec, cfg.norm, dropout=cfg.dropout, ws=cfg.ws,
                   act=cfg.act, whiten=cfg.whiten)
    try:
        # no weights yet: a --spec too big for memory is refused, not allocated
        with torch.device('meta'): probe = make()
    except ValueError as e:
        if cfg.spec is None: raise
        raise RunError(f'--spec: {e}') from None
    if not cfg.outside_assignment: recipe.constraints.check(probe, cfg.epochs, cfg.size)
    n = count_params(probe)  # --outside-assignment skips the budget: the weights may not fit in memory
    too_big = f"the network's {n:,} parameters do not fit in this machine's memory; narrow some layers"
    if 4 * n > memory_bytes(): raise RunError(too_big)
    set_seed(cfg.seed, reproducible=True)
    try: return make()
    except (MemoryError, RuntimeError) as e:  # what other processes left free was not enough
        if isinstance(e, RuntimeError) and 'allocate' not in str(e): raise
        raise RunError(too_big) from None


def describe(recipe: Recipe, model: SpecNet) -> str:
    """Spec, parameter count and receptive-field table of `model` as text."""
    ws = ', weight-standardized convs' if model.ws else ''
    act = '' if model.act == 'relu' else f', {model.act}'
    whiten = ', first conv started as a patch whitening' if model.whiten else ''
    return (f'recipe {recipe.name}, norm {model.norm}{ws}{act}{whiten}\nspec: {model.spec}\n'
            f'parameters: {count_params(model):,}\n'
            f'receptive field (last layer before GAP): {total_rf(model.spec)}\n\n'
            f'{rf_table(model.spec).to_string(index=False)}\n')


def build_learner(recipe: Recipe, cfg: RunConfig, path: Path | str = '.', model: SpecNet | None = None,
                  data_path: Path | None = None) -> Learner:
    """DataLoaders and Learner for `recipe` with `cfg` (no training); mixed precision and channels_last on CUDA. Under a
    launcher of several processes, this process's share: batches of `cfg.bs` / processes, its GPU, its workers."""
    procs = launched()
    check_launch(cfg, procs)
    device = pick_device(cfg.device, procs)
    set_seed(cfg.seed, reproducible=True)
    model = build_model(recipe, cfg) if model is None else model
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cfg.deterministic, not cfg.deterministic
    workers = cfg.workers if cfg.workers is not None else max(1, min(4, (os.cpu_count() or 1) // procs.local_count))
    augs, batch_augs = recipe.augs, ()
    if cfg.batch_augs:
        try: augs, batch_augs = (), batch_tfms_for(recipe.augs)
        except ValueError as e: raise RunError(f'--batch-augs: {e}') from None
    dls = cifar_dls(data_path or cifar10_path(cfg.data), augs, bs=cfg.bs // procs.count, n_per_class=cfg.subset,
                    workers=workers, device=device, holdout=cfg.holdout, batch_augs=batch_augs,
                    size=cfg.size)
    if len(dls.train) == 0:  # fastai drops the last partial batch, and would fail later on an empty DataLoader
        raise DataError(f'{len(dls.train_ds):,} training images make no full batch of {dls.train.bs}; '
                        'lower --bs or raise --subset')
    if model.out_features != len(dls.vocab):
        raise RunError(f"the network outputs {model.out_features:,} values per image "
                       f"but the data has {len(dls.vocab)} classes; "
                       f"end the spec with GAP and a head of {len(dls.vocab)} (e.g. 'GAP O')")
    loss = LabelSmoothingCrossEntropyFlat(eps=cfg.label_smoothing) if cfg.label_smoothing else CrossEntropyLossFlat()
    opt_func = lookahead(OPTIMIZERS[cfg.opt]) if cfg.lookahead else OPTIMIZERS[cfg.opt]
    # one parameter group unless the norm biases get their own rate: a run's checkpoint holds its optimizer's groups
    split = dict(splitter=norm_bias_split) if cfg.bias_lr != 1 else {}
    cbs = [GroupNormLikeBN(), StopOnNaN(), FloatLosses(), *([NormBiasRate(cfg.bias_lr)] if split else [])]
    learn = Learner(dls, model, opt_func=opt_func, loss_func=loss, metrics=accuracy, wd=cfg.wd, path=path,
                    model_dir='checkpoints', cbs=cbs, **split)
    learn.recorder.train_metrics = True
    learn.to_channelslast(use_amp=device.type == 'cuda')  # channels_last is ~2x faster for these convs on CPU too
    return learn


def _training_images(dl, n: int = 512) -> torch.Tensor:
    """The first `n` or more images of training batches, augmented and normalized as the network sees them."""
    batches = []
    for xb, _ in dl:
        batches.append(xb.as_subclass(torch.Tensor))
        if sum(map(len, batches)) >= n: break
    return torch.cat(batches)


def _versions() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__, fastai=fastai.__version__,
                albumentations=A.__version__)


def _cpu_model() -> str:
    try: cpuinfo = Path('/proc/cpuinfo').read_text()  # Linux: platform.processor() is empty there
    except OSError: cpuinfo = ''
    names = [line.split(':', 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith('model name')]
    return names[0] if names else platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU ({_cpu_model()}, {n} thread{'s' * (n != 1)})"


def export_small(learn: Learner, fname: str = 'model.pkl') -> None:
    """`learn.export` without what inference never reads: the split indices and the per-step schedule."""
    # fastai's `new_empty` keeps every dataset's split index lists (60,000 ints per list, 0.72 MB a file), and the
    # one cycle's lr and momentum at every step (`plot_sched`) would be most of an exported S8 Learner
    dls, hps = learn.dls, learn.recorder.__dict__.pop('hps', None)
    learn.dls = dls.new_empty()
    for dl in learn.dls.loaders:
        for tl in dl.dataset.tls: tl.splits = L([slice(None), []])
    try: learn.export(fname)
    finally:
        learn.dls = dls
        if hps is not None: learn.recorder.hps = hps


def _seconds(times: pd.Series) -> pd.Series:
    return times.astype(str).map(lambda t: sum(int(x) * 60 ** i for i, x in enumerate(reversed(t.split(':')))))


class _Laps:
    """Seconds spent in each named stage of a run, stage by stage, and the process's age when the run began."""

    def __init__(self):
        age = process_age()
        self.startup = None if age is None else round(age, 2)  # interpreter, imports, arguments, checks
        self.t, self.laps = time.perf_counter(), {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.t, 2)
        self.t = now


def run(recipe: Recipe, cfg: RunConfig, model: SpecNet | None = None) -> dict:
    """Train `recipe` as `cfg` says (its network: `model`, else `build_model`'s) and write the run folder; return the
    metrics."""
    t0, lap, procs = time.time(), _Laps(), launched()
    check_launch(cfg, procs)
    keep_freed_memory()
    model = build_model(recipe, cfg) if model is None else model
    lap('model')
    backend = procs.join(cpu=pick_device(cfg.device, procs).type == 'cpu')
    with procs.main_first(): data_path = cifar10_path(cfg.data)  # one download, not one per process
    fingerprint = data_fingerprint(data_path)
    lap('data')
    # bad data, device or head fail before any output
    learn = build_learner(recipe, cfg, model=model, data_path=data_path)
    lap('dataloaders')
    data = dict(data_path=str(data_path), data_fingerprint=fingerprint, data_name=data_name(fingerprint))
    out, prev = prepare_out(cfg, model.spec, fingerprint, procs)
    if cfg.resume and (out / 'metrics.json').exists():  # finished: nothing to train, nothing to rewrite
        if procs.main: print(f'{out} is a finished run; nothing to resume')
        return json.loads((out / 'metrics.json').read_text())
    learn.path = out
    if not procs.main: learn.remove_cb(ProgressCallback)
    elif not sys.stdout.isatty(): learn.remove_cb(ProgressCallback).add_cb(PlainProgress())  # bars garble log files
    device = learn.dls.device
    start = last_epoch(out / 'checkpoints') + 1 if cfg.resume else 0
    state = ema = None
    if cfg.resume:
        learn.load('last', with_opt=True)
        state = json.loads((out / 'checkpoints' / 'last.json').read_text()).get('state')
        if cfg.ema: ema = torch.load(out / 'checkpoints' / 'last.ema.pth', map_location=device)
        procs.wait()  # every process has read the checkpoint before rank 0 writes the next
        if procs.main:
            hist = pd.read_csv(out / 'history.csv')  # drop any row logged after the checkpoint was taken
            atomic_write(out / 'history.csv', hist[hist.epoch < start].to_csv(index=False))
    if cfg.whiten and not cfg.resume: model.init_whitening(_training_images(learn.dls.train))
    lr = prev.get('lr_used') if cfg.resume else cfg.lr
    if lr == 'find':
        lr = float(learn.lr_find().valley)
        plt.gcf().savefig(out / 'lr_find.png', dpi=110)  # plot_lr_find(return_fig=True) returns None in fastai 2.8.12
        plt.close('all')
    name = _device_name(device)
    earlier = prev.get('devices', [])
    # a run resumed elsewhere names each device in turn
    devices = earlier if earlier[-1:] == [name] else [*earlier, name]
    # SyncBatchNorm: batch statistics over the global batch, as in one process; torch's runs on CUDA only
    sync_bn = procs.count > 1 and device.type == 'cuda' and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    parallel = dict(processes=procs.count, backend=backend, global_bs=cfg.bs, per_process_bs=cfg.bs // procs.count,
                    sync_bn=sync_bn)
    config = dict(asdict(cfg), lr_used=lr, spec=model.spec, augs=[repr(a) for a in recipe.augs], **data, **parallel,
                  classes=list(learn.dls.vocab), device_name=name, devices=devices, versions=_versions(), argv=sys.argv)
    phases, csv = PhaseTimes(), ResumableCSVLogger('history.csv', append=cfg.resume) if procs.main else None
    # rank 0 keeps the checkpoint and its RNG states; each other rank reseeds from (seed, rank, epoch)
    cbs = [EpochState(state) if procs.main else EpochState(reseed=(cfg.seed, procs.rank)), phases, StopWhenSignalled()]
    if cfg.ema: cbs.append(WeightsEMA(cfg.ema, ema))
    if procs.main:
        atomic_write(out / 'config.json', json.dumps(config, indent=2))
        with alone(): atomic_write(out / 'summary.txt', f'{describe(recipe, model)}\n{learn.summary()}\n')
        if procs.count > 1:
            norm = f'{cfg.norm}: per image, nothing to sync' if cfg.norm != 'bn' else \
                'SyncBatchNorm' if sync_bn else 'BatchNorm per process (SyncBatchNorm needs CUDA)'
            print(f'data-parallel: {procs.count} processes ({backend}), global batch {cfg.bs} = {procs.count} x '
                  f'{cfg.bs // procs.count}; {norm}', flush=True)
        cbs += [csv, EpochCheckpoint()]
    lap('setup')
    try:
        with data_parallel(learn, procs, sync_bn): learn.fit_one_cycle(cfg.epochs, lr, start_epoch=start, cbs=cbs)
    finally:
        if hasattr(csv, 'file'): csv.file.close()  # an interrupted fit never reaches CSVLogger.after_fit
    lap('fit')
    if not procs.main: return {}  # rank 0 reviews, exports and holds the metrics
    # rank 0 alone: fastai's gathers would wait for the other processes, which have stopped
    with alone():
        history = pd.read_csv(out / 'history.csv')
        title = f'{recipe.name} --norm {cfg.norm}'
        split = 'holdout' if cfg.holdout else 'test'  # what the valid columns and the review measure
        plot_curves(history, title, learn.dls.valid_name).savefig(out / 'curves.png', dpi=110, bbox_inches='tight')
        metrics = dict(recipe=recipe.name, norm=cfg.norm, params=count_params(model), rf=total_rf(model.spec),
                       epochs=int(history.epoch.iloc[-1]) + 1, train_accuracy=float(history.train_accuracy.iloc[-1]),
                       **review(learn, out, title, split=split), epoch_seconds=int(_seconds(history.time).sum()),
                       device=', then '.join(devices),
                       data=data['data_path'], data_fingerprint=data['data_fingerprint'], data_name=data['data_name'],
                       subset=cfg.subset, outside_assignment=cfg.outside_assignment, **parallel)
        lap('review')
        if recipe.tta:
            metrics[f'flip_tta_{split}_accuracy'] = flip_tta_accuracy(learn)
            lap('tta')
        export_small(learn, 'model.pkl')
        learn.save((out / 'model').resolve(), with_opt=False)  # plain weights: loading them runs no code
        lap('export')
        metrics['wall_seconds'] = round(time.time() - t0, 1)  # this invocation (after --resume: the resumed part only)
        fit = lap.laps.pop('fit')
        train, valid = phases.train_s, phases.valid_s
        metrics['timings'] = dict(startup=lap.startup, **lap.laps, train=round(train, 2), valid=round(valid, 2),
                                  fit_other=round(fit - train - valid, 2))
        metrics['resumed'] = cfg.resume
        atomic_write(out / 'metrics.json', json.dumps(metrics, indent=2))
        return metrics
