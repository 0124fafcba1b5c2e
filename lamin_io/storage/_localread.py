"""Many byte ranges of a local file, read concurrently into one buffer.

A scattered selection turns into thousands of small reads. When the file's pages are not
in the page cache, each read waits on the device; issuing them from several threads keeps
several requests in flight (``os.preadv`` releases the GIL), which is what fast disks and
network block devices need to deliver their throughput. When the pages are cached, the
threads cost little: the work is split into a few large groups.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["READ_THREADS", "pread_ranges"]

#: Threads that read one request's ranges; ranges are split into contiguous groups.
READ_THREADS = 16
#: Below this many ranges, one thread reads them all.
_MIN_PARALLEL = 64

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _pool
    _pool = None  # a pool's threads do not survive fork: the child makes its own


os.register_at_fork(after_in_child=_reset_after_fork)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="lamin-io-pread")
        return _pool


def _read_group(fd: int, ranges: list[tuple[int, int]], view: memoryview, offset: int) -> bool:
    for start, stop in ranges:
        n = stop - start
        if os.preadv(fd, [view[offset:offset + n]], start) != n:
            return False  # the file is shorter than its metadata says
        offset += n
    return True


def pread_ranges(fd: int, ranges: list[tuple[int, int]]) -> bytearray | None:
    """Read ``[start, stop)`` byte ranges of an open file, concatenated in order.

    Returns ``None`` when a range reaches past the end of the file.
    """
    sizes = [stop - start for start, stop in ranges]
    buffer = bytearray(sum(sizes))
    view = memoryview(buffer)
    if len(ranges) < _MIN_PARALLEL:
        return buffer if _read_group(fd, ranges, view, 0) else None
    n_groups = min(len(ranges) // (_MIN_PARALLEL // 4), 4 * READ_THREADS)
    bounds = [len(ranges) * i // n_groups for i in range(n_groups + 1)]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    futures = [_executor().submit(_read_group, fd, ranges[a:b], view, offsets[a])
               for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ok = all(f.result() for f in futures)
    return buffer if ok else None
