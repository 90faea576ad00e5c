"""Tables and figures built from finished run folders: comparisons and the README results table."""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from .config import RUN_SETTINGS, flag, run_settings
from .data import data_name
from .registry import get_recipe, list_recipes, recipe_script

__all__ = ['load_runs', 'results_table', 'comparison_figure', 'write_comparison', 'update_readme']

BEGIN, END = '<!-- results:begin -->', '<!-- results:end -->'


def load_runs(run_dirs: list[Path]) -> list[tuple[Path, dict, dict]]:
    """(folder, metrics, config) of each finished run folder, in the order given."""
    if unfinished := [str(d) for d in run_dirs if not (Path(d) / 'metrics.json').exists()]:
        raise ValueError(f"{', '.join(unfinished)}: no metrics.json, not a finished run folder")
    return [(Path(d), json.loads((Path(d) / 'metrics.json').read_text()),
             json.loads((Path(d) / 'config.json').read_text()))
            for d in run_dirs]


def _command(cfg: dict, full: bool = True) -> str:
    """The recipe command that reproduces the run: every training setting spelled out (`full`, whatever the defaults
    become), or only the norm and the settings that differ from the recipe file's defaults."""
    # the registry's script, not argv[0]: a run may start from Python
    script, recipe = _recipes().get(cfg['recipe'], (f"recipes/{cfg['recipe']}.py", None))
    defaults = {} if full or recipe is None else recipe.settings(cfg['norm'])
    cfg = {**cfg, **run_settings(cfg)}
    flags = [flag(k, cfg[k]) for k in RUN_SETTINGS
             if cfg.get(k) is not None and (k == 'norm' or k not in defaults or defaults[k] != cfg[k])]
    spec = [f"--spec '{cfg['spec']}'"] if recipe and cfg['spec'] != recipe.spec else []
    extra = ['--outside-assignment'] if cfg.get('outside_assignment') else []
    return ' '.join([script, *flags, *spec, *extra])


@functools.cache
def _recipes() -> dict:
    """name -> (script, Recipe) of each installed recipe."""
    return {name: (recipe_script(name), get_recipe(name)) for name in list_recipes()}


def _trial(cfg: dict) -> str:
    """A note when the run's augmentations differ from its recipe file's, so its command alone does not reproduce it."""
    _, recipe = _recipes().get(cfg['recipe'], (None, None))
    if recipe is None or 'augs' not in cfg or cfg['augs'] == [repr(a) for a in recipe.augs]: return ''
    return " (AUGS not the recipe file's: see its config.json and train.log)"


def results_table(run_dirs: list[Path], base: Path = Path('.'), full_commands: bool = True) -> str:
    """Markdown table of the runs (linked relative to `base`): command (`full_commands`: every setting spelled out, else
    those that differ from the recipe's defaults), data, params, epochs, accuracies, wall time, device."""
    lines = ['| run | command | data | params | epochs | train acc | test acc (hold-out acc) | wall time | device |',
             '|---|---|---|---|---|---|---|---|---|']
    for d, m, cfg in load_runs(run_dirs):
        note = ' (outside the assignment)' if m.get('outside_assignment') else ''
        trial = _trial(cfg)
        wall = f"{m['wall_seconds'] / 60:.1f} min"
        if m.get('resumed'):  # the earlier invocations' wall time is not recorded; their epochs' times are
            wall = f"{m['epoch_seconds'] / 60:.1f} min of epochs ({wall} in the resumed invocation)"
        subset = f", {m['subset']} train images/class" if m.get('subset') else ''
        split = 'holdout' if 'holdout_accuracy' in m else 'test'
        acc = f"{100 * m[f'{split}_accuracy']:.2f} %"
        acc = f'**{acc}**' if split == 'test' else f'({acc})'
        if f'flip_tta_{split}_accuracy' in m: acc += f" (flip TTA: {100 * m[f'flip_tta_{split}_accuracy']:.2f} %)"
        lines.append(f"| [{d.name}]({Path(os.path.relpath(d, base)).as_posix()}/) | "
                     f"`{_command(cfg, full_commands)}`{trial} | {data_name(m.get('data_fingerprint'))} | "
                     f"{m['params']:,} | {m['epochs']}{subset}{note} | "
                     f"{100 * m['train_accuracy']:.2f} % | {acc} | "
                     f"{wall} | {m['device']} |")
    return '\n'.join(lines)


def _label(d: Path, m: dict, cfg: dict) -> str:
    split = 'test' if 'test_accuracy' in m else 'holdout'
    acc = f"{'hold-out ' if split == 'holdout' else ''}{100 * m[f'{split}_accuracy']:.2f} %"
    return f"{d.name}: {m['norm']}{' + ws' if cfg.get('ws') else ''}, bs {cfg['bs']} ({acc})"


def comparison_figure(run_dirs: list[Path], title: str) -> matplotlib.figure.Figure:
    """Test accuracy per epoch of each run, one line per run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for d, m, cfg in load_runs(run_dirs):
        h = pd.read_csv(d / 'history.csv')
        ax.plot(h.epoch + 1, 100 * h.valid_accuracy, '-o', ms=3, label=_label(d, m, cfg))
    ax.set(xlabel='epoch', ylabel='test (or hold-out) accuracy (%)', title=title)
    ax.grid(alpha=.3)
    ax.legend()
    return fig


def write_comparison(run_dirs: list[Path], out: Path, title: str) -> str:
    """Write `out`.md (table) and `out`.png (test-accuracy curves); return the table."""
    name = Path(out).name.removesuffix('.md')  # not with_suffix: 'cmp_lr0.01' keeps its dot
    md, png = Path(out).with_name(f'{name}.md'), Path(out).with_name(f'{name}.png')
    table = results_table(run_dirs, md.parent)
    md.write_text(f'# {title}\n\n{table}\n\n![test accuracy]({png.name})\n')
    comparison_figure(run_dirs, title).savefig(png, dpi=110, bbox_inches='tight')
    plt.close('all')
    return table


def update_readme(readme: Path, run_dirs: list[Path], full_commands: bool = False) -> None:
    """Replace the table between the results markers in `readme` with one generated from `run_dirs`."""
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text: raise ValueError(f'{readme} has no {BEGIN} ... {END} block')
    table = results_table(run_dirs, Path(readme).parent, full_commands)
    new = re.sub(f'{re.escape(BEGIN)}.*?{re.escape(END)}', lambda _: f'{BEGIN}\n{table}\n{END}', text, flags=re.S)
    Path(readme).write_text(new)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description="Regenerate README.md's results table (or a comparison) from run folders.")
    p.add_argument('runs', nargs='*', default=None, help='run folders (default: results/*/ with a metrics.json)')
    p.add_argument('--readme', default='README.md')
    p.add_argument('--comparison', metavar='OUT', help='write OUT.md and OUT.png comparing the runs instead')
    p.add_argument('--full-commands', action='store_true',
                   help="spell out every training setting in the commands "
                        "(default: those that differ from the recipe's)")
    a = p.parse_args()
    runs = [Path(r) for r in a.runs] or sorted(p.parent for p in Path('results').glob('*/metrics.json'))
    try:
        if a.comparison: print(write_comparison(runs, Path(a.comparison),
                                                f"{', '.join(d.name for d in runs)} compared"))
        else: update_readme(Path(a.readme), runs, a.full_commands)
    except (ValueError, FileNotFoundError) as e: p.exit(2, f'error: {e}\n')
