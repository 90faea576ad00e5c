"""The one command-line parser and entry point shared by every recipe."""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Iterator

from .callbacks import DivergedError
from .config import OPTIMIZERS, Recipe, RunConfig, RunError, flag
from .constraints import ConstraintError
from .data import DataError
from .distributed import launched
from .layers import ACTIVATIONS, NORMS
from .models import SpecNet
from .runfolder import holds_run, no_epoch_done
from .system import memory_refused, signalled, stop_on_signals, stop_requested
from .train import build_model, describe, run

__all__ = ['parser', 'config_from_args', 'main', 'positive', 'non_negative', 'one_line_errors']


def _number(kind: type, ok: Callable, need: str) -> Callable[[str], float]:
    def parse(s: str):
        v = kind(s)
        if (kind is float and not math.isfinite(v)) or not ok(v):
            raise argparse.ArgumentTypeError(f'must be {need}, got {s}')
        return v
    return parse


def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a finite `kind` above zero."""
    return _number(kind, lambda v: v > 0, 'positive')


def non_negative(kind: type) -> Callable[[str], float]:
    """An argparse type: a finite `kind` of zero or more."""
    return _number(kind, lambda v: v >= 0, 'zero or more')


_fraction = _number(float, lambda v: 0 <= v < 1, 'at least 0 and below 1')
_seed = _number(int, lambda v: 0 <= v < 2 ** 32, f'from 0 to {2 ** 32 - 1:,}')  # what numpy's seeding accepts


def _lr(s: str) -> float | str:
    return s if s == 'find' else positive(float)(s)


def _default_norm(recipe: Recipe) -> str:
    return recipe.defaults.get('norm', RunConfig.norm)


def parser(recipe: Recipe, given_only: bool = False) -> argparse.ArgumentParser:
    """Argument parser for `recipe`; defaults shown are the recipe's own for its default norm (`given_only`: no
    defaults, so that a parsed namespace holds the options given and nothing else)."""
    d = (defaultdict(lambda: argparse.SUPPRESS) if given_only
         else {**recipe.settings(_default_norm(recipe)), 'dry_run': False})
    per_norm = '; '.join(f"--norm {n}: " + ' '.join(flag(k, v) for k, v in kw.items())
                         for n, kw in recipe.norm_defaults.items())
    p = argparse.ArgumentParser(description=f'Train the {recipe.name} recipe on CIFAR-10 and write a run folder.',
                                epilog=per_norm and 'defaults that differ per norm (an option given overrides them): '
                                                    f'{per_norm}',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--norm', choices=[*NORMS, 'all'], default=d['norm'],
                   help="normalization layer; 'all' trains each in turn and writes a comparison")
    p.add_argument('--data', default=d['data'],
                   help='CIFAR-10 folder (train/, test/) or .tgz of one; default $CIFAR10_DIR, '
                        "else fastai's untar_data(URLs.CIFAR)")
    p.add_argument('--epochs', type=positive(int), default=d['epochs'], help='epochs of the one cycle')
    p.add_argument('--bs', type=positive(int), default=d['bs'], help='batch size')
    p.add_argument('--opt', choices=list(OPTIMIZERS), default=d['opt'], help='optimizer')
    p.add_argument('--lr', type=_lr, default=d['lr'], help="max learning rate of the one cycle, or 'find'")
    p.add_argument('--wd', type=non_negative(float), default=d['wd'],
                   help='weight decay (adam: decoupled; sgd, nesterov: L2)')
    p.add_argument('--dropout', type=_fraction, default=d['dropout'],
                   help='channel dropout (Dropout2d) after every conv block')
    p.add_argument('--ws', action=argparse.BooleanOptionalAction, default=d['ws'],
                   help='weight-standardized convs (zero-mean, unit-variance filters)')
    p.add_argument('--act', choices=list(ACTIVATIONS), default=d['act'], help='the nonlinearity after every norm')
    p.add_argument('--whiten', action=argparse.BooleanOptionalAction, default=d['whiten'],
                   help="start the first conv as a whitening of the training images' patches (airbench), a plain "
                        'conv even with --ws')
    p.add_argument('--size', type=positive(int), default=d['size'],
                   help='side in px of the images the network sees: every batch (train and test) is resized to it')
    p.add_argument('--label-smoothing', type=_fraction, default=d['label_smoothing'],
                   help='label smoothing of the loss')
    p.add_argument('--ema', type=_fraction, default=d['ema'], metavar='DECAY',
                   help='validate and export a moving average of the weights, updated after every step with this '
                        'decay (e.g. 0.999); 0: the weights themselves')
    p.add_argument('--lookahead', action=argparse.BooleanOptionalAction, default=d['lookahead'],
                   help='wrap the optimizer in Lookahead: every 6 steps the weights move half the way back to where '
                        'they were 6 steps before (fastai)')
    p.add_argument('--bias-lr', type=positive(float), default=d['bias_lr'], metavar='MULTIPLE',
                   help="the norm layers' biases train at this multiple of the learning rate (airbench: 64)")
    p.add_argument('--batch-augs', action=argparse.BooleanOptionalAction, default=d['batch_augs'],
                   help="run the recipe's augmentations on whole batches on the training device instead of per image "
                        "in the DataLoader workers (reflect-pad, random crop and flip only: S7, S8)")
    p.add_argument('--seed', type=_seed, default=d['seed'], help='seed of every random generator')
    p.add_argument('--workers', type=non_negative(int), default=d['workers'],
                   help='DataLoader workers (default: min(4, CPUs))')
    p.add_argument('--device', default=d['device'], help='auto, cpu or cuda')
    p.add_argument('--deterministic', action=argparse.BooleanOptionalAction, default=d['deterministic'],
                   help="CUDA: cuDNN's deterministic kernels (a rerun repeats the run); --no-deterministic lets cuDNN "
                        "pick the fastest for each layer, which may change the last digits")
    p.add_argument('--spec', default=d['spec'],
                   help="the network as a spec string (README: Models are specs) instead of the "
                        "recipe's SPEC; the assignment's constraints still apply")
    p.add_argument('--subset', type=positive(int), default=d['subset'],
                   help='use N training images per class (quick looks)')
    p.add_argument('--holdout', type=positive(int), default=d['holdout'], metavar='N',
                   help='validate on N training images (the same N for every run: for choosing settings) instead of '
                        'the test split, which the run then never reads')
    p.add_argument('--out', default=d['out'],
                   help="run folder (default runs/<recipe>_<norm>); with --norm all, the folder "
                        "that holds one per norm and the comparison (default runs)")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument('--resume', action='store_true', default=d['resume'],
                      help="continue the run in --out from its last checkpoint")
    keep.add_argument('--overwrite', action='store_true', default=d['overwrite'], help='replace an existing run folder')
    p.add_argument('--outside-assignment', action='store_true', default=d['outside_assignment'],
                   help="skip the assignment's constraint checks (the run's metrics say so)")
    p.add_argument('--dry-run', action='store_true', default=d['dry_run'],
                   help='build and check the model, print its summary, load no data')
    return p


def config_from_args(recipe: Recipe, argv: list[str] | None = None, **overrides) -> RunConfig:
    """A `RunConfig` from command-line arguments: an option given wins, then the norm's defaults, then the recipe's."""
    given = vars(parser(recipe, given_only=True).parse_args(argv))
    norm = overrides.get('norm', given.get('norm', _default_norm(recipe)))
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{**recipe.settings(norm), **{k: v for k, v in given.items() if k in known},
                        'recipe': recipe.name, **overrides})


_RESUME_HINT = 'finished epochs are checkpointed; run the same command with --resume to continue'


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Stop with one line on stderr and exit status 2 on the errors a user can fix: bad input, broken constraints."""
    try: yield
    except (ConstraintError, DataError, RunError, DivergedError) as e:
        if not launched().main and _stopped_meanwhile(): sys.exit(2)  # rank 0 met it too, and said it
        print(f'error: {str(e).strip().splitlines()[-1].strip()}', file=sys.stderr)  # fastai prefixes callback errors
        sys.exit(2)


def _stopped_meanwhile(seconds: float = 10) -> bool:
    """Wait up to `seconds` for the launcher to stop this process; whether it did. Every process of a launch meets the
    same bad input; rank 0 says it, and the launcher stops the others as soon as one ends, so the others wait for that
    rather than end first, which could stop rank 0 before it has said it."""
    try: time.sleep(seconds)
    except KeyboardInterrupt: return True  # SIGTERM, through `stop_on_signals`
    return False


def _constraints_line(recipe: Recipe, cfg: RunConfig, model: SpecNet) -> str:
    if cfg.outside_assignment:  # build_model skipped the check
        try: recipe.constraints.check(model, cfg.epochs, cfg.size)
        except ConstraintError as e: return f'constraints: not met, not enforced (--outside-assignment): {e}'
    return 'constraints: ok'


def main(recipe: Recipe, argv: list[str] | None = None) -> dict | None:
    """Parse `argv`, check the model and train it; errors become one line on stderr and exit status 2."""
    args = parser(recipe).parse_args(argv)
    stop_on_signals()
    norms = list(NORMS) if args.norm == 'all' else [args.norm]
    parent = Path(args.out or 'runs') if args.norm == 'all' else None
    cfgs = [config_from_args(recipe, argv, norm=n, **({'out': str(parent / f'{recipe.name}_{n}')} if parent else {}))
            for n in norms]
    # the norms an interrupted --norm all never reached, or stopped in their first epoch, start afresh
    if parent and args.resume:
        cfgs = [replace(c, resume=False, overwrite=holds_run(Path(c.out))) if no_epoch_done(Path(c.out)) else c
                for c in cfgs]
    try:
        with one_line_errors():
            models = [build_model(recipe, cfg) for cfg in cfgs]  # every variant is checked before any trains
            if args.dry_run:
                for cfg, model in zip(cfgs, models):
                    print(model, '\n', describe(recipe, model), _constraints_line(recipe, cfg, model), sep='')
                return None
            results = [run(recipe, cfg, model) for cfg, model in zip(cfgs, models)]
    except (MemoryError, OSError) as e:
        if not memory_refused(e): raise
        # e.g. forking the DataLoader workers when the process's memory outgrew the machine's (README: memory notes)
        print(f"error: the system refused memory{f' ({e})' if str(e) else ''}; {_RESUME_HINT}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, RuntimeError) as e:
        if not stop_requested(e): raise
        signalled(clear=True)
        if launched().main: print(f'\ninterrupted: {_RESUME_HINT}', file=sys.stderr)
        sys.exit(130)
    if parent and launched().main:
        from .report import (
            write_comparison,  # here: `python -m cifar_fa.report` warns if importing cifar_fa already did
        )
        print(write_comparison([Path(c.out) for c in cfgs], parent / f'{recipe.name}_comparison',
                               f'{recipe.name}: {", ".join(norms)} compared'))
    return results[-1]
