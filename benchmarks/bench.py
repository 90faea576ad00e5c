"""Benchmark cifar_fa's DataBlock pipeline and Learner against plain PyTorch with the same data, augmentations and \
model.

    python benchmarks/bench.py [--data CIFAR10] [--batches 60] [--workers N] [--bs 128] [--repeats 3]

Prints images/s of the training pipelines, the time of the same number of training steps through the Learner and
through a hand-written loop (alternated, median of --repeats), the peak resident memory, and the machine and versions. \
Not a test: figures vary by machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Sequence

# cifar_fa before fastai: it filters the deprecation warning fastai's import raises (hence I001 off for this file)
from cifar_fa import RunConfig, build_learner, build_model, cifar10_path, cifar_dls
from cifar_fa.augment import A
from cifar_fa.cli import non_negative, one_line_errors, positive
from cifar_fa.config import RunError
from cifar_fa.data import CIFAR_STATS, image_files
from cifar_fa.registry import get_recipe

import fastai
import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelValidException
from PIL import Image
from torch.utils.data import DataLoader, Dataset

RECIPE = get_recipe('s8')


class PlainCifar(Dataset):
    """What a PyTorch user writes: open each file with PIL, albumentations, a normalized tensor."""

    def __init__(self, files: Sequence[Path], augs: Sequence[A.BasicTransform]):
        classes = sorted({f.parent.name for f in files})
        self.files, self.labels = list(files), [classes.index(f.parent.name) for f in files]
        self.aug = A.Compose(list(augs))
        self.mean, self.std = (torch.tensor(s).view(3, 1, 1) for s in CIFAR_STATS)

    def __len__(self) -> int: return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.aug(image=np.asarray(Image.open(self.files[i]).convert('RGB')))['image']
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, self.labels[i]


def pipeline_rate(loader, n_batches: int) -> float:
    """Images per second drawn from `loader` over `n_batches` batches, after one warm-up batch."""
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for _ in range(n_batches): n += len(next(it)[0])
    return n / (time.perf_counter() - t)


def plain_steps(model: torch.nn.Module, loader, device: torch.device, lr: float, n_batches: int) -> float:
    """Seconds for `n_batches` steps of a hand-written loop: SGD one cycle, channels_last, AMP on CUDA."""
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=n_batches)
    t = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == n_batches: break
        x, y = x.to(device, memory_format=torch.channels_last, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=device.type == 'cuda'):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if device.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t


def _pss_mb(pid: int) -> float:
    """Proportional set size of `pid` in MB: its own pages plus its share of pages shared with other processes."""
    for line in Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines():
        if line.startswith('Pss:'): return int(line.split()[1]) / 1024
    return 0.


class PeakMemory(threading.Thread):
    """Samples the summed PSS of this process and its children (DataLoader workers) until stopped; keeps the peak."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0., threading.Event()

    def run(self):
        me = os.getpid()
        while not self.done.wait(self.every):
            try:
                kids = Path(f'/proc/{me}/task/{me}/children').read_text().split()
                self.peak = max(self.peak, sum(_pss_mb(int(p)) for p in [me, *kids]))
            except (OSError, ValueError): pass  # a worker exited between the listing and the read


class TrainTime(Callback):
    """Seconds spent in the training phase of an epoch; validation is skipped."""
    def before_train(self): self.t = time.perf_counter()

    def after_train(self):
        if self.dls.device.type == 'cuda': torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t

    def before_validate(self): raise CancelValidException


def main(argv: list[str] | None = None) -> dict:
    """Print the figures and return them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help='CIFAR-10 folder or .tgz (default $CIFAR10_DIR, else untar_data)')
    p.add_argument('--batches', type=positive(int), default=60, help='batches per measurement')
    p.add_argument('--workers', type=non_negative(int), default=min(4, os.cpu_count() or 1))
    p.add_argument('--bs', type=positive(int), default=128)
    p.add_argument('--repeats', type=positive(int), default=3,
                   help='alternated timings of each training loop (the median is shown)')
    p.add_argument('--device', default='auto')
    args = p.parse_args(argv)
    root = cifar10_path(args.data)
    train = [f for f in image_files(root) if f.parent.parent.name == 'train']
    n_per_class = -(-args.bs * (args.batches + 1) // 10)  # one epoch = the measured batches (+1: drop_last)
    cfg = RunConfig('s8', **{**RECIPE.defaults, 'norm': 'bn', 'bs': args.bs, 'workers': args.workers,
                             'device': args.device, 'data': str(root), 'subset': n_per_class, 'epochs': 1})
    learn = build_learner(RECIPE, cfg)
    device = learn.dls.device
    plain_dl = DataLoader(PlainCifar(train, RECIPE.augs), args.bs, shuffle=True, num_workers=args.workers,
                          drop_last=True, pin_memory=device.type == 'cuda', persistent_workers=args.workers > 0)
    full_dls = cifar_dls(root, RECIPE.augs, bs=args.bs, workers=args.workers, device=device)
    if len(full_dls.train) <= args.batches:
        raise RunError(f'--batches {args.batches} needs {args.batches + 1} training batches of {args.bs} '
                       f'(one warms up), but {root} holds {len(full_dls.train)}; pass a smaller --batches or --bs')
    ours, plain = pipeline_rate(full_dls.train, args.batches), pipeline_rate(plain_dl, args.batches)
    timer, n_steps = TrainTime(), len(learn.dls.train)
    ours_s, plain_s = [], []
    for _ in range(args.repeats):  # alternated, each with a fresh model, so warm-up and machine load hit both sides
        learn.model = build_model(RECIPE, cfg)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, cfg.lr, cbs=timer, reset_opt=True)
        ours_s.append(timer.seconds)
        plain_s.append(plain_steps(build_model(RECIPE, cfg), plain_dl, device, cfg.lr, n_steps))
    ours_t, plain_t = statistics.median(ours_s), statistics.median(plain_s)
    memory = PeakMemory()  # sampled in an untimed epoch: reading /proc competes with training for the CPU and the GIL
    if Path('/proc/self/smaps_rollup').exists(): memory.start()  # Linux only
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, cfg.lr, cbs=TrainTime())
    memory.done.set()
    rows = {
        'machine': f'{platform.machine()}, {os.cpu_count()} CPUs'
                   + (f', {torch.cuda.get_device_name()}' if device.type == 'cuda' else ''),
        'versions': f'torch {torch.__version__}, fastai {fastai.__version__}, albumentations {A.__version__}',
        'settings': f'S8 bn, bs {args.bs}, {args.workers} workers, {args.batches} batches, device {device}',
        'pipeline img/s, cifar_fa DataBlock': round(ours),
        'pipeline img/s, plain Dataset+DataLoader': round(plain),
        'pipeline ratio (goal >= 1.0)': round(ours / plain, 2),
        f'{n_steps} training steps, cifar_fa Learner (s, median of {args.repeats})': round(ours_t, 2),
        f'{n_steps} training steps, hand-written loop (s, median of {args.repeats})': round(plain_t, 2),
        'training time ratio (goal <= 1.1)': round(ours_t / plain_t, 2),
        # not + RUSAGE_CHILDREN: its largest child can be the `ldconfig -p` that importing torch forks (0.4-0.5 GB)
        'peak resident memory, main process (MB)': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if memory.peak: rows['peak memory during the Learner epoch, summed PSS of main + workers (MB)'] = round(memory.peak)
    width = max(map(len, rows))
    for k, v in rows.items(): print(f'{k:<{width}}  {v}')
    return rows


if __name__ == '__main__':
    with one_line_errors(): main()
