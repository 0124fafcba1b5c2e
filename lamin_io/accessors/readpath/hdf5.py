"""The HDF5 backend: byte ranges of a local file or of an S3 object, read without HDF5.

Unfiltered 1-D datasets (a sparse matrix's data and indices, obs codes) are located once
(their chunk index read level by level, :mod:`.hdf5_index`) and then read straight from
their byte ranges, concurrently: a local file by ``preadv`` from a pool thread (advised
to the kernel ahead when uncached, see :mod:`lamin_io.storage._localread`), a remote one
by ranged GETs (:class:`~lamin_io.storage._rangefile.RangeFile`). Everything else
(filtered chunks, strings, compound types, unallocated chunks, datasets behind external
links) goes through h5py, which on S3 reads through the file's block cache, prefetched
here with the byte ranges it will want.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors.readpath.backend import Backend, Runs, read_runs
from lamin_io.accessors.readpath.pipeline import Pending

if TYPE_CHECKING:
    from collections.abc import Callable

    from lamin_io.accessors.readpath.hdf5_index import IndexReader
    from lamin_io.storage._rangefile import RangeFile

__all__ = ["Hdf5Backend"]

#: Ranges of a request probed for being cached before read-ahead advice (see ``advise``).
_ADVICE_PROBES = 4
#: Batches a remote read has in flight while one is processed. Requests then wait on
#: network round trips two at a time: with 20 ms a request (loopback S3 behind a delaying
#: proxy), X of the benchmark's 5% subset took 1.95 / 1.60 / 1.56 s for 50k cells and
#: 5.4 / 4.4-5.0 / 4.0 s for 200k with 1 / 2 / 3 batches ahead; without the delay all
#: three were alike. Each batch ahead holds about ``Budget.batch_bytes`` (measured peak
#: for 200k cells: 53 MB with one, 58 MB with three).
REMOTE_AHEAD = 2
#: Remote 1-D arrays read whole (a sparse matrix's indptr) at least this large are read
#: with our own concurrent range requests, not by h5py (see :meth:`Hdf5Backend.read_whole`).
_WHOLE_BYTES = 256 * 1024
#: h5py reads fewer strings faster than our two rounds of reads.
_FEW_STRINGS = 1024


class Hdf5Backend(Backend):
    """Reads the datasets of one open HDF5 file: a local path, or a remote :class:`RangeFile`.

    ``file`` is the open ``h5py.File`` (datasets of other files, behind external links,
    are left to h5py). The local file's descriptor for our own reads is opened on first
    use and closed by :meth:`close`.
    """

    def __init__(self, file: Any, *, local_path: str | None = None,
                 rangefile: RangeFile | None = None) -> None:
        self.file = file
        self.local_path = local_path
        self.rangefile = rangefile
        self.remote = rangefile is not None
        self.whole_chunks = self.remote
        self.ahead = REMOTE_AHEAD if self.remote else 1
        self._fd: int | None = None
        self._size: int | None = None
        self._cache: dict[str, Any] = {}  # per dataset: direct or not, chunk tables

    # -- what can be read directly ----------------------------------------------------

    def direct(self, arr: Any) -> bool:
        """Whether ``arr``'s bytes can be read without HDF5 (1-D, unfiltered, allocated)."""
        from lamin_io.accessors.readpath.hdf5_ranges import is_direct

        key = f"direct:{arr.name}"
        if key not in self._cache:
            self._cache[key] = self.in_file(arr) and is_direct(arr)
        return bool(self._cache[key])

    def in_file(self, ds: Any) -> bool:
        """Whether ``ds`` lies in this file (not in one behind an external link)."""
        return bool(ds.file == self.file)

    # -- the backend interface --------------------------------------------------------

    def start_runs(self, items: list[Runs], *, advised: bool = False
                   ) -> Pending[list[np.ndarray]]:
        """Start reading runs: direct arrays from their byte ranges, in the background.

        The ranges are located now (HDF5 calls stay in this thread), then the ranges of
        every direct array are read in one go. Arrays HDF5 must read itself (filtered,
        strings, unallocated chunks) are read through h5py when the result is called.
        """
        from lamin_io.accessors.readpath.hdf5_ranges import byte_ranges, load_tables

        plans: list[tuple[int, Any] | None] = []  # (values, dtype)
        ranges: list[tuple[int, int]] = []
        index = self.index_reader()
        load_tables([item for item in items if self.direct(item[0])], self._cache, index)
        for arr, starts, stops in items:
            these = byte_ranges(arr, starts, stops, self._cache, index) if self.direct(
                arr) else []
            count = int((stops - starts).sum())
            if not these or sum(e - s for s, e in these) != count * arr.dtype.itemsize:
                plans.append(None)  # unallocated chunks read as fill values: HDF5 does it
                continue
            plans.append((count, arr.dtype))
            ranges.extend(these)
        left = [item for item, plan in zip(items, plans, strict=True) if plan is None]
        fetched = self._start_fetch(ranges, advised=advised) if ranges else None

        def finish() -> list[np.ndarray]:
            buffer = fetched() if fetched is not None else None
            if left:
                self.prefetch(left)
            out: list[np.ndarray] = []
            offset = 0
            for item, plan in zip(items, plans, strict=True):
                if plan is None or buffer is None:
                    out.append(read_runs(*item))
                    continue
                count, dtype = plan
                values = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
                out.append(values.astype(dtype.newbyteorder("="), copy=False))
                offset += count * dtype.itemsize
            return out

        return Pending(finish, fetched)

    def advise(self, items: list[Runs]) -> Callable[[], None] | None:
        """Have the kernel read ahead the byte ranges of runs read later by ``start_runs``.

        Nothing is done (``None``) for a remote file, or when a sample of the first
        array's ranges is cached (a warm file gains nothing). The first array's ranges are
        all located for the sample (their chunk indexes read whole, as the request's
        batches will want them, in a few reads; looking sampled chunks up through HDF5
        walks an index once each, ~0.6 ms a chunk cold). The ranges are advised run by
        run, every array's pieces of a run together, so a batch's ranges are all queued
        before the next batch's.
        """
        from lamin_io.accessors.readpath.hdf5_ranges import direct_pieces, load_tables
        from lamin_io.storage._localread import cached, can_advise, start_advice

        items = [item for item in items if self.direct(item[0])]
        if self.local_path is None or not items or not can_advise():
            return None
        fd = self._local_fd()
        index = self.index_reader()
        load_tables(items, self._cache, index)
        located = [direct_pieces(*items[0], self._cache, index)]
        step = max(1, len(located[0][0]) // _ADVICE_PROBES)
        if cached(fd, located[0][0][step // 2::step]):
            return None
        located += [direct_pieces(arr, starts, stops, self._cache, index)
                    for arr, starts, stops in items[1:]]
        begin, end, run = (np.concatenate(parts) for parts in zip(*located, strict=True))
        order = np.argsort(run, kind="stable")
        return start_advice(fd, begin[order], end[order])

    def release_metadata(self) -> None:
        """Drop a remote file's tail before a matrix's batches.

        It served the metadata read so far (obs, var, an indptr); the batches need none of
        it, so it does not stay beside them.
        """
        if self.rangefile is not None:
            self.rangefile.release_tail()

    def prefetch(self, items: list[Runs]) -> None:
        """Have a remote file fetch the byte ranges h5py is about to read, concurrently."""
        from lamin_io.accessors.readpath.hdf5_ranges import byte_ranges

        if self.rangefile is None:
            return
        ranges: list[tuple[int, int]] = []
        index = self.index_reader()
        for arr, starts, stops in items:
            if not (arr.ndim == 1 and self.direct(arr)):  # direct ones: read by start_runs
                ranges.extend(byte_ranges(arr, starts, stops, self._cache, index))
        self.rangefile.prefetch(ranges)

    # -- whole arrays and strings -----------------------------------------------------

    def read_whole(self, arr: Any) -> np.ndarray | None:
        """Read a whole 1-D array with our own concurrent reads (``None``: h5py must).

        Only remote arrays of :data:`_WHOLE_BYTES` or more: h5py reads through the file's
        block cache, whose read-ahead doubles from 16 KB, one round trip after the other
        (six for 800 KB), where ours costs the chunk index's levels and one round; for
        smaller arrays that is no fewer.
        """
        if not self.remote:
            return None
        whole = [(arr, np.array([0]), np.array([arr.shape[0]]))]
        if self.direct(arr) and arr.size * arr.dtype.itemsize >= _WHOLE_BYTES:
            return self.start_runs(whole)()[0]
        self.prefetch(whole)  # a filtered one's chunks in one go (h5py reads them then)
        return None

    def strings(self, ds: Any) -> np.ndarray | None:
        """Read a variable-length string array from the heap ourselves (else ``None``)."""
        if ds.shape[0] < _FEW_STRINGS or not self.in_file(ds):
            return None
        from lamin_io.accessors.readpath.hdf5_strings import read_vlen_strings

        return read_vlen_strings(ds, self.read_ranges, self.file_size())

    # -- bytes of the file ------------------------------------------------------------

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """Read byte ranges of the file concurrently; each one's bytes (short past the end)."""
        buffer = self._start_fetch(ranges)()
        view = memoryview(buffer if buffer is not None else b"")
        out, at = [], 0
        for start, stop in ranges:
            out.append(view[at:at + stop - start])
            at += stop - start
        return out

    def file_size(self) -> int:
        """Return the file's size in bytes (asked once)."""
        if self._size is None:
            import os

            self._size = (self.rangefile.size if self.rangefile is not None
                          else os.stat(str(self.local_path)).st_size)
        return self._size

    def index_reader(self) -> IndexReader:
        """Read chunk indexes with our own concurrent reads (whole ones, when remote)."""
        from lamin_io.accessors.readpath.hdf5_index import IndexReader

        # made anew each time: kept on the backend, its bound method would tie it into a
        # reference cycle, left to the garbage collector to free (with its HDF5 handles)
        return IndexReader(self.read_ranges, self.file_size(), whole=self.remote)

    def _local_fd(self) -> int:
        if self._fd is None:
            import os

            self._fd = os.open(str(self.local_path), os.O_RDONLY)
        return self._fd

    def _start_fetch(self, ranges: list[tuple[int, int]], *, advised: bool = False
                     ) -> Callable[[], bytearray | memoryview | None]:
        """Start reading byte ranges; the result waits for them, concatenated.

        ``None`` when the file is too short. ``advised``: a local file was advised them.
        """
        if self.rangefile is not None:
            return self.rangefile.start_read(ranges)
        from lamin_io.storage._localread import start_pread_ranges

        return start_pread_ranges(self._local_fd(), ranges, advised=advised)

    def close(self) -> None:
        """Close the local file's descriptor, if opened."""
        if self._fd is not None:
            import os

            os.close(self._fd)
            self._fd = None
