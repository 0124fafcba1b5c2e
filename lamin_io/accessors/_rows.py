"""The batched read path: a subset of rows and columns of an on-disk matrix.

:func:`read_matrix` is the one function every reader goes through (the accessor's ``X``,
layers, ``obsm``, and later the training loaders). It

1. sorts and de-duplicates the requested rows (restoring order and repeats at the end),
2. turns them into element (sparse) or row (dense) ranges and coalesces neighbours into
   one read when the gap between them is small (at most :data:`MAX_GAP_BYTES`, and no
   larger than the range before it, so a request never reads more than twice the bytes
   it needs; local files also read through gaps of up to a page, :data:`SLACK_BYTES`),
   and always when they lie in the same or adjacent encoded chunks, so every chunk
   holding selected data is fetched and decoded once per request and no chunk without
   selected data is read (stores that decode chunks themselves get the exact ranges
   instead, see :attr:`ReadHooks.gathers`; remote stores read whole chunks, see
   :attr:`ReadHooks.whole_chunks`),
3. reads in batches of at most :data:`BATCH_BYTES`, selecting columns in memory per
   batch, so peak memory follows the selection, not the file; where the store can
   (:attr:`ReadHooks.start_runs`), the next batches are fetched while one is processed
   (:attr:`ReadHooks.ahead`), and a local file has the kernel read the batches ahead
   (:attr:`ReadHooks.advise`).

CSR matrices are read along rows; CSC along columns (the compressed axis), filtering rows
in memory; dense arrays by row blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np

from lamin_io.accessors._index import Selection, length, to_array

if TYPE_CHECKING:
    from collections.abc import Callable

    import scipy.sparse as sp

__all__ = ["BATCH_BYTES", "GATHER_BYTES", "MAX_GAP_BYTES", "Pending", "ReadHooks",
           "SparseParts", "coalesce", "expand", "read_dense", "read_matrix", "read_sparse"]

T = TypeVar("T")

#: Two reads separated by more bytes than this stay two reads.
MAX_GAP_BYTES = 1 << 20
#: A gap up to this size is always worth reading through (a page of a local file).
SLACK_BYTES = 4096
#: The bytes one batch reads before columns are selected, roughly: a batch is cut before
#: the run that starts past this bound, so its last run can take it to about twice as
#: much (and remote batches include the gaps read through). ``1 + ahead`` batches are in
#: memory at once: one processed, the next ones on their way.
BATCH_BYTES = 4 << 20
#: Bytes of a request's runs (from its start) a local file is advised to read ahead: the
#: page cache holds them until their batch copies them.
ADVICE_BYTES = 256 << 20
#: Decoded bytes of the chunks one batch covers where the store decodes chunks itself
#: (``ReadHooks.gathers``): it holds the selected values only, plus a chunk per thread.
GATHER_BYTES = 16 << 20


class Pending(Generic[T]):
    """Reads a hook started (``start_runs``, ``start_block``).

    Called, it waits for them and finishes the work (decoding, copying out) and returns
    the result; :meth:`settle` only waits for the I/O started (``wait_io``), for a request
    that failed: nothing is decoded and no new read starts.
    """

    def __init__(self, finish: Callable[[], T],
                 wait_io: Callable[[], object] | None = None) -> None:
        self._finish, self._wait_io = finish, wait_io

    def __call__(self) -> T:
        return self._finish()

    def settle(self) -> None:
        """Wait for the I/O started, ignoring its errors (the request fails for another)."""
        if self._wait_io is not None:
            try:
                self._wait_io()
            except Exception:  # noqa: BLE001, S110
                pass


class StartRuns(Protocol):
    """The ``start_runs`` hook of :class:`ReadHooks`."""

    def __call__(self, items: list[tuple[Any, np.ndarray, np.ndarray]], *,
                 advised: bool = False) -> Pending[list[np.ndarray | None]]: ...


class StartBlock(Protocol):
    """The ``start_block`` hook of :class:`ReadHooks`."""

    def __call__(self, arr: Any, rows: np.ndarray, cols: np.ndarray | None,
                 out: np.ndarray) -> Pending[None]: ...


@dataclass(frozen=True)
class ReadHooks:
    """How a store can speed up reads; every hook is optional.

    ``prefetch`` is told ``[(on-disk array, starts, stops), ...]`` (elements or rows) before
    they are read by the array library, so a remote file can fetch them concurrently.
    """

    prefetch: Callable[[list[tuple[Any, np.ndarray, np.ndarray]]], None] | None = None
    #: Gaps up to this many bytes are read through even after a short range (a local
    #: page costs no more to read whole); remote stores use 0, which keeps every request
    #: within twice the bytes of its ranges.
    slack_bytes: int = SLACK_BYTES
    #: Merge ranges by chunk even where chunks can be read in part (unfiltered HDF5):
    #: remote stores pay per request, so chunks holding selected rows are fetched with
    #: their neighbours in one request, also across chunks holding none, the shortest
    #: gaps first, up to as many chunks as hold the selection (never more than twice the
    #: bytes of the chunks that hold it).
    whole_chunks: bool = False
    #: Whether the store reads an array at the cost of the chunks a selection touches,
    #: decoding each chunk once and keeping only what was selected: 1-D arrays through
    #: ``start_runs`` (they get the exact ranges, no gaps read through, in batches that
    #: never share a chunk), 2-D dense ones through ``start_block``.
    gathers: Callable[[Any], bool] | None = None
    #: Given ``[(1-D on-disk array, starts, stops), ...]`` and whether those runs were
    #: advised (``advise``), start reading the runs ``[starts[i], stops[i])`` of each
    #: array, all in one go (planning in the calling thread), and return the reads
    #: started (:class:`Pending`): called, it waits for them and returns for each array
    #: its runs concatenated, or ``None`` to leave it to the array library; a request that
    #: fails only settles it. Later batches are then fetched while this one is processed
    #: (``ahead``).
    start_runs: StartRuns | None = None
    #: Given a 2-D array that ``gathers`` accepts, sorted unique rows and columns
    #: (``None``: all) and the output for them, start reading them into it and return the
    #: read started (:class:`Pending`): called, it waits and decodes; a request that
    #: fails only settles it (later batches are started while one is processed,
    #: ``ahead``).
    start_block: StartBlock | None = None
    #: Told, before the first batch starts, the runs of the first batches (up to
    #: :data:`ADVICE_BYTES`; only for requests of two batches or more), so a local file
    #: can have the kernel read them ahead (a disk then works on much of the request, not
    #: a batch at a time). Returns a function that ends the advice before the request
    #: returns, or ``None`` when it advised nothing (a cached file).
    advise: Callable[[list[tuple[Any, np.ndarray, np.ndarray]]],
                     Callable[[], None] | None] | None = None
    #: Batches started (``start_runs``) while one is processed: remote stores keep more
    #: than one in flight, so requests do not wait on one round trip at a time.
    ahead: int = 1


NO_HOOKS = ReadHooks()


@dataclass(frozen=True)
class SparseParts:
    """The on-disk arrays of a CSR or CSC matrix."""

    data: Any
    indices: Any
    indptr: np.ndarray
    shape: tuple[int, int]
    format: str  # "csr" or "csc"


def _chunk_len(arr: Any, hooks: ReadHooks) -> int | None:
    """Rows per chunk when reads should cover chunks whole, else ``None``.

    zarr chunks are always encoded; HDF5 chunks only when a filter (compression, shuffle,
    checksum) is set; unfiltered HDF5 chunks can be read in part at no extra cost, unless
    the store asks for whole chunks (``hooks.whole_chunks``).
    """
    chunks = getattr(arr, "chunks", None)
    if not chunks:
        return None
    plist = getattr(getattr(arr, "id", None), "get_create_plist", None)
    if not hooks.whole_chunks and plist is not None and plist().get_nfilters() == 0:
        return None
    return int(chunks[0])


def coalesce(starts: np.ndarray, stops: np.ndarray, *, max_gap: int, slack: int = 0,
             chunk: int | None = None, bridge_chunks: bool = False,
             max_run: int | None = None,
             cut_every: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge sorted, non-overlapping, non-empty ranges into fewer reads.

    Two neighbours merge when the gap between them is at most ``max_gap`` elements and at
    most the length of the range before it plus ``slack`` (so the gaps read add up to no
    more than the ranges themselves, plus slack), or when they lie in the same or adjacent
    chunks of ``chunk`` elements (the gap then holds no whole chunk). With
    ``bridge_chunks``, runs also merge across chunks holding no range, the shortest such
    gaps first, as long as the chunks read without a range number no more than the chunks
    holding ranges (so at most twice their bytes are read, in fewer, larger requests).
    Runs are cut so none
    spans more than ``max_run`` elements (a single range longer than that stays whole), and
    between ranges on either side of a multiple of ``cut_every``.
    Returns ``(run_starts, run_stops, run_of)``, where ``run_of[i]`` is the run holding
    range ``i``.
    """
    if len(starts) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    gaps = starts[1:] - stops[:-1]
    merge = (gaps <= max_gap) & (gaps <= (stops - starts)[:-1] + slack)
    if chunk:
        first, last = starts // chunk, (stops - 1) // chunk
        empty = first[1:] - last[:-1] - 1  # chunks holding no range between neighbours
        merge |= empty <= 0
        if bridge_chunks:
            holding = int((last - first + 1).sum()) - int(np.count_nonzero(empty < 0))
            gaps = np.flatnonzero(empty > 0)
            order = gaps[np.argsort(empty[gaps], kind="stable")]
            merge[order[np.cumsum(empty[order]) <= holding]] = True
    if max_run:
        if chunk:  # cut between chunks, so no chunk is decoded by two runs
            window = (starts // chunk) // max(1, max_run // chunk)
        else:
            run_of = np.concatenate(([0], np.cumsum(~merge)))
            first_of_run = np.concatenate(([0], np.flatnonzero(~merge) + 1))
            window = (starts - starts[first_of_run][run_of]) // max_run
        merge &= window[1:] == window[:-1]
    if cut_every:
        merge &= starts[1:] // cut_every == (stops[:-1] - 1) // cut_every
    breaks = np.flatnonzero(~merge)
    run_starts = starts[np.concatenate(([0], breaks + 1))]
    run_stops = stops[np.concatenate((breaks, [len(stops) - 1]))]
    run_of = np.concatenate(([0], np.cumsum(~merge))).astype(np.int64)
    return run_starts, run_stops, run_of


def expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(s, s + n)`` for every pair, vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shifts = starts - np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.repeat(shifts, lengths) + np.arange(total, dtype=np.int64)


class _Batch:
    """A batch whose reads were started where the store can (``start_runs``).

    :meth:`finish` waits for them and reads what the store left to the array library;
    :meth:`settle` only waits for what was started (a request that fails must not leave
    reads running, nor start new ones).
    """

    def __init__(self, items: list[tuple[Any, np.ndarray, np.ndarray]], hooks: ReadHooks,
                 *, advised: bool = False) -> None:
        self.items, self.hooks = items, hooks
        self._wait = (hooks.start_runs(items, advised=advised)
                      if hooks.start_runs is not None else None)

    def finish(self) -> list[np.ndarray]:
        out = self._wait() if self._wait is not None else [None] * len(self.items)
        self._wait = None  # waited for
        # what the store did not read goes through the array library, an array at a time
        left = [item for d, item in zip(out, self.items, strict=True) if d is None]
        if left and self.hooks.prefetch is not None:
            self.hooks.prefetch(left)
        return [d if d is not None else _read_runs_of(*item)
                for d, item in zip(out, self.items, strict=True)]

    def settle(self) -> None:
        """Wait for the reads started, ignoring their errors (another one is on its way)."""
        wait, self._wait = self._wait, None
        if wait is not None:
            wait.settle()


def _read_runs_of(arr: Any, run_starts: np.ndarray, run_stops: np.ndarray) -> np.ndarray:
    """Read every run of one 1-D on-disk array through the array library."""
    if len(run_starts) == 1 and getattr(arr, "read_direct", None) is None:
        return np.asarray(arr[int(run_starts[0]):int(run_stops[0])])  # no extra copy
    sizes = run_stops - run_starts
    out = np.empty(int(sizes.sum()), dtype=arr.dtype)
    offset = 0
    direct = getattr(arr, "read_direct", None)
    for s, e in zip(run_starts.tolist(), run_stops.tolist(), strict=True):
        n = e - s
        if direct is not None:
            direct(out, np.s_[s:e], np.s_[offset:offset + n])
        else:
            out[offset:offset + n] = arr[s:e]
        offset += n
    return out


def _unique_sorted(sel: Selection, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted unique positions and the inverse that restores the request (None: same)."""
    positions = to_array(sel, n)
    if isinstance(sel, slice) and (sel.step or 1) > 0:
        return positions, None
    if len(positions) < 2 or bool(np.all(positions[1:] > positions[:-1])):
        return positions, None
    unique, inverse = np.unique(positions, return_inverse=True)
    return unique, inverse


class _MinorFilter:
    """Keeps the selected minor-axis positions of a batch and renumbers them."""

    def __init__(self, sel: Selection | None, n_minor: int) -> None:
        self.all = sel is None or (isinstance(sel, slice) and sel.indices(n_minor) ==
                                   (0, n_minor, 1))
        self.inverse: np.ndarray | None = None
        self.slice: tuple[int, int] | None = None
        self.lookup: np.ndarray | None = None
        self.selected: np.ndarray | None = None  # lookup >= 0, one byte a position
        self.n_out = n_minor
        if self.all or sel is None:
            return
        index_dtype = np.int32 if n_minor < 2**31 else np.int64
        if isinstance(sel, slice) and sel.indices(n_minor)[2] == 1:
            start, stop, _ = sel.indices(n_minor)
            self.slice = (start, max(start, stop))
            self.n_out = max(0, stop - start)
            return
        positions = to_array(sel, n_minor)
        unique, inverse = np.unique(positions, return_inverse=True)
        if len(unique) == len(positions):  # new index = position in the request
            self.lookup = np.full(n_minor, -1, dtype=index_dtype)
            self.lookup[positions] = np.arange(len(positions))
            self.n_out = len(positions)
        else:  # repeated columns: filter the unique ones, expand at the end
            self.lookup = np.full(n_minor, -1, dtype=index_dtype)
            self.lookup[unique] = np.arange(len(unique))
            self.inverse = inverse
            self.n_out = len(unique)
        self.selected = self.lookup >= 0

    def mask(self, indices: np.ndarray) -> np.ndarray | None:
        """Return which minor indices are selected (``None``: all of them)."""
        if self.all:
            return None
        if self.slice is not None:
            lo, hi = self.slice
            return (indices >= lo) & (indices < hi)
        assert self.selected is not None  # noqa: S101
        return self.selected[indices]

    def remap(self, indices: np.ndarray) -> np.ndarray:
        """Renumber selected minor indices into the output's numbering."""
        if self.all:
            return indices
        if self.slice is not None:
            return (indices - self.slice[0]).astype(indices.dtype, copy=False)
        assert self.lookup is not None  # noqa: S101
        return self.lookup[indices].astype(indices.dtype, copy=False)


def _inside_mask(n: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Boolean mask of the buffer positions inside ``[starts[i], starts[i] + lengths[i])``.

    The ranges are in order and do not overlap (a batch's pieces of distinct rows).
    """
    nonzero = lengths > 0
    begin, end = starts[nonzero], starts[nonzero] + lengths[nonzero]
    segments = np.diff(np.column_stack([begin, end]).reshape(-1), prepend=0, append=n)
    return np.repeat(np.tile(np.array([False, True]), len(begin) + 1)[:-1], segments)


def _cut(rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
         window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ranges ``[starts, starts + lengths)`` where they cross a multiple of ``window``.

    Returns the pieces' rows (repeated for a split range), starts and lengths, in order.
    """
    first = starts // window
    n = (starts + lengths - 1) // window - first + 1
    if len(n) == 0 or int(n.max()) == 1:
        return rows, starts, lengths
    which = np.repeat(np.arange(len(starts)), n)
    edge = expand(first, n) * window
    begin = np.maximum(starts[which], edge)
    end = np.minimum(starts[which] + lengths[which], edge + window)
    return rows[which], begin, end - begin


def read_sparse(parts: SparseParts, major: Selection | None, minor: Selection | None,
                hooks: ReadHooks = NO_HOOKS) -> sp.spmatrix:
    """Read a subset of a compressed matrix along its compressed (major) axis.

    ``major`` selects rows of a CSR (columns of a CSC) matrix, ``minor`` the other axis.
    ``hooks`` let the store fetch each batch's element ranges itself (see
    :class:`ReadHooks`).
    """
    import scipy.sparse as sp

    n_major, n_minor = parts.shape if parts.format == "csr" else parts.shape[::-1]
    rows, row_inverse = _unique_sorted(major if major is not None else slice(0, n_major),
                                       n_major)
    minor_filter = _MinorFilter(minor, n_minor)
    indptr = parts.indptr
    starts = indptr[rows].astype(np.int64)
    lengths = indptr[rows + 1].astype(np.int64) - starts
    nonempty = lengths > 0
    item = parts.data.dtype.itemsize + parts.indices.dtype.itemsize
    batch_elements = max(1, BATCH_BYTES // item)
    ne_rows = np.flatnonzero(nonempty)
    piece_rows, piece_starts, piece_lengths = ne_rows, starts[nonempty], lengths[nonempty]
    if hooks.gathers is not None and hooks.gathers(parts.data) and hooks.gathers(
            parts.indices) and parts.data.chunks == parts.indices.chunks:
        # exact ranges, cut at windows of whole chunks: a batch decodes its chunks alone
        window = max(1, GATHER_BYTES // item // int(parts.data.chunks[0])) * int(
            parts.data.chunks[0])
        piece_rows, piece_starts, piece_lengths = _cut(piece_rows, piece_starts,
                                                       piece_lengths, window)
        run_starts, run_stops, run_of = coalesce(piece_starts, piece_starts + piece_lengths,
                                                 max_gap=0, cut_every=window)
        batch_of_run = run_starts // window
    else:
        chunk = _chunk_len(parts.data, hooks)
        run_starts, run_stops, run_of = coalesce(piece_starts, piece_starts + piece_lengths,
                                                 max_gap=max(1, MAX_GAP_BYTES // item),
                                                 slack=hooks.slack_bytes // item,
                                                 chunk=chunk, max_run=batch_elements,
                                                 bridge_chunks=hooks.whole_chunks)
        # group runs into batches of bounded size
        sizes = run_stops - run_starts
        batch_of_run = (np.cumsum(sizes) - sizes) // batch_elements
    run_sizes = run_stops - run_starts

    bounds = np.flatnonzero(np.diff(batch_of_run)) + 1
    batches = list(zip([0, *bounds.tolist()], [*bounds.tolist(), len(run_sizes)], strict=True))

    data_parts, index_parts = [], []
    counts = np.zeros(len(rows), dtype=np.int64)

    advised_runs = 0  # the runs advised: every batch within them is read plainly

    def begin(b: int) -> _Batch:
        r0, r1 = batches[b]
        return _Batch([(parts.data, run_starts[r0:r1], run_stops[r0:r1]),
                       (parts.indices, run_starts[r0:r1], run_stops[r0:r1])], hooks,
                      advised=r1 <= advised_runs)

    upcoming: deque[_Batch] = deque()  # started, not waited for
    current: _Batch | None = None
    end_advice: Callable[[], None] | None = None
    ahead = max(1, hooks.ahead)
    try:
        if hooks.advise is not None and len(batches) > 1:
            # every batch as far as the advice may reach, the first too: one thread
            # queueing them all, run by run, keeps the disk's queue deep and in the order
            # the batches are needed (measured cold, the benchmark's 50k- and 200k-cell
            # subsets: X 70-73 and 263 ms; advised from the second batch on, with the
            # first read by 8 threads, 84-95 and 315 ms)
            last = int(np.searchsorted(np.cumsum(run_sizes), ADVICE_BYTES // item, "right"))
            last = max(last, batches[0][1])
            end_advice = hooks.advise([(parts.data, run_starts[:last], run_stops[:last]),
                                       (parts.indices, run_starts[:last], run_stops[:last])])
            if end_advice is not None:
                advised_runs = last
        upcoming.extend(begin(b) for b in range(min(ahead, len(batches))))
        for b, (r0, r1) in enumerate(batches):
            current = upcoming.popleft()
            if b + ahead < len(batches):
                upcoming.append(begin(b + ahead))
            data_buf, index_buf = current.finish()  # the next ones are on their way meanwhile
            current = None
            in_batch = (run_of >= r0) & (run_of < r1)
            sel_rows = piece_rows[in_batch]  # a row has at most one piece in a batch
            sel_runs = run_of[in_batch]
            buffer_offsets = np.concatenate(([0], np.cumsum(run_sizes[r0:r1])[:-1]))
            local_starts = buffer_offsets[sel_runs - r0] + (piece_starts[in_batch]
                                                            - run_starts[sel_runs])
            sel_lengths = piece_lengths[in_batch]
            n_selected = int(sel_lengths.sum())
            inside = None
            if 4 * n_selected < len(data_buf):  # a small selection in a large read: gather it
                gather = expand(local_starts, sel_lengths)
                data_buf, index_buf = data_buf[gather], index_buf[gather]
                local_starts = np.cumsum(sel_lengths) - sel_lengths
            elif n_selected != len(data_buf):  # gaps were read: mask them out
                inside = _inside_mask(len(data_buf), local_starts, sel_lengths)
            keep = minor_filter.mask(index_buf)
            if inside is not None:
                keep = inside if keep is None else keep & inside
            if keep is None:
                counts[sel_rows] += sel_lengths
                data_parts.append(data_buf)
                index_parts.append(minor_filter.remap(index_buf))
            elif 8 * int(np.count_nonzero(keep)) < len(keep):  # few kept (a gene list)
                at = np.flatnonzero(keep)
                row_of = np.searchsorted(local_starts, at, side="right") - 1
                counts[sel_rows] += np.bincount(row_of, minlength=len(sel_rows))
                data_parts.append(data_buf[at])
                index_parts.append(minor_filter.remap(index_buf[at]))
            else:
                kept = np.concatenate(([0], np.cumsum(keep, dtype=np.int64 if len(keep) >= 2**31
                                                      else np.int32)))
                counts[sel_rows] += kept[local_starts + sel_lengths] - kept[local_starts]
                data_parts.append(data_buf[keep])
                index_parts.append(minor_filter.remap(index_buf[keep]))
            del data_buf, index_buf, keep  # before the next batch's buffer is made
    except BaseException:
        if end_advice is not None:  # no more read-ahead for a request that failed
            end_advice()
            end_advice = None
        for started in (current, *upcoming):  # no read may outlive the request (the file
            if started is not None:  # may close)
                started.settle()
        raise
    finally:
        if end_advice is not None:
            end_advice()

    dtype = parts.data.dtype
    data = np.concatenate(data_parts) if data_parts else np.empty(0, dtype=dtype)
    indices = (np.concatenate(index_parts) if index_parts
               else np.empty(0, dtype=parts.indices.dtype))
    out_indptr = np.concatenate(([0], np.cumsum(counts)))
    cls = sp.csr_matrix if parts.format == "csr" else sp.csc_matrix
    shape = (len(rows), minor_filter.n_out)
    mat = cls((data, indices, out_indptr), shape=shape if parts.format == "csr" else shape[::-1])
    if minor_filter.lookup is not None:
        mat.has_sorted_indices = False
        mat.sort_indices()
    if parts.format == "csr":
        if row_inverse is not None:
            mat = mat[row_inverse]
        if minor_filter.inverse is not None:
            mat = mat[:, minor_filter.inverse]
    else:
        if row_inverse is not None:
            mat = mat[:, row_inverse]
        if minor_filter.inverse is not None:
            mat = mat[minor_filter.inverse]
    return mat


def read_dense(arr: Any, rows: Selection | None, cols: Selection | None,
               hooks: ReadHooks = NO_HOOKS) -> np.ndarray:
    """Read a subset of a dense on-disk array by coalesced row blocks.

    ``cols`` selects the second axis of a 2-D array (``None``: all); arrays of more
    dimensions (``obsm`` cubes) are read whole along the other axes. Columns are selected
    per block, so memory follows the selection: the array library reads only the column
    chunks needed where it can (zarr), otherwise whole rows of one block at a time.
    """
    n_rows = int(arr.shape[0])
    two_d = arr.ndim == 2
    n_cols = int(arr.shape[1]) if arr.ndim > 1 else 1
    positions, inverse = _unique_sorted(rows if rows is not None else slice(0, n_rows), n_rows)
    if (two_d and hooks.start_block is not None and hooks.gathers is not None
            and hooks.gathers(arr)):
        return _gather_dense(arr, positions, inverse, cols, hooks.start_block,
                             ahead=hooks.ahead)
    col_sel: Any = slice(None)  # what the array library reads
    col_after: np.ndarray | None = None  # then selected in memory, per block
    if two_d and cols is not None:
        if isinstance(cols, slice) and (cols.step or 1) > 0:
            col_sel = cols
        elif hasattr(arr, "oindex"):  # zarr: decode only the column chunks needed
            unique_cols, col_inverse = np.unique(to_array(cols, n_cols), return_inverse=True)
            col_sel, col_after = unique_cols, col_inverse
        else:
            col_after = to_array(cols, n_cols)
    tail: tuple[int, ...] = tuple(int(n) for n in arr.shape[1:])
    if two_d:
        tail = (len(col_after) if col_after is not None else length(col_sel, n_cols),)
    out = np.empty((len(positions), *tail), dtype=arr.dtype)
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    blocks = _dense_blocks(positions, row_bytes, _chunk_len(arr, hooks), hooks.slack_bytes)
    fetched_until = 0
    for i, (first, last) in enumerate(blocks):
        s, e = int(positions[first]), int(positions[last - 1]) + 1
        if hooks.prefetch is not None and i >= fetched_until:
            fetched_until = _prefetch_dense(hooks.prefetch, arr, positions, blocks, i,
                                            row_bytes)
        if not two_d:
            block = arr[s:e]
        elif isinstance(col_sel, np.ndarray):
            block = arr.oindex[s:e, col_sel]
        else:
            block = arr[s:e, col_sel]
        block = block[positions[first:last] - s]
        out[first:last] = block[:, col_after] if col_after is not None else block
    return out[inverse] if inverse is not None else out


def _gather_dense(arr: Any, positions: np.ndarray, inverse: np.ndarray | None,
                  cols: Selection | None, start: StartBlock, *, ahead: int) -> np.ndarray:
    """Read rows ``positions`` (sorted, unique) x ``cols`` of a 2-D array the store gathers.

    Batches of whole row chunks (at least one), their chunks' decoded bytes up to about
    :data:`GATHER_BYTES`, are read straight into the output by ``start`` (the
    ``start_block`` hook), ``ahead`` of them in flight while one is processed; the
    requested order and repeats of columns and rows are restored at the end.
    """
    n_cols = int(arr.shape[1])
    col_pos: np.ndarray | None = None
    col_inverse: np.ndarray | None = None
    if cols is not None and not (isinstance(cols, slice) and cols.indices(n_cols) ==
                                 (0, n_cols, 1)):
        col_pos, col_inverse = _unique_sorted(cols, n_cols)
    out = np.empty((len(positions), n_cols if col_pos is None else len(col_pos)),
                   dtype=arr.dtype)
    size_rows, size_cols = (int(n) for n in arr.chunks)
    n_col_chunks = (-(-n_cols // size_cols) if col_pos is None
                    else len(np.unique(col_pos // size_cols)))
    per_batch = max(1, GATHER_BYTES // max(1, n_col_chunks * size_rows * size_cols
                                           * arr.dtype.itemsize))
    row_chunk = positions // size_rows
    rank = np.cumsum(np.diff(row_chunk, prepend=-1) != 0) - 1  # of a row's chunk, 0, 1, ..
    cuts = (np.flatnonzero(np.diff(rank // per_batch)) + 1).tolist()
    batches = list(zip([0, *cuts], [*cuts, len(positions)], strict=True))

    def begin(b: int) -> Pending[None]:
        a, e = batches[b]
        return start(arr, positions[a:e], col_pos, out[a:e])

    upcoming: deque[Pending[None]] = deque()  # started, not waited for
    ahead = max(1, ahead)
    try:
        upcoming.extend(begin(b) for b in range(min(ahead, len(batches))))
        for b in range(len(batches)):
            wait = upcoming.popleft()
            if b + ahead < len(batches):
                upcoming.append(begin(b + ahead))
            wait()
    except BaseException:
        # no read may outlive the request (the file may close); nobody will use the
        # batches, so they are not decoded
        for started in upcoming:
            started.settle()
        raise
    if col_inverse is not None:
        out = out[:, col_inverse]
    return out[inverse] if inverse is not None else out


def _prefetch_dense(prefetch: Callable[[list[tuple[Any, np.ndarray, np.ndarray]]], None],
                    arr: Any, positions: np.ndarray,
                    blocks: list[tuple[int, int]], i: int, row_bytes: int) -> int:
    """Prefetch blocks from ``i`` on, up to :data:`BATCH_BYTES`; return the next unfetched."""
    starts, stops, total, j = [], [], 0, i
    while j < len(blocks) and (j == i or total < BATCH_BYTES):
        s, e = int(positions[blocks[j][0]]), int(positions[blocks[j][1] - 1]) + 1
        starts.append(s)
        stops.append(e)
        total += (e - s) * row_bytes
        j += 1
    prefetch([(arr, np.array(starts), np.array(stops))])
    return j


def _dense_blocks(positions: np.ndarray, row_bytes: int, chunk: int | None,
                  slack: int = 0) -> list[tuple[int, int]]:
    """Split sorted row positions into ``[first, last)`` groups, each read as one block.

    Rows closer than :data:`MAX_GAP_BYTES` (or in one chunk) share a block; no block spans
    more than :data:`BATCH_BYTES`.
    """
    if len(positions) == 0:
        return []
    run_starts, _, run_of = coalesce(positions, positions + 1,
                                     max_gap=max(1, MAX_GAP_BYTES // row_bytes),
                                     slack=slack // row_bytes, chunk=chunk)
    per_block = max(1, BATCH_BYTES // row_bytes)
    if chunk:  # blocks of whole chunks (at least one): no chunk is decoded by two blocks
        window = positions // (chunk * max(1, per_block // chunk))
    else:
        window = (positions - run_starts[run_of]) // per_block
    bounds = np.flatnonzero((np.diff(run_of) != 0) | (np.diff(window) != 0)) + 1
    firsts = np.concatenate(([0], bounds)).tolist()
    lasts = np.concatenate((bounds, [len(positions)])).tolist()
    return list(zip(firsts, lasts, strict=True))


def read_matrix(elem: Any, rows: Selection | None, cols: Selection | None,
                hooks: ReadHooks = NO_HOOKS) -> Any:
    """Read ``elem[rows, cols]`` of an on-disk dense array or :class:`SparseParts`.

    This is the one read path of lamin-io: accessors and loaders call it with the rows a
    request needs; it sorts, coalesces and batches them (see the module docstring).
    """
    if isinstance(elem, SparseParts):
        if elem.format == "csr":
            return read_sparse(elem, rows, cols, hooks)
        return read_sparse(elem, cols, rows, hooks)
    return read_dense(elem, rows, cols, hooks)
