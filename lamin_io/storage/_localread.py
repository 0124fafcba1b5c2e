"""Many byte ranges of a local file, read into one buffer; the I/O thread pool.

A scattered selection turns into thousands of small reads, which a disk serves fastest
when it has many of them queued at once, in file order. A request's ranges are read in
one pool thread while the caller goes on (it may be processing the ranges it asked for
before). A first pass reads with ``RWF_NOWAIT``, which the kernel refuses for pages it
would have to fetch from the device: cached ranges are copied at once. The others are
then advised (``POSIX_FADV_WILLNEED``, which queues a range's read and returns), and read
in order by the same thread, each waiting only for its own pages. Reading them from
several threads instead keeps several requests in flight too, but on 2 cores the threads
compete with the caller and with the queueing. Replaying a subset of the 50k-cell
benchmark file, cold (4.6k ranges of ~2.4 KB in three batches, 3 ms of work on each):
104 ms read by 8 threads, 89 ms by one, 83 ms advised and read by one. Cached, one thread
copies 4.5k ranges faster than 16. Where ``posix_fadvise`` is missing, 8 threads read.

A request read in several batches tells the kernel every batch's ranges up front
(:func:`start_advice`, up to the read path's ``Budget.advice_bytes``): the device then
has the whole request queued, instead of a batch's worth at a time, and each batch is
read plainly (``advised``), in order, with no first pass: its misses would queue again the
pages the advice has not reached yet, racing it (3-4 ms more in the replay above). Requests of fewer
than 64 ranges are read by the caller, with a first pass, when it waits. The
advice queues reads at the device's pace (~14 us a 4 KB range here, from one thread;
more threads gain nothing). A cached request (sampled with ``RWF_NOWAIT``) is not
advised. In the same replay, the three batches took 72 ms advised up front.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import numpy as np

__all__ = ["READ_THREADS", "cached", "can_advise", "executor", "results", "start_advice",
           "start_pread_ranges"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: Threads of the pool that reads byte ranges (local files and remote objects) in parallel:
#: each blocks in a system call or in a C++ client, with the GIL released.
READ_THREADS = 16
#: Threads that read the uncached ranges of one local request where they cannot be advised.
LOCAL_THREADS = 8
#: Below this many ranges, a request is read by the caller when it waits (and below this
#: many uncached ones, read without advice).
_MIN_PARALLEL = 64
#: Ranges advised between checks whether the request still wants them.
_ADVICE_STEP = 256

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _pool, _pool_lock
    _pool = None  # a pool's threads do not survive fork: the child makes its own
    _pool_lock = threading.Lock()  # (a pool thread may have held it at the fork)


os.register_at_fork(after_in_child=_reset_after_fork)


def executor() -> ThreadPoolExecutor:
    """Return the process's I/O thread pool (made on first use, and anew after fork)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="lamin-io-read")
        return _pool


def results(futures: Sequence[Future[T]]) -> list[T]:
    """Wait for every future, then return their results (raising the first error).

    Waiting for all before raising means no task of a failed request is still running
    when its caller moves on (and, say, closes the file the tasks read).
    """
    wait(futures)
    return [f.result() for f in futures]


def _nowait_refused(exc: OSError, offset: int) -> bool:
    """Whether ``RWF_NOWAIT`` failed because the kernel or filesystem cannot do it.

    If so, it is off for the rest of the process (reads go the ordinary way). A bad
    offset fails with the same error and says nothing about the kernel.
    """
    global _NOWAIT
    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or offset < 0:
        return False
    _NOWAIT = 0
    return True


def _read_cached(fd: int, ranges: list[tuple[int, int]], view: memoryview,
                 offsets: list[int]) -> list[int]:
    """Read the ranges the page cache holds; return the indices of the others."""
    if not _NOWAIT:
        return list(range(len(ranges)))
    left = []
    for i, (start, stop) in enumerate(ranges):
        try:
            n = os.preadv(fd, [view[offsets[i]:offsets[i + 1]]], start, _NOWAIT)
        except BlockingIOError:
            n = -1
        except OSError as exc:
            if not _nowait_refused(exc, start):
                raise
            return list(range(i, len(ranges)))  # read everything the ordinary way
        if n != stop - start:
            left.append(i)  # not (all) cached, or past the end: read it again below
    return left


def _read_some(fd: int, ranges: list[tuple[int, int]], view: memoryview,
               offsets: list[int], which: list[int]) -> bool:
    for i in which:
        start, stop = ranges[i]
        if os.preadv(fd, [view[offsets[i]:offsets[i + 1]]], start) != stop - start:
            return False  # the file is shorter than its metadata says
    return True


def _advise_one(fd: int, start: int, stop: int) -> None:
    if stop > start:  # (a length of 0 would advise the rest of the file)
        os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)


def _advise_ranges(fd: int, ranges: list[tuple[int, int]], which: list[int]) -> None:
    for i in which:
        _advise_one(fd, *ranges[i])


def _read_all(fd: int, ranges: list[tuple[int, int]], view: memoryview,
              offsets: list[int], left: list[int] | None = None
              ) -> list[Future[bool]] | bool:
    """Copy the cached ranges; read the others here, advised first, or in the pool.

    ``left``: the ranges still to read when the cached ones were copied already.
    Returns whether every range was read whole, or the futures of the pool's reads.
    """
    if left is None:
        left = _read_cached(fd, ranges, view, offsets)
    if hasattr(os, "posix_fadvise") and (len(left) >= _MIN_PARALLEL
                                         or not _NOWAIT and len(left) > 1):
        # (a miss of the first pass may have queued it; without one, nothing is known)
        _advise_ranges(fd, ranges, left)
        return _read_some(fd, ranges, view, offsets, left)
    if len(left) < _MIN_PARALLEL:
        return _read_some(fd, ranges, view, offsets, left)
    n_groups = min(len(left) // (_MIN_PARALLEL // 4), LOCAL_THREADS)
    bounds = [len(left) * g // n_groups for g in range(n_groups + 1)]
    return [executor().submit(_read_some, fd, ranges, view, offsets, left[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def start_pread_ranges(fd: int, ranges: list[tuple[int, int]], *,
                       advised: bool = False) -> Callable[[], bytearray | None]:
    """Start reading ``[start, stop)`` byte ranges of an open file; return what waits.

    The returned function gives the ranges concatenated in order, or ``None`` when a
    range reaches past the end of the file.

    Few ranges are read at the wait. Of many, the cached ones are copied at once and the
    others read by a pool thread (advised, then in order) while the caller goes on. ``advised``:
    the ranges were advised already (:func:`start_advice`), so they are read in order
    straight away.
    """
    offsets = [0]
    for start, stop in ranges:
        offsets.append(offsets[-1] + stop - start)
    buffer = bytearray(offsets[-1])
    view = memoryview(buffer)
    if len(ranges) < _MIN_PARALLEL:
        return lambda: buffer if _read_all(fd, ranges, view, offsets) else None
    started: Future[list[Future[bool]] | bool]
    if advised:
        started = executor().submit(_read_some, fd, ranges, view, offsets,
                                    list(range(len(ranges))))
    else:
        # what the page cache holds is copied here and now (a handoff to the pool costs
        # more than copying a few hundred cached ranges); the pool reads the rest
        left = _read_cached(fd, ranges, view, offsets)
        if not left:
            return lambda: buffer
        started = executor().submit(_read_all, fd, ranges, view, offsets, left)

    def finish() -> bytearray | None:
        done = started.result()
        if isinstance(done, bool):
            return buffer if done else None
        ok: list[bool] = results(done)
        return buffer if all(ok) else None

    return finish


def can_advise() -> bool:
    """Whether this system can tell cached ranges (``RWF_NOWAIT``) and advise the others."""
    return bool(_NOWAIT) and hasattr(os, "posix_fadvise")


def cached(fd: int, starts: np.ndarray) -> bool:
    """Whether the bytes at these offsets are in the page cache (``False`` if unknown).

    A miss has the kernel start reading there.
    """
    if not _NOWAIT:
        return False
    probe = bytearray(1)
    try:
        return all(os.preadv(fd, [probe], start, _NOWAIT) == 1 for start in starts.tolist())
    except BlockingIOError:
        return False
    except OSError as exc:
        _nowait_refused(exc, int(starts.min()))
        return False  # the reads will tell what else is wrong


def _willneed(fd: int, starts: np.ndarray, stops: np.ndarray, stop: threading.Event) -> None:
    for at in range(0, len(starts), _ADVICE_STEP):
        if stop.is_set():
            return
        piece = slice(at, at + _ADVICE_STEP)
        for start, end in zip(starts[piece].tolist(), stops[piece].tolist(), strict=True):
            _advise_one(fd, start, end)


def start_advice(fd: int, starts: np.ndarray, stops: np.ndarray) -> Callable[[], None]:
    """Have the kernel read byte ranges of a file into its cache, from a pool thread.

    The device then has every range of a request queued, ahead of the reads that will
    copy them (``posix_fadvise`` returns once a range's read is queued). Returns a
    function that stops the advice and waits for it to end: call it before the file may
    be closed.
    """
    stop = threading.Event()
    task = executor().submit(_willneed, fd, starts, stops, stop)

    def end() -> None:
        stop.set()
        wait([task])
        if task.exception() is not None:  # the reads went on, one range at a time
            logger.warning("read-ahead advice failed (%r); the request was read without it",
                           task.exception())

    return end
