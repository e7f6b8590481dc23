"""Peak memory of a run: this process and every process it started (Ray's raylet, workers,
shard actors), sampled from /proc. PSS (proportional set size) counts shared pages, such as
Ray's object store, once across processes rather than once per process."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import threading
import time
from pathlib import Path


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache  # process-wide: set once, however many shards a process builds
def steady_heap(mmap_below_mb: int = 32, trim_above_mb: int = 128) -> bool:
    """Keep a scoring pass's buffers in the heap between passes (glibc only; True if set).

    By default glibc serves large blocks with fresh mmaps and returns the heap's free top to
    the system, so every pass of a shard (tensors of a few to 20 MB: a batch's hidden states,
    its attention mask) faulted in and zeroed new pages. Measured at 5,000 devices in-process
    on one thread: the backbone's passes took 2.9-3.0 us per sequence position and block,
    against 2.1-2.3 with blocks below 32 MB taken from the heap and up to 128 MB of free heap
    kept (a fixed threshold of 128 kB made it 5.3). Results are unchanged; memory held stays
    within those 128 MB of free heap per process."""
    if os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_below_mb << 20)
                    and libc.mallopt(_M_TRIM_THRESHOLD, trim_above_mb << 20))
    except (OSError, AttributeError):  # not glibc
        return False


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_mb(root: int | None = None) -> float:
    """Current PSS of a process and all its descendants, MB (0 where /proc is unavailable)."""
    kids, todo, total = _children(), [root or os.getpid()], 0
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        todo.extend(kids.get(pid, []))
    return total / 1024


class PeakMemory:
    """Samples the process tree every `every_s` seconds while running (a daemon thread), or
    less often when a sample is slow: reading smaps_rollup walks a process's page tables, about
    28 ms a sample for a 100,000-device run's processes (6 GB), so the wait after a sample is at
    least `1 / duty - 1` times what it took, keeping the sampler to `duty` of a core."""

    def __init__(self, every_s: float = 0.5, root: int | None = None, duty: float = 0.02):
        self.every_s, self.duty, self.peak_mb, self.root = every_s, duty, 0.0, root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.peak_mb = max(self.peak_mb, tree_pss_mb(self.root))
            took = time.perf_counter() - start
            self._stop.wait(max(self.every_s, took * (1 / self.duty - 1)))

    def __enter__(self) -> "PeakMemory":
        if Path("/proc/self/smaps_rollup").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def result_mb(self) -> float:
        """The sampled peak, or this process's own peak RSS if that is larger (short runs)."""
        own = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        return max(self.peak_mb, own)
