"""Data-parallel training over the processes that `torchrun` or `accelerate launch` start: fastai's `DistributedTrainer`
with the one piece of it that assumed CUDA replaced, so that the same code runs on GPUs (nccl) and CPUs (gloo)."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import Learner
from torch.nn.parallel import DistributedDataParallel

from .config import RunConfig, RunError

# a 1x1 conv's weight in channels_last and its gradient share one memory layout and differ only in the strides of size-1
# dimensions, which DDP reports at the first backward pass as a layout that "may impair performance"
warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides', category=UserWarning)

__all__ = ['Processes', 'launched', 'check_launch', 'ProcessGroupDL', 'Trainer', 'data_parallel', 'plain_batchnorm',
           'alone', 'unwrapped', 'unwrapped_model']


@dataclass(frozen=True)
class Processes:
    """The processes a launcher started for one run (one without a launcher), and this one's place among them."""
    count: int = 1
    rank: int = 0
    local_rank: int = 0
    local_count: int = 1  # on this machine

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and prints (rank 0)."""
        return self.rank == 0

    def join(self, cpu: bool) -> str | None:
        """Join the launch's process group (accelerate picks gloo for CPUs, nccl for GPUs); its backend."""
        if self.count == 1: return None
        from accelerate import PartialState
        PartialState(cpu=cpu)
        return dist.get_backend()

    def wait(self) -> None:
        """Wait until every process gets here."""
        if self.count > 1 and dist.is_initialized(): dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block in rank 0 first, then in the others (a download or extraction every process needs). Unlike
        accelerate's `main_process_first`, an error in rank 0 still lets the others go on, to meet it themselves."""
        if self.count == 1 or not dist.is_initialized():
            yield
            return
        if not self.main: dist.barrier()
        try: yield
        finally:
            if self.main: dist.barrier()


def launched() -> Processes:
    """This process's place in the launch, from the variables that torchrun and accelerate launch set."""
    count = int(os.environ.get('WORLD_SIZE', 1))
    return Processes(count, int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0)),
                     int(os.environ.get('LOCAL_WORLD_SIZE', count)))


def check_launch(cfg: RunConfig, procs: Processes) -> None:
    """Refuse, before anything starts, what several processes cannot do as asked."""
    if procs.count == 1: return
    if cfg.bs % procs.count:
        raise RunError(f'--bs {cfg.bs} is the global batch, split evenly across the {procs.count} processes: '
                       f'pass a multiple of {procs.count}')
    if cfg.lr == 'find':
        raise RunError(f'--lr find runs in one process, not {procs.count}: run it without the launcher '
                       '(add --epochs 1 to stop soon after), then pass the rate it prints with --lr')


class ProcessGroupDL(DistributedDL):
    """fastai's `DistributedDL` (each process takes its own slice of the epoch's order, padded to equal slices), but
    the order is broadcast on the device the backend takes: fastai's moves it to CUDA, which gloo refuses."""

    def _broadcast(self, t: list, rank: int) -> list:
        t = torch.tensor(t, dtype=torch.long, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
        dist.broadcast(t, rank)
        return t.cpu().tolist()


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with each SyncBatchNorm turned back into the BatchNorm2d it came from, holding the same parameters and
    statistics (torch converts only the other way)."""
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine: bn.weight, bn.bias = module.weight, module.bias
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        return bn.train(module.training)
    for name, child in module.named_children(): module.add_module(name, plain_batchnorm(child))
    return module


class Trainer(DistributedTrainer):
    """fastai's `DistributedTrainer`: the model in DistributedDataParallel through accelerate (gradients averaged
    across processes), the DataLoaders in `ProcessGroupDL`; after `fit` the model holds plain BatchNorms again, so
    that a checkpoint or export loads in one process anywhere."""

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else ProcessGroupDL(dl, device=self.learn.model.device)

    def after_fit(self):
        super().after_fit()
        if self.sync_bn: self.learn.model = plain_batchnorm(self.learn.model)


@contextmanager
def data_parallel(learn: Learner, procs: Processes, sync_bn: bool) -> Iterator[Learner]:
    """`learn` training data-parallel across `procs` within the block (fastai's `distrib_ctx`, with `Trainer`)."""
    if procs.count == 1:
        yield learn
        return
    trainer = Trainer(sync_bn=sync_bn, cpu=learn.dls.device.type == 'cpu')
    learn.add_cb(trainer)
    try: yield learn
    finally: learn.remove_cb(trainer)


@contextmanager
def alone() -> Iterator[None]:
    """Within the block fastai treats this process as the only one: its gathers, which read WORLD_SIZE, gather nothing.
    Rank 0 evaluates the whole test split this way, each image once, while the other processes have stopped."""
    size = os.environ.get('WORLD_SIZE')
    os.environ['WORLD_SIZE'] = '1'
    try: yield
    finally:
        if size is None: os.environ.pop('WORLD_SIZE', None)
        else: os.environ['WORLD_SIZE'] = size


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The network a `DistributedDataParallel` wraps, or `model` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def unwrapped(dl):
    """The DataLoader a `DistributedDL` wraps, or `dl` itself."""
    return dl.dl if isinstance(dl, DistributedDL) else dl
