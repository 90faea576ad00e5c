import errno
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import ROOT

S8 = str(ROOT / 'recipes' / 's8_norms.py')
BENCH = ROOT / 'benchmarks' / 'bench.py'


def recipe(*args, script=S8, timeout=600):
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'MPLBACKEND': 'Agg'}
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_dry_run(cli):
    r = cli(S8, '--norm', 'all', '--dry-run', '--data', '/nonexistent')  # loads no data
    assert r.returncode == 0, r.stderr
    summaries = r.stdout.split('SpecNet(')[1:]
    assert len(summaries) == 3 and all('parameters: 48,138' in t and 'constraints: ok' in t and 'n_out' in t
                                       for t in summaries)
    assert ['GroupNorm' in t for t in summaries] == [False, True, True]  # bn, gn, ln


NARROW = 'C1:8 C2:16 c3:8 P1 C3:16 C4:16 C5:16+C3 c6:8 P2 C7:16 C8:16 C9:16+C7 GAP C10'  # S8's skeleton, fewer channels


def test_spec_replaces_the_recipes_network(cli):
    r = cli(S8, '--spec', NARROW, '--dry-run', '--data', '/nonexistent')
    assert r.returncode == 0 and f'spec: {NARROW}\n' in r.stdout and 'constraints: ok' in r.stdout, r.stderr
    assert 'parameters: 48,138' not in r.stdout
    bad = cli(S8, '--spec', 'C1:16 X', '--dry-run')
    assert bad.returncode == 2 and bad.stderr.startswith('error: --spec: spec token') and 'Traceback' not in bad.stderr
    shapes = cli(S8, '--spec', NARROW.replace('C5:16+C3', 'C5:16+C2'), '--dry-run')  # C2 is 32x32, C5 16x16
    assert (shapes.returncode == 2
            and shapes.stderr == 'error: --spec: spec layer C5 (16x16) cannot add C2 (32x32)\n'), shapes.stderr
    empty = cli(S8, '--spec', '', '--dry-run')  # not the recipe's own network
    assert empty.returncode == 2 and empty.stderr == 'error: --spec: the spec is empty\n', empty.stderr
    wide = cli(S8, '--spec', NARROW.replace(':16', ':64'), '--dry-run')  # the assignment's budget still applies
    assert wide.returncode == 2 and 'parameters' in wide.stderr and 'Traceback' not in wide.stderr, wide.stderr


def test_end_to_end_run(synth, tmp_path):
    out = tmp_path / 'run'
    r = recipe('--norm', 'ln', '--data', synth, '--epochs', 2, '--bs', 32, '--workers', 0, '--out', out)
    assert r.returncode == 0, r.stderr
    assert 'epoch 1' in r.stdout and '\x1b' not in r.stdout  # plain epoch lines in a log, no progress bars
    m = json.loads((out / 'metrics.json').read_text())
    assert m['norm'] == 'ln' and m['epochs'] == 2 and (out / 'model.pkl').exists()
    again = recipe('--norm', 'ln', '--data', synth, '--epochs', 2, '--out', out)
    assert again.returncode == 2 and 'already holds a run' in again.stderr and 'Traceback' not in again.stderr


def test_resume_keeps_the_runs_settings(synth, tmp_path, cli):
    args = ['--data', synth, '--epochs', 1, '--bs', 32, '--workers', 0, '--out', tmp_path / 'run']
    assert cli(S8, *args).returncode == 0
    r = cli(S8, *args, '--resume', '--spec', NARROW)
    assert r.returncode == 2 and 'holds a run of another network' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    # a longer cycle would not be the run config.json records
    r = cli(S8, *args, '--resume', '--epochs', 2, '--lr', 0.05)
    assert (r.returncode == 2
            and r.stderr.startswith(f"error: {tmp_path / 'run'} was trained with --lr 0.1, --epochs 1; ")), r.stderr
    metrics = (tmp_path / 'run' / 'metrics.json').read_text()
    r = cli(S8, *args, '--resume', '--workers', 1)  # where and how fast may change
    assert r.returncode == 0 and 'is a finished run; nothing to resume' in r.stdout, r.stderr
    assert (tmp_path / 'run' / 'metrics.json').read_text() == metrics


def _children(pid: int) -> list[str]:
    with open(f'/proc/{pid}/task/{pid}/children') as f: return f.read().split()


@pytest.mark.parametrize('workers,group', [(0, False), (2, True)])
def test_sigterm_leaves_a_resumable_run(synth, tmp_path, workers, group):
    out, args = tmp_path / 'run', ['--data', synth, '--epochs', 8, '--bs', 4, '--workers', workers]
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'MPLBACKEND': 'Agg'}
    p = subprocess.Popen([sys.executable, S8, *map(str, args), '--out', str(out)], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=group)
    while not (out / 'checkpoints' / 'last.json').exists() and p.poll() is None: time.sleep(0.05)
    while workers and len(_children(p.pid)) < workers and p.poll() is None: time.sleep(0.05)
    if group: os.killpg(p.pid, signal.SIGTERM)  # as `pkill -f` or a cluster's scheduler: the DataLoader workers too
    else: p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and '--resume' in err and 'Traceback' not in err, err
    assert not (out / 'metrics.json').exists()
    cfg = json.loads((out / 'config.json').read_text())
    # as if begun on another machine
    (out / 'config.json').write_text(json.dumps({**cfg, 'device_name': 'GPU X', 'devices': ['GPU X']}))
    r = recipe(*args, '--out', out, '--resume')
    assert r.returncode == 0, r.stderr
    m = json.loads((out / 'metrics.json').read_text())
    assert m['epochs'] == 8 and m['device'].startswith('GPU X, then CPU (')


def test_sigterm_with_a_pending_sigchld_is_one_interrupt():
    # SIGTERM to the process group: the workers' SIGCHLD can be pending when the SIGTERM handler runs
    code = """if True:
        import signal, threading
        from cifar_fa.system import stop_on_signals
        signal.signal(signal.SIGCHLD, lambda *a: print('SIGCHLD handled'))  # as torch's DataLoader installs one
        stop_on_signals()
        both = {signal.SIGTERM, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, both)
        # to this thread: torch's threads do not block them and would take a signal sent to the process
        for sig in both:
            signal.pthread_kill(threading.get_ident(), sig)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # both handlers run now, SIGTERM's first
            print('not interrupted')
        except KeyboardInterrupt:
            print('interrupted')
        print('done')"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert (r.returncode == 0 and r.stdout.split() == ['interrupted', 'done']
            and 'Traceback' not in r.stderr), (r.stdout, r.stderr)


def test_an_error_after_a_swallowed_interrupt_is_the_interrupt():
    # Ctrl-C lands in logging's at-fork hook while workers start, which swallows its KeyboardInterrupt; the worker it
    # ended is then found missing, which torch reports as an error of its own
    code = """if True:
        import signal
        from cifar_fa.system import stop_on_signals, stop_requested
        stop_on_signals()
        worker_gone = RuntimeError('DataLoader worker (pid(s) 123) exited unexpectedly')
        print(stop_requested(worker_gone))
        try: signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt: pass
        print(stop_requested(worker_gone))"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0 and r.stdout.split() == ['False', 'True'], (r.stdout, r.stderr)


def test_sigterm_to_a_worker_still_starting_ends_it_quietly():
    # `pkill -f` reaches a DataLoader worker while multiprocessing's at-fork hooks still run, before torch's worker
    # loop could catch a KeyboardInterrupt: the inherited handler must end the worker, not print a traceback
    code = """if True:
        import multiprocessing as mp, os, signal
        from multiprocessing.util import register_after_fork
        from cifar_fa.system import signalled, stop_on_signals
        stop_on_signals()
        class Hook: pass
        hook = Hook()
        register_after_fork(hook, lambda _: os.kill(os.getpid(), signal.SIGTERM))
        p = mp.get_context('fork').Process(target=print, args=('worker ran',))
        p.start(); p.join()
        print(p.exitcode, signalled())"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0 and r.stdout.split() == [str(-signal.SIGTERM), 'False'], (r.stdout, r.stderr)
    assert 'Traceback' not in r.stderr, r.stderr


def test_sigterm_during_a_loader_iterators_start_is_one_interrupt():
    # SIGTERM inside _MultiProcessingDataLoaderIter.__init__ leaves the iterator half built,
    # as `__new__` alone does here
    code = """if True:
        import signal
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
        from cifar_fa.system import stop_on_signals
        stop_on_signals()
        try: signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt: print('interrupted')
        half_built = _MultiProcessingDataLoaderIter.__new__(_MultiProcessingDataLoaderIter)
        del half_built
        class Other:
            def __del__(self): raise ValueError('other cleanup errors are still reported')
        other = Other()
        del other
        print('done')"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0 and r.stdout.split() == ['interrupted', 'done'], (r.stdout, r.stderr)
    assert ('_MultiProcessingDataLoaderIter' not in r.stderr
            and 'other cleanup errors are still reported' in r.stderr), r.stderr


def test_refused_memory_is_one_line_and_resumable(synth, tmp_path, monkeypatch, capsys):
    from cifar_fa import main
    from recipes.s8_norms import RECIPE
    out, fork = tmp_path / 'run', os.fork
    args = ['--data', str(synth), '--epochs', '2', '--bs', '32', '--out', str(out)]

    def fork_after_first_epoch():  # as when the kernel refused to fork a worker from a heap that outgrew RAM
        if (out / 'checkpoints' / 'last.json').exists(): raise OSError(errno.ENOMEM, 'Cannot allocate memory')
        return fork()
    monkeypatch.setattr(os, 'fork', fork_after_first_epoch)
    with pytest.raises(SystemExit) as e: main(RECIPE, [*args, '--workers', '1'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'refused memory' in err and '--resume' in err and 'Traceback' not in err
    assert not (out / 'metrics.json').exists()
    monkeypatch.setattr(os, 'fork', fork)
    assert main(RECIPE, [*args, '--workers', '0', '--resume'])['epochs'] == 2


@pytest.mark.parametrize('args,msg', [
    (['--data', '/no/such/dir'], 'does not exist'),
    (['--epochs', 21], "above this recipe's cap of 20"),
    (['--device', 'cuda'], 'no CUDA GPU'),
    (['--device', 'tpu'], 'use auto, cpu, cuda or cuda:N'),
    (['--out', 'FILE'], 'is a file, not a run folder'),
    (['--out', 'FILE/run'], 'cannot make the run folder'),
    (['--outside-assignment', '--spec', 'C1:8 GAP O:5'], 'outputs 5 values per image but the data has 10 classes'),
    (['--subset', 2, '--bs', 32], 'error: 20 training images make no full batch of 32; lower --bs or raise --subset'),
])
def test_bad_input_one_line(args, msg, synth, tmp_path, cli):
    if 'cuda' in args and torch.cuda.is_available(): pytest.skip('a GPU is present')
    (tmp_path / 'FILE').touch()
    args = [str(a).replace('FILE', str(tmp_path / 'FILE')) for a in args]
    r = cli(S8, '--data', synth, '--bs', 32, '--out', tmp_path / 'run', *args)  # a later option wins
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'run').exists()


def test_s9_augmentations_have_no_batch_version(synth, tmp_path, cli):
    r = cli(ROOT / 'recipes' / 's9_augmented.py', '--batch-augs', '--data', synth, '--out', tmp_path / 'run')
    assert r.returncode == 2 and r.stderr.strip() == ('error: --batch-augs: Affine, CoarseDropout has no batch version '
                                                      '(only a reflect-pad and random crop back to 32x32, then a '
                                                      'horizontal flip, have one); drop --batch-augs'), r.stderr
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('args', [['--norm', 'xx'], ['--epochs', 0], ['--bs', -4], ['--lr', 0], ['--lr', 'nan'],
                                  ['--lr', 'inf'], ['--wd', -1], ['--dropout', 1], ['--label-smoothing', 1.5],
                                  ['--workers', -1], ['--seed', -1], ['--seed', 2 ** 64], ['--seed', '9' * 400],
                                  ['--resume', '--overwrite']])
def test_bad_options_rejected(args, cli):
    r = cli(S8, *args, '--dry-run')
    assert (r.returncode == 2 and 'Traceback' not in r.stderr
            and any(f'argument {a}: ' in r.stderr for a in args)), r.stderr


@pytest.mark.skipif(not os.environ.get('CIFAR10_DIR'), reason='needs the real CIFAR-10 (set CIFAR10_DIR)')
def test_real_data_smoke(tmp_path):
    out = tmp_path / 'real'
    r = recipe('--norm', 'gn', '--subset', 100, '--epochs', 2, '--bs', 32, '--out', out)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / 'metrics.json').read_text())
    assert m['n_test'] == 10_000 and m['subset'] == 100 and len(m['per_class_accuracy']) == 10
    h = pd.read_csv(out / 'history.csv')
    # too short to beat chance reliably
    assert len(h) == 2 and h.train_loss[1] < h.train_loss[0] and h.valid_loss.notna().all()


def test_norm_all_writes_comparison(synth, tmp_path, cli):
    r = cli(S8, '--norm', 'all', '--data', synth, '--epochs', 1, '--bs', 32, '--workers', 0, '--out', tmp_path)
    assert r.returncode == 0, r.stderr
    for n in ('bn', 'gn', 'ln'): assert (tmp_path / f's8_{n}' / 'metrics.json').exists()
    table = (tmp_path / 's8_comparison.md').read_text()
    assert table.count('| [s8_') == 3 and '48,138' in table and (tmp_path / 's8_comparison.png').stat().st_size
    assert '| [s8_ln]' in r.stdout  # the table is printed too
    assert '`recipes/s8_norms.py --norm gn --opt sgd --lr 0.1 --wd 0.0005 --bs 32 --epochs 1 ' in table
    shutil.rmtree(tmp_path / 's8_gn')  # as if interrupted before gn began ...
    shutil.rmtree(tmp_path / 's8_ln' / 'checkpoints')  # ... or in ln's first epoch: config.json and history.csv
    (tmp_path / 's8_ln' / 'metrics.json').unlink()  # written, no checkpoint
    bn_model = (tmp_path / 's8_bn' / 'model.pth').stat().st_mtime_ns
    r = cli(S8, '--norm', 'all', '--data', synth, '--epochs', 1, '--bs', 32, '--workers', 0, '--out', tmp_path,
               '--resume')
    assert r.returncode == 0 and r.stdout.count('is a finished run; nothing to resume') == 1, r.stderr
    assert all((tmp_path / f's8_{n}' / 'metrics.json').exists() for n in ('gn', 'ln'))
    assert (tmp_path / 's8_bn' / 'model.pth').stat().st_mtime_ns == bn_model  # the finished norm is left as it was
    assert (tmp_path / 's8_comparison.md').read_text().count('| [s8_') == 3


def test_epoch_cap_override_is_explicit(cli):
    assert cli(S8, '--epochs', 21, '--dry-run').returncode == 2
    r = cli(S8, '--epochs', 21, '--outside-assignment', '--dry-run')
    assert (r.returncode == 0
            and 'constraints: not met, not enforced (--outside-assignment): --epochs 21 is above' in r.stdout)
    assert 'constraints: ok' not in r.stdout
    assert 'constraints: ok' in cli(S8, '--outside-assignment', '--dry-run').stdout  # a model that meets them says so


def test_explore_notebook_runs(synth, monkeypatch):
    nbformat, nbclient = pytest.importorskip('nbformat'), pytest.importorskip('nbclient')
    nb = nbformat.read(ROOT / 'recipes' / 'explore.ipynb', as_version=4)
    assert not any(c.get('outputs') for c in nb.cells), 'commit the notebook without outputs'
    monkeypatch.setenv('CIFAR10_DIR', str(synth))
    monkeypatch.setenv('EXPLORE_EPOCHS', '1')
    monkeypatch.setenv('EXPLORE_SUBSET', '4')
    monkeypatch.setenv('EXPLORE_BS', '8')
    monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')  # inline figures, as in Jupyter
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(ROOT / 'recipes')}}).execute()
    images = [o for c in nb.cells for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert len(images) >= 4  # show_batch, lr_find, top losses, confusion matrix
    assert 'valley' in ''.join(o['data'].get('text/plain', '') for c in nb.cells for o in c.get('outputs', [])
                               if 'data' in o)


def test_norm_defaults_apply_unless_the_option_is_given():
    from dataclasses import replace

    from cifar_fa.cli import config_from_args
    rec = replace(importlib.import_module('recipes.s8_norms').RECIPE, norm_defaults={'gn': {'bs': 32, 'lr': 0.05}})
    bs = rec.defaults['bs']
    assert (config_from_args(rec, ['--norm', 'gn']).bs, config_from_args(rec, ['--norm', 'gn']).lr) == (32, 0.05)
    assert config_from_args(rec, ['--norm', 'gn', '--bs', str(bs)]).bs == bs  # given, even equal to the recipe default
    assert config_from_args(rec, ['--norm', 'bn']).bs == bs
    assert [config_from_args(rec, ['--norm', 'all', '--lr', '0.2'], norm=n).lr for n in ('bn', 'gn')] == [0.2, 0.2]
    assert config_from_args(rec, ['--norm', 'all'], norm='gn').bs == 32 == rec.settings('gn')['bs']
    # gn and ln: standardized convs; every norm: batches of 64
    s8 = importlib.import_module('recipes.s8_norms').RECIPE
    assert [config_from_args(s8, ['--norm', n]).ws for n in ('bn', 'gn', 'ln')] == [False, True, True]
    assert (not config_from_args(s8, ['--norm', 'ln', '--no-ws']).ws
            and config_from_args(s8, ['--norm', 'bn', '--ws']).ws)
    assert [config_from_args(s8, ['--norm', n]).bs for n in ('bn', 'gn', 'ln')] == [64, 64, 64]


@pytest.mark.parametrize('script', ['s8_norms', BENCH])  # the other recipes import what s8_norms does
def test_no_network_call_on_import(script):
    code = ('import runpy, sys, urllib.request\n'
            'def refuse(*a, **k): raise SystemExit(f"network call: {a[1:]}")\n'  # albumentations catches Exception only
            'urllib.request.OpenerDirector.open = refuse\n'
            'sys.argv = [sys.argv[1], "--help"]\n'
            'runpy.run_path(sys.argv[0], run_name="__main__")\n')
    env = {k: v for k, v in os.environ.items() if k != 'NO_ALBUMENTATIONS_UPDATE'}
    path = script if script == BENCH else ROOT / 'recipes' / f'{script}.py'
    r = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and 'network call' not in r.stderr, r.stderr


@pytest.mark.parametrize('module,params', [('s7_dilated_separable', '911,658'), ('s9_augmented', '196,106')])
def test_s7_s9_dry_run(module, params, capsys):
    from cifar_fa import main
    # every norm, in this process
    main(importlib.import_module(f'recipes.{module}').RECIPE, ['--norm', 'all', '--dry-run'])
    out = capsys.readouterr().out
    assert out.count(f'parameters: {params}') == 3 and out.count('constraints: ok') == 3


def test_s9_epoch_cap(capsys):
    from cifar_fa import main
    from recipes.s9_augmented import RECIPE
    with pytest.raises(SystemExit) as e: main(RECIPE, ['--epochs', '41', '--dry-run'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cap of 40" in err and 'Traceback' not in err


def test_s9_cutout_is_one_16x16_hole_of_the_mean():
    import copy

    import albumentations as A
    import numpy as np

    from cifar_fa import CIFAR_MEAN_RGB
    from recipes.s9_augmented import AUGS
    cutout = copy.deepcopy(next(a for a in AUGS if isinstance(a, A.CoarseDropout)))
    cutout.p = 1.
    for seed in range(5):
        cutout.set_random_seed(seed)
        img = np.full((32, 32, 3), 7, np.uint8)
        hole = np.all(cutout(image=img)['image'] == CIFAR_MEAN_RGB, axis=-1)
        ys, xs = np.nonzero(hole)
        assert hole.sum() == 16 * 16 and np.ptp(ys) == 15 and np.ptp(xs) == 15  # one filled square


def test_benchmark_runs_on_a_tiny_input(synth):
    r = recipe('--data', synth, '--batches', 2, '--bs', 8, '--workers', 0, script=BENCH)
    assert r.returncode == 0, r.stderr
    for figure in ('pipeline ratio', 'training time ratio', 'peak resident memory'):
        assert re.search(rf'^{figure}.*\s[\d.]+$', r.stdout, re.M), r.stdout


def test_timing_benchmark_times_each_recipe_in_its_own_process(synth, tmp_path, cli):
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'timing.py'), '--recipes', 's8', 's7', '--data',
                        str(synth), '--out', str(tmp_path), '--', '--subset', '2', '--epochs', '1', '--bs', '8',
                        '--device', 'cpu', '--workers', '0'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.strip().splitlines()
    assert header.startswith('recipe | process s | startup s') and [x.split(' | ')[0] for x in rows] == ['s8', 's7']
    for line in rows:
        cells = line.split(' | ')
        assert float(cells[1]) > float(cells[2]) > 0 and cells[-1].startswith('CPU')  # the process outlasts start-up
    assert (tmp_path / 's7' / 'metrics.json').exists()
    bad = cli(ROOT / 'benchmarks' / 'timing.py', '--recipes', 's8', '--out', tmp_path, '--', '--data', '/no/such/dir')
    assert bad.returncode == 1 and bad.stderr.strip() == (
        's8 failed (exit status 2): error: /no/such/dir does not exist; pass --data with a CIFAR-10 folder or .tgz '
        '(or set CIFAR10_DIR)')


@pytest.mark.parametrize('args,msg', [
    (['--batches', 0], 'argument --batches: must be positive'),
    (['--repeats', 0], 'argument --repeats: must be positive'),
    (['--workers', -1], 'argument --workers: must be zero or more'),
    (['--data', '/no/such/dir'], 'error: /no/such/dir does not exist'),
    (['--device', 'tpu'], 'error: --device tpu is not one'),
    (['--batches', 15], 'error: --batches 15 needs 16 training batches of 8 (one warms up), but'),  # synth holds 15
])
def test_benchmark_bad_input_one_line(args, msg, synth, cli):
    r = cli(BENCH, '--data', synth, '--batches', 2, '--bs', 8, '--workers', 0, '--repeats', 1, *args)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and msg in r.stderr.strip().splitlines()[-1], r.stderr
