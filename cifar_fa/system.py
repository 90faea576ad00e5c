"""What the operating system can do to a run, handled in one place: signals, memory refused, files half written."""
from __future__ import annotations

import ctypes
import errno
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ['atomic_write', 'interrupts_held', 'keep_freed_memory', 'memory_bytes', 'process_age', 'stop_on_signals',
           'signalled', 'stop_requested', 'memory_refused']


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has run, then deliver them."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, sigs):
        yield  # handlers can only be set from the main thread, and only restored if Python set them
        return
    got = []
    old = {s: signal.signal(s, lambda n, _: got.append(n)) for s in sigs}
    try: yield
    finally:
        for s, handler in old.items(): signal.signal(s, handler)
        if got: signal.raise_signal(got[0])


def memory_bytes() -> float:
    """The machine's physical memory (infinite where the OS does not say)."""
    try: return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, ValueError, OSError): return math.inf


def _ignore_signal(signum, frame): pass


def _quiet_half_built_loader(unraisable) -> None:
    # an interrupt inside a DataLoader iterator's __init__ leaves it half built; its __del__ then fails on a missing
    # attribute after its `finally` has stopped the workers, and that report would follow the one-line interrupt
    if getattr(unraisable.object, '__qualname__', '') != '_MultiProcessingDataLoaderIter.__del__':
        sys.__unraisablehook__(unraisable)


_signalled: list[int] = []  # the signals `_interrupt` took, until `signalled(clear=True)`
_run_pid: list[int] = []  # the process that called `stop_on_signals`: its forked children inherit the handler


def _interrupt(signum, frame):
    if os.getpid() not in _run_pid:
        # a DataLoader worker signalled with its process group, maybe before torch's worker loop could catch a
        # KeyboardInterrupt (still in multiprocessing's at-fork hooks, which would print it): end as an unhandled
        # signal ends a process; the run's process stops the run
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _signalled.append(signum)
    # `pkill -f` or a cluster's scheduler signals the DataLoader workers too: torch's SIGCHLD handler would then
    # report their deaths as a second error while the interrupt unwinds. A Python no-op, not SIG_DFL: a SIGCHLD
    # already pending would otherwise surface as "OSError: Signal 17 ignored due to race condition"
    signal.signal(signal.SIGCHLD, _ignore_signal)
    sys.unraisablehook = _quiet_half_built_loader
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Make Ctrl-C and SIGTERM (`kill`, a job scheduler, a launcher) stop the run, keeping its checkpoints, and
    remember them (`signalled`): the KeyboardInterrupt they raise is lost when it lands in a hook that swallows
    exceptions, such as logging's at-fork hook while DataLoader workers start."""
    signalled(clear=True)
    _run_pid[:] = [os.getpid()]
    for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, _interrupt)


def signalled(clear: bool = False) -> bool:
    """Whether Ctrl-C or SIGTERM arrived since `stop_on_signals` (or the last `clear`)."""
    got = bool(_signalled)
    if clear: _signalled.clear()
    return got


def stop_requested(e: BaseException) -> bool:
    """Whether `e` is Ctrl-C or SIGTERM, torch reporting workers that they stopped (before `_interrupt` ran), or any
    error after a signal whose KeyboardInterrupt was swallowed (then a worker the signal ended is found missing)."""
    return (signalled() or isinstance(e, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt)
            or any(f'killed by signal: {name}' in str(e) for name in ('Terminated', 'Interrupt')))


def memory_refused(e: BaseException) -> bool:
    """Whether `e` is the OS refusing memory (e.g. forking DataLoader workers when the process outgrew the machine)."""
    return isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM)


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc, to 10 ms); None where the OS does not say."""
    try:
        ticks = int(Path('/proc/self/stat').read_text().rsplit(')', 1)[1].split()[19])  # field 22: start, since boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, AttributeError): return None


def keep_freed_memory() -> bool:
    """glibc: keep freed memory for the next allocation instead of handing it back to the kernel; whether it applied
    (not elsewhere, nor with CIFAR_FA_KEEP_FREED=0)."""
    # each CPU training step frees its activations and allocates them again; by default glibc returns such blocks to
    # the kernel, so every step faults them in again as zero-filled pages (benchmarks/keep_freed.py measures it)
    if not sys.platform.startswith('linux') or os.environ.get('CIFAR_FA_KEEP_FREED') == '0': return False
    try: mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError): return False  # musl and others: no mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MB: glibc's largest mmap threshold; blocks above it are still mapped and unmapped
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
