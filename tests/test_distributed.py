"""Data-parallel runs: two CPU processes (gloo) started by torchrun, as README's "Several GPUs" documents."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import ROOT, write_synthetic
from fastai.data.load import DataLoader
from fastai.distributed import DistributedDL

from cifar_fa.distributed import ProcessGroupDL, plain_batchnorm

RUN_FILES = {'config.json', 'summary.txt', 'history.csv', 'curves.png', 'misclassified.png', 'top_losses.png',
             'confusion.png', 'metrics.json', 'model.pkl', 'model.pth', 'checkpoints'}


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    """40 training and 10 test images per class: 100 test images, which two processes split 50 / 50."""
    return write_synthetic(tmp_path_factory.mktemp('synth2') / 'cifar', n_train=40, n_test=10)


def torchrun(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 recipes/s8_norms.py ARGS` on the CPU (a free port: --standalone)."""
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'MPLBACKEND': 'Agg'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(ROOT / 'recipes' / 's8_norms.py'), '--device', 'cpu', *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finished(p: subprocess.Popen) -> tuple[int, str]:
    out, _ = p.communicate(timeout=600)
    return p.returncode, out


@pytest.mark.parametrize('norm', ['bn', 'gn'])
def test_two_cpu_processes_train_one_run(data, tmp_path, norm):
    (work := tmp_path / 'work').mkdir()
    rc, log = finished(torchrun('--norm', norm, '--data', str(data), '--epochs', '3', '--bs', '32', '--lr', '0.01',
                                '--out', 'run', cwd=work))
    assert rc == 0, log
    assert [p.name for p in work.iterdir()] == ['run']  # the other process wrote nothing there
    out = work / 'run'
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert {p.name for p in (out / 'checkpoints').iterdir()} == {'last.pth', 'last.json'}
    hist = pd.read_csv(out / 'history.csv')
    assert hist.epoch.tolist() == [0, 1, 2]  # one header, one row per epoch: one writer
    assert log.count('epoch 2  train_loss') == 1 and log.count('data-parallel: 2 processes (gloo)') == 1
    cfg, m = (json.loads((out / f).read_text()) for f in ('config.json', 'metrics.json'))
    expected = dict(processes=2, backend='gloo', global_bs=32, per_process_bs=16, sync_bn=False)
    assert {k: cfg[k] for k in expected} == {k: m[k] for k in expected} == expected
    assert m['n_test'] == 100  # every test image, once
    assert m['test_accuracy'] >= 0.3  # chance is 0.1
    assert m['test_accuracy'] == pytest.approx(hist.valid_accuracy.iloc[-1], abs=1e-6)  # 50 + 50 images, gathered


def test_ctrl_c_stops_both_processes_and_the_run_resumes_under_two(data, tmp_path):
    args = ('--norm', 'bn', '--data', str(data), '--epochs', '6', '--bs', '16', '--lr', '0.01', '--out', 'run')
    p = torchrun(*args, cwd=tmp_path, start_new_session=True)
    last = tmp_path / 'run' / 'checkpoints' / 'last.json'
    deadline = time.time() + 300
    while not last.exists() and p.poll() is None and time.time() < deadline: time.sleep(0.05)
    assert p.poll() is None, 'the run ended before an interrupt could stop it'
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in a terminal: the launcher and both processes get it
    rc, log = finished(p)
    assert rc != 0 and log.count('interrupted: ') == 1, log
    assert '[rank' not in log  # no traceback from either process
    done = json.loads(last.read_text())['epoch']
    assert done < 5 and not (tmp_path / 'run' / 'metrics.json').exists()

    one = subprocess.run([sys.executable, str(ROOT / 'recipes' / 's8_norms.py'), '--device', 'cpu', *args, '--resume'],
                         cwd=tmp_path, env={**os.environ, 'PYTHONPATH': str(ROOT)}, capture_output=True, text=True)
    assert one.returncode == 2 and one.stderr.strip().splitlines()[-1] == (
        'error: run was trained by 2 processes, not 1: resume it with 2 (torchrun --nproc_per_node 2)')

    rc, log = finished(torchrun(*args, '--resume', cwd=tmp_path))
    assert rc == 0, log
    hist = pd.read_csv(tmp_path / 'run' / 'history.csv')
    assert hist.epoch.tolist() == list(range(6)) and f'epoch {done}  train_loss' not in log  # went on from there
    m = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert m['processes'] == 2 and m['resumed'] and m['epochs'] == 6


@pytest.mark.parametrize('args,line', [
    (['--bs', '15'], 'error: --bs 15 is the global batch, split evenly across the 2 processes: pass a multiple of 2'),
    # met inside `main_first`, where the other process waits for rank 0
    (['--data', 'nowhere'], 'error: nowhere does not exist; pass --data with a CIFAR-10 folder or .tgz'),
])
def test_bad_input_stops_every_process_with_one_line(data, tmp_path, args, line):
    rc, log = finished(torchrun('--data', str(data), *args, '--out', 'run', cwd=tmp_path))
    assert rc != 0 and log.count(line) == 1, log
    assert not (tmp_path / 'run').exists()


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_epoch_order_is_broadcast_on_the_cpu_under_gloo(one_process_group):
    dl = DataLoader(list(range(10)), bs=4, shuffle=True)
    got = sorted(x for b in ProcessGroupDL(dl, rank=0, world_size=1) for x in b.tolist())
    assert got == list(range(10))
    if not torch.cuda.is_available():  # what ProcessGroupDL replaces: fastai's moves the order to CUDA
        with pytest.raises((RuntimeError, AssertionError)): list(DistributedDL(dl, rank=0, world_size=1))


def test_sync_batchnorm_turns_back_into_the_same_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    model(torch.randn(8, 3, 6, 6))  # running statistics that differ from the defaults
    params = list(model.parameters())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 2
    back = plain_batchnorm(synced).eval()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in back.modules()) == 2
    assert all(a is b for a, b in zip(back.parameters(), params))  # the optimizer's parameters, not copies
    assert back[1].running_mean.abs().sum() > 0 and int(back[1].num_batches_tracked) == 1
