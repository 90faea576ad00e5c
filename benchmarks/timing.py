"""Time the recipes' defaults end to end on this device, one fresh process each, and print where the time went.

    python benchmarks/timing.py [--recipes s8 s7 s9] [--data CIFAR10] [--out runs/timing] [-- RECIPE OPTIONS]

For each recipe: the seconds from starting its process to its metrics.json, the `timings` breakdown the run records
(start-up and imports, data, DataLoaders, setup, train, valid, review, TTA, export), the test accuracy and the device.
The first recipe to read the data also decodes it into the cache unless an earlier run did: run it twice to see the
cached time. `--airbench SCRIPT` also times `python SCRIPT` in the same call, as the hardware's reference. Options
after `--` go to every recipe (e.g. `-- --epochs 3`). Not a test: figures vary by machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cifar_fa.registry import recipe_script

ROOT = Path(__file__).resolve().parents[1]
STAGES = ('startup', 'model', 'data', 'dataloaders', 'setup', 'train', 'valid', 'fit_other', 'review', 'tta', 'export')


def time_recipe(name: str, out: Path, options: list[str], env: dict | None = None) -> dict:
    """Run recipe `name` in a fresh process with `options` (and `env`), writing to `out`; its metrics and the seconds it
    took."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / recipe_script(name)), '--out', str(out), '--overwrite', *options],
                       capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{name} failed (exit status {r.returncode}): {(r.stderr.strip().splitlines() or [''])[-1]}")
    return {**json.loads((out / 'metrics.json').read_text()), 'process_seconds': seconds}


def row(name: str, m: dict) -> str:
    """One line of the printed table."""
    t = m['timings']
    acc = m.get('test_accuracy', m.get('holdout_accuracy'))
    return ' | '.join([name, f"{m['process_seconds']:.1f}", *(f"{t.get(s) or 0:.1f}" for s in STAGES),
                       f'{100 * acc:.2f} %', m['device']])


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, time each recipe, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    ours, options = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--recipes', nargs='+', default=['s8', 's7', 's9'], help='recipes to time, in order')
    p.add_argument('--data', help='CIFAR-10 folder or .tgz (default: as the recipes find it)')
    p.add_argument('--out', default='runs/timing', help='folder for the run folders')
    p.add_argument('--airbench', help="airbench's script, timed after ours")
    args = p.parse_args(ours)
    options += ['--data', args.data] if args.data else []
    print(' | '.join(['recipe', 'process s', *(f'{s} s' for s in STAGES), 'accuracy', 'device']), flush=True)
    for name in args.recipes:
        print(row(name, time_recipe(name, Path(args.out) / name, options)), flush=True)
    if args.airbench:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, args.airbench], capture_output=True, text=True)
        last = (r.stdout.strip() or r.stderr.strip()).splitlines()[-1:] or ['']
        print(f'airbench: {time.perf_counter() - t0:.1f} s for the process (exit status {r.returncode}): {last[0]}')


if __name__ == '__main__':
    main()
