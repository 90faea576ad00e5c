"""The run folder: what it may hold, when it may be replaced, and the checks before a run writes or resumes in it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .callbacks import last_epoch
from .config import RunConfig, RunError, flag, run_settings
from .data import data_name
from .distributed import Processes

__all__ = ['RUN_FILES', 'holds_run', 'no_epoch_done', 'prepare_out']


# what a run folder may hold: the files `run` writes, its checkpoints folder, logs kept beside them, and OS clutter
RUN_FILES = {'config.json', 'summary.txt', 'history.csv', 'curves.png', 'misclassified.png', 'top_losses.png',
             'confusion.png', 'metrics.json', 'model.pkl', 'model.pth', 'lr_find.png'}
_CLUTTER = {'.DS_Store', 'Thumbs.db', '.ipynb_checkpoints'}


def holds_run(out: Path) -> bool:
    """Whether the folder `out` exists with anything in it."""
    return out.is_dir() and any(out.iterdir())


def _run_entry(p: Path) -> bool:
    """Whether `p`, inside a folder, is something a run writes there (or a log or OS clutter beside it)."""
    if p.name == 'checkpoints' and p.is_dir() and not p.is_symlink():  # EpochCheckpoint's and lr_find's files only
        return all(c.name.startswith(('last.', '_tmp.')) and c.is_file() for c in p.iterdir())
    return p.name in _CLUTTER or (p.is_file() and (p.name in RUN_FILES or p.suffix == '.log'))


def _check_replaceable(out: Path) -> None:
    """Refuse to let --overwrite delete a folder that is not a run (a parent of runs, a project, the current folder)."""
    entries = list(out.iterdir())
    others = sorted(p.name for p in entries if not _run_entry(p))
    if out.is_symlink(): why = 'it is a symbolic link; pass the folder it points to'
    elif others: why = f"it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
    elif all(p.suffix == '.log' or p.name in _CLUTTER for p in entries): why = 'it holds only logs'
    elif Path.cwd().resolve().is_relative_to(out.resolve()): why = 'it holds the current folder'
    else: return
    raise RunError(f"{out} is not a run folder ({why}); --overwrite replaces only a run: pass another --out")


def _checked_out(cfg: RunConfig, spec: str, fingerprint: dict, processes: int) -> tuple[Path, dict]:
    """The run folder and, on --resume, its config.json; raises `RunError` on what the run may not do there."""
    out = Path(cfg.out or f'runs/{cfg.recipe}_{cfg.norm}')
    if out.exists() and not out.is_dir(): raise RunError(f"{out} is a file, not a run folder; pass another --out")
    if holds_run(out) and not (cfg.resume or cfg.overwrite):
        raise RunError(f"{out} already holds a run; "
                       "pass --resume to continue it, --overwrite to replace it, or another --out")
    if cfg.resume and last_epoch(out / 'checkpoints') is None:
        raise RunError(f"{out} has no checkpoint to resume from (no epoch finished); start it again with --overwrite")
    prev = json.loads((out / 'config.json').read_text()) if cfg.resume else {}
    if prev.get('spec', spec) != spec:
        raise RunError(f"{out} holds a run of another network ({prev['spec']}); resume it with that --spec")
    if prev.get('data_fingerprint', fingerprint) != fingerprint:
        raise RunError(f"{out} was trained on {prev['data_name']} ({prev['data_path']}), not on the data given "
                       f"({data_name(fingerprint)}); resume it with its own data")
    trained = run_settings(prev) if prev else {}
    if changed := [k for k, v in trained.items() if v != getattr(cfg, k)]:
        was = ', '.join(flag(k, trained[k]) if trained[k] is not None else f"no --{k.replace('_', '-')}"
                        for k in changed)
        raise RunError(f"{out} was trained with {was}; "
                       "resume it with the same settings, or start a new run in another --out")
    if cfg.resume and (n := prev.get('processes', 1)) != processes:
        how = 'in one process, without a launcher' if n == 1 else f'with {n} (torchrun --nproc_per_node {n})'
        raise RunError(f"{out} was trained by {n} process{'es' * (n > 1)}, not {processes}: resume it {how}")
    if cfg.overwrite and not cfg.resume and holds_run(out): _check_replaceable(out)
    return out, prev


def prepare_out(cfg: RunConfig, spec: str, fingerprint: dict, procs: Processes | None = None) -> tuple[Path, dict]:
    """The run folder, checked and made, and on --resume the config.json of the run it continues. Every process checks
    (so that all stop on the same error), rank 0 alone makes it."""
    procs = procs or Processes()
    out, prev = _checked_out(cfg, spec, fingerprint, procs.count)
    procs.wait()  # no process checks a folder that rank 0 has begun to change
    if procs.main:
        if cfg.overwrite and not cfg.resume and holds_run(out):
            try: shutil.rmtree(out)
            except OSError as e:
                raise RunError(f"cannot remove {out} ({e.strerror or e}); "
                               "remove it yourself or pass another --out") from None
        try: out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot make the run folder {out} ({e.strerror}); pass another --out") from None
    procs.wait()
    return out, prev


def no_epoch_done(out: Path) -> bool:
    """Whether the run folder `out` holds no finished run and no finished epoch: nothing a fresh start would lose."""
    return not (out / 'metrics.json').exists() and last_epoch(out / 'checkpoints') is None
