"""The batched read path: a subset of rows and columns of an on-disk matrix.

:func:`read_matrix` is the one function every reader goes through (the accessor's ``X``,
layers, ``obsm``, and later the training loaders). It

1. sorts and de-duplicates the requested rows (restoring order and repeats at the end),
2. turns them into element (sparse) or row (dense) ranges and coalesces neighbours into
   one read when the gap between them is small (at most :data:`MAX_GAP_BYTES`, and no
   larger than the range before it plus :data:`SLACK_BYTES`, so a request never reads
   more than about twice the bytes it needs), and always when they touch the same
   storage chunk, so every chunk is fetched and decoded once per request,
3. reads in batches of at most :data:`BATCH_BYTES`, selecting columns in memory per
   batch, so peak memory follows the selection, not the file.

CSR matrices are read along rows; CSC along columns (the compressed axis), filtering rows
in memory; dense arrays by row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors._index import Selection, length, to_array

if TYPE_CHECKING:
    from collections.abc import Callable

    import scipy.sparse as sp

    #: Told ``[(on-disk array, starts, stops), ...]`` in elements/rows before they are read.
    Prefetch = Callable[[list[tuple[Any, np.ndarray, np.ndarray]]], None]

__all__ = ["BATCH_BYTES", "MAX_GAP_BYTES", "SparseParts", "coalesce", "read_dense",
           "read_matrix", "read_sparse"]

#: Two reads separated by more bytes than this stay two reads.
MAX_GAP_BYTES = 1 << 20
#: A gap up to this size is always worth reading through (a page of a local file).
SLACK_BYTES = 4096
#: Upper bound on the bytes one batch reads before columns are selected.
BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class SparseParts:
    """The on-disk arrays of a CSR or CSC matrix."""

    data: Any
    indices: Any
    indptr: np.ndarray
    shape: tuple[int, int]
    format: str  # "csr" or "csc"


def _chunk_len(arr: Any) -> int | None:
    """Rows per chunk when a chunk must be decoded whole, else ``None``.

    zarr chunks are always encoded; HDF5 chunks only when a filter (compression, shuffle,
    checksum) is set; unfiltered HDF5 chunks can be read in part at no extra cost.
    """
    chunks = getattr(arr, "chunks", None)
    if not chunks:
        return None
    plist = getattr(getattr(arr, "id", None), "get_create_plist", None)
    if plist is not None and plist().get_nfilters() == 0:
        return None
    return int(chunks[0])


def coalesce(starts: np.ndarray, stops: np.ndarray, *, max_gap: int, slack: int = 0,
             chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge sorted, non-overlapping, non-empty ranges into fewer reads.

    Two neighbours merge when the gap between them is at most ``max_gap`` elements and at
    most the length of the range before it plus ``slack`` (so the gaps read add up to no
    more than the ranges themselves, plus slack), or when they touch the same chunk of
    ``chunk`` elements. Returns ``(run_starts, run_stops, run_of)``, where ``run_of[i]`` is
    the run holding range ``i``.
    """
    if len(starts) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    gaps = starts[1:] - stops[:-1]
    merge = (gaps <= max_gap) & (gaps <= (stops - starts)[:-1] + slack)
    if chunk:
        merge |= (starts[1:] // chunk) <= ((stops[:-1] - 1) // chunk)
    breaks = np.flatnonzero(~merge)
    run_starts = starts[np.concatenate(([0], breaks + 1))]
    run_stops = stops[np.concatenate((breaks, [len(stops) - 1]))]
    run_of = np.concatenate(([0], np.cumsum(~merge))).astype(np.int64)
    return run_starts, run_stops, run_of


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(s, s + n)`` for every pair, vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shifts = starts - np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.repeat(shifts, lengths) + np.arange(total, dtype=np.int64)


def _read_runs(arr: Any, run_starts: np.ndarray, run_stops: np.ndarray) -> np.ndarray:
    """Read every run of a 1-D on-disk array into one contiguous buffer."""
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
        self.n_out = n_minor
        if self.all or sel is None:
            return
        if isinstance(sel, slice) and sel.indices(n_minor)[2] == 1:
            start, stop, _ = sel.indices(n_minor)
            self.slice = (start, max(start, stop))
            self.n_out = max(0, stop - start)
            return
        positions = to_array(sel, n_minor)
        unique, inverse = np.unique(positions, return_inverse=True)
        if len(unique) == len(positions):
            order = np.empty(len(positions), dtype=np.int64)  # keep the requested order
            order[:] = np.arange(len(positions))
            self.lookup = np.full(n_minor, -1, dtype=np.int64)
            self.lookup[positions] = order
            self.n_out = len(positions)
        else:  # repeated columns: filter the unique ones, expand at the end
            self.lookup = np.full(n_minor, -1, dtype=np.int64)
            self.lookup[unique] = np.arange(len(unique))
            self.inverse = inverse
            self.n_out = len(unique)

    def apply(self, indices: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Return ``(keep mask or None, new indices)`` for a batch of minor indices."""
        if self.all:
            return None, indices
        if self.slice is not None:
            lo, hi = self.slice
            keep = (indices >= lo) & (indices < hi)
            return keep, (indices[keep] - lo).astype(indices.dtype, copy=False)
        assert self.lookup is not None  # noqa: S101
        mapped = self.lookup[indices]
        keep = mapped >= 0
        return keep, mapped[keep].astype(indices.dtype, copy=False)


def read_sparse(parts: SparseParts, major: Selection | None, minor: Selection | None,
                prefetch: Prefetch | None = None) -> sp.spmatrix:
    """Read a subset of a compressed matrix along its compressed (major) axis.

    ``major`` selects rows of a CSR (columns of a CSC) matrix, ``minor`` the other axis.
    ``prefetch``, if given, is told each batch's element ranges before they are read (a
    remote file fetches them concurrently).
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
    max_gap = max(1, MAX_GAP_BYTES // item)
    chunk = _chunk_len(parts.data)
    ne_starts = starts[nonempty]
    run_starts, run_stops, run_of = coalesce(ne_starts, ne_starts + lengths[nonempty],
                                             max_gap=max_gap, slack=SLACK_BYTES // item,
                                             chunk=chunk)
    # group runs into batches of bounded size
    run_sizes = run_stops - run_starts
    batch_of_run = (np.cumsum(run_sizes) - run_sizes) // max(1, BATCH_BYTES // item)
    ne_rows = np.flatnonzero(nonempty)

    data_parts, index_parts = [], []
    counts = np.zeros(len(rows), dtype=np.int64)
    for batch in np.unique(batch_of_run):
        runs = np.flatnonzero(batch_of_run == batch)
        r0, r1 = int(runs[0]), int(runs[-1]) + 1
        if prefetch is not None:
            prefetch([(parts.data, run_starts[r0:r1], run_stops[r0:r1]),
                      (parts.indices, run_starts[r0:r1], run_stops[r0:r1])])
        data_buf = _read_runs(parts.data, run_starts[r0:r1], run_stops[r0:r1])
        index_buf = _read_runs(parts.indices, run_starts[r0:r1], run_stops[r0:r1])
        in_batch = (run_of >= r0) & (run_of < r1)
        sel_rows = ne_rows[in_batch]
        sel_runs = run_of[in_batch]
        buffer_offsets = np.concatenate(([0], np.cumsum(run_sizes[r0:r1])[:-1]))
        local_starts = buffer_offsets[sel_runs - r0] + (starts[sel_rows] - run_starts[sel_runs])
        sel_lengths = lengths[sel_rows]
        if int(sel_lengths.sum()) != len(data_buf):  # gaps were read: gather the rows
            gather = _expand(local_starts, sel_lengths)
            data_buf, index_buf = data_buf[gather], index_buf[gather]
        keep, new_indices = minor_filter.apply(index_buf)
        if keep is None:
            counts[sel_rows] = sel_lengths
            data_parts.append(data_buf)
        else:
            row_ids = np.repeat(np.arange(len(sel_rows)), sel_lengths)
            counts[sel_rows] = np.bincount(row_ids[keep], minlength=len(sel_rows))
            data_parts.append(data_buf[keep])
        index_parts.append(new_indices)

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
               prefetch: Prefetch | None = None) -> np.ndarray:
    """Read a subset of a dense on-disk array (1-D or 2-D) by coalesced row blocks."""
    n_rows = int(arr.shape[0])
    two_d = arr.ndim == 2
    n_cols = int(arr.shape[1]) if two_d else 1
    positions, inverse = _unique_sorted(rows if rows is not None else slice(0, n_rows), n_rows)
    col_sel: Any = slice(None)
    col_after: Any = None
    if two_d and cols is not None:
        if isinstance(cols, slice) and (cols.step or 1) > 0:
            col_sel = cols
        elif hasattr(arr, "oindex"):  # zarr: decode only the column chunks needed
            unique_cols, col_inverse = np.unique(to_array(cols, n_cols), return_inverse=True)
            col_sel, col_after = unique_cols, col_inverse
        else:
            col_after = to_array(cols, n_cols)
    n_out_cols = length(col_sel, n_cols) if two_d and not isinstance(col_sel, np.ndarray) \
        else (len(col_sel) if two_d else 0)
    row_bytes = max(1, n_cols * arr.dtype.itemsize)
    out_shape: tuple[int, ...] = (len(positions), n_out_cols) if two_d else (len(positions),)
    out = np.empty(out_shape, dtype=arr.dtype)
    blocks = _dense_blocks(positions, row_bytes, _chunk_len(arr))
    fetched_until = 0
    for i, (first, last) in enumerate(blocks):
        s, e = int(positions[first]), int(positions[last - 1]) + 1
        if prefetch is not None and i >= fetched_until:
            fetched_until = _prefetch_dense(prefetch, arr, positions, blocks, i, row_bytes)
        if two_d:
            block = arr.oindex[s:e, col_sel] if isinstance(col_sel, np.ndarray) \
                else arr[s:e, col_sel]
        else:
            block = arr[s:e]
        out[first:last] = block[positions[first:last] - s]
    if inverse is not None:
        out = out[inverse]
    if col_after is not None:
        out = out[:, col_after]
    return out


def _prefetch_dense(prefetch: Prefetch, arr: Any, positions: np.ndarray,
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


def _dense_blocks(positions: np.ndarray, row_bytes: int,
                  chunk: int | None) -> list[tuple[int, int]]:
    """Split sorted row positions into ``[first, last)`` groups, each read as one block.

    Rows closer than :data:`MAX_GAP_BYTES` (or in one chunk) share a block; no block spans
    more than :data:`BATCH_BYTES`.
    """
    if len(positions) == 0:
        return []
    run_starts, _, run_of = coalesce(positions, positions + 1,
                                     max_gap=max(1, MAX_GAP_BYTES // row_bytes),
                                     slack=SLACK_BYTES // row_bytes, chunk=chunk)
    window = (positions - run_starts[run_of]) // max(1, BATCH_BYTES // row_bytes)
    key = run_of * (int(window.max()) + 1) + window
    bounds = np.flatnonzero(np.diff(key)) + 1
    firsts = np.concatenate(([0], bounds)).tolist()
    lasts = np.concatenate((bounds, [len(positions)])).tolist()
    return list(zip(firsts, lasts, strict=True))


def read_matrix(elem: Any, rows: Selection | None, cols: Selection | None,
                prefetch: Prefetch | None = None) -> Any:
    """Read ``elem[rows, cols]`` of an on-disk dense array or :class:`SparseParts`.

    This is the one read path of lamin-io: accessors and loaders call it with the rows a
    request needs; it sorts, coalesces and batches them (see the module docstring).
    """
    if isinstance(elem, SparseParts):
        if elem.format == "csr":
            return read_sparse(elem, rows, cols, prefetch)
        return read_sparse(elem, cols, rows, prefetch)
    return read_dense(elem, rows, cols, prefetch)
