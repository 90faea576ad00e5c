"""Shared fixtures: tiny synthetic CIFAR-style folders written by the tests themselves."""
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CLASSES = [f'class{i}' for i in range(10)]


def write_synthetic(root: Path, n_train: int = 12, n_test: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Write `train/` and `test/` folders of PNGs whose class is a distinct colour plus noise (easy to learn)."""
    rng = np.random.default_rng(seed)
    hues = np.linspace(0, 1, len(CLASSES), endpoint=False)
    for split, n in (('train', n_train), ('test', n_test)):
        for c, h in zip(CLASSES, hues):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            base = 255 * np.array([abs(np.sin(np.pi * (h + k / 3))) for k in range(3)])
            for i in range(n):
                img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i:04d}.png')
    return root


@pytest.fixture(scope='session')
def synth(tmp_path_factory) -> Path:
    """A synthetic 10-class dataset (12 train, 4 test images per class), shared by the whole session."""
    return write_synthetic(tmp_path_factory.mktemp('synth') / 'cifar')


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('CIFAR_FA_CACHE', str(tmp_path / 'cache'))


@pytest.fixture(autouse=True)
def _terminal_signals():
    """Each test starts with Ctrl-C and SIGTERM as a terminal's Python has them, whatever a recipe's `main` run in
    this process (or a test runner's worker) left, and leaves them so."""
    sigs = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    before = {sig: signal.signal(sig, handler) for sig, handler in sigs.items()}
    yield
    for sig, handler in before.items(): signal.signal(sig, handler)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run a command line in this process, as `python SCRIPT ARGS` would less Python's start-up, from the repository
    root; `command` is a script's path or a `main(argv)` returning the exit status. Returns a CompletedProcess."""
    def run(command, *args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        monkeypatch.chdir(ROOT)
        capsys.readouterr()
        try:
            if callable(command): code = command(argv)
            else:
                monkeypatch.setattr(sys, 'argv', [str(command), *argv])
                monkeypatch.syspath_prepend(str(Path(command).parent))
                runpy.run_path(str(command), run_name='__main__')
                code = 0
        except SystemExit as e: code = e.code
        out, err = capsys.readouterr()
        if isinstance(code, str): code, err = 1, f'{err}{code}\n'  # as Python reports sys.exit('message')
        return subprocess.CompletedProcess([str(command), *argv], code or 0, out, err)
    return run
