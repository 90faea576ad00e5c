"""Time S8 runs with and without `cifar_fa.system.keep_freed_memory` (CIFAR_FA_KEEP_FREED=0 turns it off), each in a
fresh process, alternating: wall time, user and kernel CPU seconds and page faults of the run and its workers."""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
from pathlib import Path

from timing import time_recipe


def measure(keep: bool, options: list[str], out: Path) -> dict:
    """One S8 run in a fresh process; its wall time and the CPU time and page faults of it and its workers."""
    env = {**os.environ, 'CIFAR_FA_KEEP_FREED': '1' if keep else '0'}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time_recipe('s8', out, options, env)['process_seconds']
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dict(wall=wall, user=after.ru_utime - before.ru_utime, kernel=after.ru_stime - before.ru_stime,
                faults=after.ru_minflt - before.ru_minflt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--repeat', type=int, default=2, help='runs of each kind')
    p.add_argument('options', nargs='*', help="the recipe's options after --, e.g. -- --epochs 1 --subset 1000")
    args = p.parse_args()
    print('| freed memory | wall s | user s | kernel s | page faults |\n|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for keep in (True, False):
                m = measure(keep, args.options, Path(tmp) / 'run')
                print(f"| {'kept' if keep else 'returned (glibc default)'} | {m['wall']:.1f} | {m['user']:.1f} | "
                      f"{m['kernel']:.1f} | {m['faults']:,} |", flush=True)


if __name__ == '__main__':
    main()
