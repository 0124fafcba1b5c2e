"""Local byte-range reads: telling cached ranges apart, and read-ahead advice.

What the page cache holds is the kernel's business and changes under load (another process
reading files evicts ours; read-ahead fills pages nobody asked for). So these tests never
assert what the kernel cached: they choose its answer to the ``RWF_NOWAIT`` probe
(:class:`KernelCache`) and assert what lamin-io asked of it (the ranges advised, the reads
made) and the bytes it returned.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import grouped_h5ad

import lamin_io as ln
from lamin_io.accessors.readpath import Backend, Budget, SparseParts
from lamin_io.accessors.readpath.sparse import read_sparse
from lamin_io.storage import _localread
from lamin_io.storage._localread import cached, start_advice, start_pread_ranges

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    import anndata as ad

    from lamin_io.accessors.readpath import Pending
    from lamin_io.accessors.readpath.backend import Runs

pytestmark = pytest.mark.skipif(not getattr(os, "RWF_NOWAIT", 0),
                                reason="needs preadv2 with RWF_NOWAIT (Linux)")

PAGE = 4096
SMALL = Budget(batch_bytes=8192)  # many batches of the test files


class Recording(Backend):
    """Reads through h5py, telling the test what it was asked (runs, advice)."""

    def __init__(self, advise: Callable[[list[Runs]], Callable[[], None] | None],
                 started: Callable[[list[Runs], bool], None] = lambda items, advised: None
                 ) -> None:
        self._advise, self._started = advise, started

    def advise(self, items: list[Runs]) -> Callable[[], None] | None:
        return self._advise(items)

    def start_runs(self, items: list[Runs], *, advised: bool = False
                   ) -> Pending[list[np.ndarray]]:
        self._started(items, advised)
        return super().start_runs(items)


def _parts(f: object, shape: tuple[int, int]) -> SparseParts:
    g = f["X"]  # type: ignore[index]
    return SparseParts(g["data"], g["indices"], g["indptr"][:], shape, "csr")


class KernelCache:
    """The kernel's answer to ``RWF_NOWAIT`` reads, as the test chooses it.

    A ``RWF_NOWAIT`` read at an offset ``is_cached`` refuses fails with ``EAGAIN``, as the
    kernel answers for pages it would have to fetch from the disk; other reads (and every
    plain read) go to the real file. ``probes`` lists the offsets probed.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch,
                 is_cached: Callable[[int], bool]) -> None:
        self.is_cached = is_cached
        self.probes: list[int] = []
        real = os.preadv

        def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
            if flags & os.RWF_NOWAIT and offset >= 0:
                self.probes.append(offset)
                if not self.is_cached(offset):
                    raise BlockingIOError(errno.EAGAIN, "not in the page cache")
            return real(fd, buffers, offset, flags)

        monkeypatch.setattr(os, "preadv", preadv)


def record_advice(monkeypatch: pytest.MonkeyPatch, *,
                  reached: tuple[threading.Event, int] | None = None) -> list[tuple[int, int]]:
    """Record every ``(offset, length)`` lamin-io advises (``WILLNEED``); still advise it.

    ``reached``: an event set once that many ranges were advised.
    """
    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def recording(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((offset, length))
            if reached is not None and len(advised) >= reached[1]:
                reached[0].set()
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    return advised


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """An open 8 MB file of random bytes."""
    payload = np.random.default_rng(0).bytes(8 << 20)
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, payload
    finally:
        os.close(fd)


def test_cached_is_true_only_when_every_probe_is_cached(
        data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    fd, _ = data_file
    kernel = KernelCache(monkeypatch, lambda offset: offset < 16 * PAGE)
    assert cached(fd, np.array([0, 5 * PAGE, 15 * PAGE + 100]))
    assert kernel.probes == [0, 5 * PAGE, 15 * PAGE + 100]  # one probe an offset
    assert not cached(fd, np.array([0, 20 * PAGE]))
    kernel.is_cached = lambda offset: False
    kernel.probes.clear()
    assert not cached(fd, np.array([0, PAGE]))
    assert kernel.probes == [0]  # the first miss decides


def test_advice_asks_for_the_given_ranges_only(data_file: tuple[int, bytes],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fd, payload = data_file
    starts = np.arange(0, 4 << 20, 64 * PAGE, dtype=np.int64)  # every 64th page
    stops = starts + 100
    stops[3] = starts[3]  # an empty range: never advised (a length of 0 means "to the end")
    expected = [(s, e - s) for s, e in zip(starts.tolist(), stops.tolist(), strict=True)
                if e > s]
    reached = threading.Event()
    advised = record_advice(monkeypatch, reached=(reached, len(expected)))
    end = start_advice(fd, starts, stops)
    # the advice runs in a pool thread; ending it at once may stop it before it began (as
    # a request that is read by then wants), so wait until it has advised as many ranges
    # as expected (the timeout only bounds a regression that advises fewer)
    all_advised = reached.wait(timeout=120)
    end()
    assert all_advised, f"{len(advised)} of {len(expected)} ranges advised"
    assert advised == expected  # each range once, in order, nothing else
    # and the reads that follow copy the right bytes
    ranges = list(zip(starts.tolist(), stops.tolist(), strict=True))
    got = start_pread_ranges(fd, ranges)()
    assert got == b"".join(payload[s:e] for s, e in ranges)


def test_uncached_ranges_are_advised_in_order_then_read(
        data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass copies the cached ranges; the others are advised in order, then read."""
    fd, payload = data_file
    starts = np.arange(0, 6 << 20, 16 * PAGE, dtype=np.int64)
    cached_starts = set(starts[:20].tolist()) | {int(starts[70])}  # 75 uncached
    kernel = KernelCache(monkeypatch, lambda offset: offset in cached_starts)
    advised = record_advice(monkeypatch)
    ranges = [(s, s + 3000) for s in starts.tolist()]
    got = start_pread_ranges(fd, ranges)()
    assert got == b"".join(payload[s:e] for s, e in ranges)
    assert kernel.probes == starts.tolist()  # every range probed once, in order
    assert advised == [(s, 3000) for s in starts.tolist() if s not in cached_starts]


def test_advised_ranges_are_read_without_a_first_pass(
        data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranges advised before (``advised=True``) are read in order, and right."""
    fd, payload = data_file
    flags: list[int] = []
    real = os.preadv

    def recording(fd: int, buffers: list[memoryview], offset: int, flag: int = 0) -> int:
        flags.append(flag)
        return real(fd, buffers, offset, flag)

    starts = np.arange(PAGE // 2, 6 << 20, 16 * PAGE, dtype=np.int64)
    ranges = [(s, s + 5000) for s in starts.tolist()]
    end = start_advice(fd, starts, starts + 5000)
    monkeypatch.setattr(os, "preadv", recording)
    try:
        got = start_pread_ranges(fd, ranges, advised=True)()
    finally:
        end()
    assert got == b"".join(payload[s:e] for s, e in ranges)
    assert flags == [0] * len(ranges)  # one plain read a range, no RWF_NOWAIT pass


def test_advice_stops_at_the_check_after_it_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """The advising loop looks at its stop flag every ``_ADVICE_STEP`` ranges."""
    monkeypatch.setattr(_localread, "_ADVICE_STEP", 4)
    stop = threading.Event()
    advised: list[int] = []

    def advise(fd: int, start: int, length: int, advice: int) -> None:
        advised.append(start)
        if len(advised) == 6:
            stop.set()  # ended while the second step of 4 is advised

    monkeypatch.setattr(os, "posix_fadvise", advise)
    starts = np.arange(0, 100 * PAGE, PAGE, dtype=np.int64)
    _localread._willneed(-1, starts, starts + 1, stop)  # noqa: SLF001
    assert advised == starts[:8].tolist()  # that step finished, no other began


def test_empty_ranges_are_never_advised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A length of 0 would advise the whole rest of the file."""
    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, start, length, advice: advised.append((start, length)))
    starts = np.array([0, PAGE, 2 * PAGE])
    _localread._willneed(-1, starts, starts + np.array([10, 0, 10]),  # noqa: SLF001
                         threading.Event())
    _localread._advise_ranges(-1, [(0, 10), (PAGE, PAGE)], [0, 1])  # noqa: SLF001
    assert advised == [(0, 10), (2 * PAGE, 10), (0, 10)]


def test_ending_advice_waits_for_the_range_being_advised(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``end()`` no advice of the request runs (its file may then be closed)."""
    entered = threading.Event()
    calls: list[str] = []

    def slow_advise(fd: int, start: int, length: int, advice: int) -> None:
        calls.append("in")
        entered.set()
        time.sleep(0.05)
        calls.append("out")

    monkeypatch.setattr(os, "posix_fadvise", slow_advise)
    monkeypatch.setattr(_localread, "_ADVICE_STEP", 2)
    starts = np.arange(0, 1000 * PAGE, PAGE, dtype=np.int64)
    end = start_advice(-1, starts, starts + 1)
    assert entered.wait(10)
    end()
    assert calls.count("in") == calls.count("out") >= 1
    assert calls.count("in") < len(starts)  # it stopped


# -- the accessor: an uncached file read in many batches -----------------------------------

@pytest.fixture(scope="module")
def h5ad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ad.AnnData]:
    path = tmp_path_factory.mktemp("advice") / "cells.h5ad"
    return path, grouped_h5ad(path, 12_000, 500, "abcdefgh", seed=3)


def test_uncached_file_in_many_batches_is_advised_and_reads_right(
        h5ad: tuple[Path, ad.AnnData], monkeypatch: pytest.MonkeyPatch) -> None:
    path, adata = h5ad
    rows = np.flatnonzero(np.asarray(adata.obs["g"] == "c"))[::-1]
    genes = ["g3", "g250", "g0"]
    with ln.open(path) as acc:
        acc._store.budget = SMALL  # noqa: SLF001
        acc.var_names  # noqa: B018 (metadata first: only the matrix read is counted)
        kernel = KernelCache(monkeypatch, lambda offset: False)  # a cold file
        advised = record_advice(monkeypatch)
        cold = acc[rows, genes].X
        n_cold = len(advised)
        kernel.is_cached = lambda offset: True  # now warm: the sample says so, no advice
        warm = acc[rows, genes].X
    expected = adata[rows, genes].X.toarray()
    np.testing.assert_array_equal(cold.toarray(), expected)
    np.testing.assert_array_equal(warm.toarray(), expected)
    assert n_cold > 0
    assert len(advised) == n_cold


def _element_of(ds: object, offsets: np.ndarray) -> np.ndarray:
    """The element of a chunked 1-D dataset stored at each file offset (-1: not in it)."""
    rows = int(ds.chunks[0])  # type: ignore[attr-defined]
    starts: list[int] = []
    firsts: list[int] = []

    def visit(info: object) -> None:
        starts.append(info.byte_offset)  # type: ignore[attr-defined]
        firsts.append(info.chunk_offset[0])  # type: ignore[attr-defined]

    ds.id.chunk_iter(visit)  # type: ignore[attr-defined]
    order = np.argsort(starts)
    starts_a, firsts_a = np.array(starts)[order], np.array(firsts)[order]
    at = np.searchsorted(starts_a, offsets, side="right") - 1
    inside = (at >= 0) & (offsets < starts_a[at] + rows * ds.dtype.itemsize)  # type: ignore[attr-defined]
    return np.where(inside, firsts_a[at] + (offsets - starts_a[at])
                    // ds.dtype.itemsize, -1)  # type: ignore[attr-defined]


def test_advice_queues_the_request_batch_by_batch(
        h5ad: tuple[Path, ad.AnnData], monkeypatch: pytest.MonkeyPatch) -> None:
    """The values and indices of a run are advised before the next run's, never after."""
    import h5py

    path, adata = h5ad
    rows = np.arange(0, adata.n_obs, 3)
    with ln.open(path) as acc:
        acc._store.budget = SMALL  # noqa: SLF001
        acc.var_names  # noqa: B018
        KernelCache(monkeypatch, lambda offset: False)  # the file is cold
        advised = record_advice(monkeypatch)
        got = acc[rows].X
    np.testing.assert_array_equal(got.toarray(), adata.X[rows].toarray())
    starts = np.array([offset for offset, _ in advised])
    with h5py.File(path) as f:
        data, indices = (_element_of(f[f"X/{n}"], starts) for n in ("data", "indices"))
        per_run = 8192 // (f["X/data"].dtype.itemsize + f["X/indices"].dtype.itemsize)
    assert np.all((data >= 0) != (indices >= 0))  # each range in one of the two
    assert (data >= 0).sum() == (indices >= 0).sum() > 10
    for ranges in (data, indices):  # each array's ranges in order
        assert np.all(np.diff(ranges[ranges >= 0]) > 0)
    # the two interleaved: no range comes after one of a later run (a run holds at most a
    # batch's elements), so a batch's ranges are queued before the next batch's
    element = np.where(data >= 0, data, indices)
    assert (np.maximum.accumulate(element) - element).max() < per_run


def test_without_fadvise_uncached_ranges_are_read_by_several_threads(
        data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ranges cannot be advised, the ones the first pass missed go to several tasks."""
    fd, payload = data_file
    tasks: list[int] = []
    real = _localread._read_some  # noqa: SLF001

    def recording(fd: int, ranges: list[tuple[int, int]], view: memoryview,
                  offsets: list[int], which: list[int]) -> bool:
        tasks.append(len(which))
        return real(fd, ranges, view, offsets, which)

    monkeypatch.delattr(os, "posix_fadvise")
    monkeypatch.setattr(_localread, "_read_some", recording)
    # whatever the kernel read ahead meanwhile, every range counts as missed
    monkeypatch.setattr(_localread, "_read_cached",
                        lambda fd, ranges, view, offsets: list(range(len(ranges))))
    starts = np.arange(0, 6 << 20, 16 * PAGE, dtype=np.int64)
    ranges = [(s, s + 3000) for s in starts.tolist()]
    assert start_pread_ranges(fd, ranges)() == b"".join(payload[s:e] for s, e in ranges)
    assert 1 < len(tasks) <= _localread.LOCAL_THREADS
    assert sum(tasks) == len(ranges)


def test_advice_ends_when_a_batch_fails(h5ad: tuple[Path, ad.AnnData]) -> None:
    """A request that fails mid-way ends its advice before raising."""
    import h5py

    path, adata = h5ad
    ended: list[bool] = []

    def advise(items: list[Runs]) -> Callable[[], None]:
        (_, data_starts, _), (_, index_starts, _) = items  # data and indices, same runs
        np.testing.assert_array_equal(data_starts, index_starts)
        assert data_starts[0] == 0  # the first batch's runs too
        return lambda: ended.append(True)

    class Boom(Exception):
        pass

    calls = 0

    def started(items: list[Runs], advised: bool) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Boom

    backend = Recording(advise, started)
    with h5py.File(path) as f:
        parts = _parts(f, adata.shape)
        with pytest.raises(Boom):
            read_sparse(backend, parts, np.arange(adata.n_obs), None, None, SMALL)
        assert ended == [True]
        # without failure: the same answer as the file, advice ended once more
        calls = -10**9
        got = read_sparse(backend, parts, np.arange(0, adata.n_obs, 3), None, None, SMALL)
    np.testing.assert_array_equal(got.toarray(), adata.X[::3].toarray())
    assert ended == [True, True]


def test_advice_covers_every_batch_up_to_its_bound(h5ad: tuple[Path, ad.AnnData]) -> None:
    """The advice starts at the first run; batches within it are read as advised."""
    import h5py

    path, adata = h5ad
    item = 8  # float32 values and int32 indices
    advised: list[tuple[np.ndarray, np.ndarray]] = []  # the advised runs
    started: list[tuple[int, bool]] = []  # (a batch's last run stop, advised)

    def advise(items: list[Runs]) -> Callable[[], None]:
        advised.append(items[0][1:])
        return lambda: None

    backend = Recording(advise, lambda items, a: started.append((int(items[0][2][-1]), a)))
    with h5py.File(path) as f:
        parts = _parts(f, adata.shape)
        rows = np.arange(0, adata.n_obs, 2)
        for limit in (1 << 30, 40 * 8192):
            budget = Budget(batch_bytes=8192, advice_bytes=limit)
            got = read_sparse(backend, parts, rows, None, None, budget)
            np.testing.assert_array_equal(got.toarray(), adata.X[rows].toarray())
    (starts, stops), (_, bounded) = advised
    assert starts[0] == 0  # from the first run
    assert stops[-1] == adata.X.indptr[rows[-1] + 1]  # to the last
    # the bounded advice is the start of the full one, and ends at its bound
    np.testing.assert_array_equal(bounded, stops[:len(bounded)])
    read = np.cumsum(stops - starts)
    assert read[len(bounded) - 1] <= 40 * 8192 // item < read[len(bounded)]
    # every batch of the first request was advised; the second's up to the bound only
    first = started[:len(started) // 2]
    second = started[len(started) // 2:]
    assert [a for _, a in first] == [True] * len(first)
    assert [a for _, a in second] == [stop <= bounded[-1] for stop, _ in second]
    assert second[0][1]
    assert not second[-1][1]


def test_batches_are_not_read_as_advised_when_nothing_was(
        h5ad: tuple[Path, ad.AnnData]) -> None:
    """A store that advises nothing (a cached file) has every batch read the usual way."""
    import h5py

    path, adata = h5ad
    flags: list[bool] = []
    backend = Recording(lambda items: None, lambda items, advised: flags.append(advised))
    with h5py.File(path) as f:
        got = read_sparse(backend, _parts(f, adata.shape), np.arange(0, adata.n_obs, 2), None,
                          None, SMALL)
    np.testing.assert_array_equal(got.toarray(), adata.X[::2].toarray())
    assert len(flags) > 2
    assert not any(flags)


def test_a_negative_offset_leaves_nowait_on(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    assert not cached(fd, np.array([-PAGE]))  # damaged metadata, say: not cached
    assert _localread.can_advise()  # RWF_NOWAIT still in use for the next request
