"""What a run is asked to do: a recipe, the settings of one run, and the command-line flag of each setting."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Sequence

from fastai.optimizer import SGD, Adam

from .augment import A
from .constraints import Constraints
from .optim import nesterov_sgd

__all__ = ['OPTIMIZERS', 'RUN_SETTINGS', 'Recipe', 'RunConfig', 'RunError', 'flag', 'run_settings']


# fit_one_cycle drives the momentum (0.95 -> 0.85 -> 0.95); fastai's SGD only keeps momentum if built with some
OPTIMIZERS = {'adam': Adam, 'sgd': partial(SGD, mom=0.9, decouple_wd=False), 'nesterov': nesterov_sgd}


class RunError(ValueError):
    """A run cannot start as asked; the message says what to do."""


@dataclass(frozen=True)
class Recipe:
    """An assignment: its model spec, training-only augmentations, constraints and default hyperparameters."""
    name: str
    spec: str
    augs: Sequence[A.BasicTransform]
    constraints: Constraints
    defaults: dict = field(default_factory=dict)
    norm_defaults: dict = field(default_factory=dict)  # {norm: {setting: value}}: where a norm's defaults differ
    tta: bool = False  # also report the test accuracy with flip test-time augmentation (never replaces the plain one)

    def settings(self, norm: str) -> dict:
        """Every run setting's default for `norm`: `RunConfig`'s, then the recipe's, then the norm's own."""
        return {**_DEFAULTS, **self.defaults, **self.norm_defaults.get(norm, {}), 'norm': norm}


@dataclass
class RunConfig:
    """Resolved settings of one run (saved as config.json)."""
    recipe: str
    norm: str = 'bn'
    epochs: int = 20
    bs: int = 128
    opt: str = 'adam'  # a key of OPTIMIZERS: adam, sgd (momentum, L2) or nesterov (Nesterov's momentum, L2)
    lr: float | str = 1e-2  # max learning rate of the one cycle, or 'find' for lr_find's valley
    wd: float = 1e-2  # adam: decoupled (AdamW); sgd, nesterov: L2 as torch.optim.SGD; none on norm weights and biases
    dropout: float = 0.
    ws: bool = False  # weight-standardized convs
    act: str = 'relu'  # a key of ACTIVATIONS: the nonlinearity after every norm
    whiten: bool = False  # the first conv starts as a whitening of the training patches (`SpecNet.init_whitening`)
    size: int = 32  # side in px of the images the network sees: batches are resized (bilinear) where not 32
    label_smoothing: float = 0.
    ema: float = 0.  # decay of the weights' moving average that validates and is exported; 0: the weights themselves
    lookahead: bool = False  # wrap the optimizer in Lookahead (`optim.lookahead`)
    bias_lr: float = 1.  # the norm layers' biases train at this multiple of the rate (airbench: 64)
    batch_augs: bool = False  # the recipe's augmentations on whole batches on the device (`batch_tfms_for`)
    seed: int = 42
    workers: int | None = None
    deterministic: bool = True  # cuDNN's deterministic kernels; off: cuDNN times its kernels and keeps the fastest
    device: str = 'auto'
    data: str | None = None
    subset: int | None = None
    holdout: int | None = None  # validate on this many training images (`holdout_files`), not on the test split
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    outside_assignment: bool = False
    spec: str | None = None  # the network; None: the recipe's SPEC


_DEFAULTS = {f.name: f.default for f in fields(RunConfig) if f.name != 'recipe'}

# what a run trains, besides its spec (the other settings say where and how fast): a resumed run keeps them all
RUN_SETTINGS = ('norm', 'opt', 'lr', 'wd', 'bs', 'epochs', 'label_smoothing', 'ema', 'lookahead', 'dropout', 'ws',
                'act', 'whiten', 'size', 'batch_augs', 'bias_lr', 'seed', 'subset', 'holdout')


def run_settings(saved: dict) -> dict:
    """The `RUN_SETTINGS` a run's config.json records; one added after the run was made has `RunConfig`'s default,
    with which the run trained (every new setting starts off)."""
    return {k: saved.get(k, _DEFAULTS[k]) for k in RUN_SETTINGS}


def flag(name: str, value: object) -> str:
    """The command-line option that sets setting `name` to `value` (`--ws` / `--no-ws` for booleans)."""
    opt = name.replace('_', '-')
    if isinstance(value, bool): return f'--{opt}' if value else f'--no-{opt}'
    # :g keeps 6 digits
    if isinstance(value, float): value = f'{value:g}' if float(f'{value:g}') == value else repr(value)
    return f'--{opt} {value}'
