"""Where an HDF5 dataset's rows lie in the file, so remote reads can fetch exactly them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors.readpath.plan import expand

if TYPE_CHECKING:
    from lamin_io.accessors.readpath.hdf5_index import IndexReader

__all__ = ["byte_ranges", "direct_pieces", "direct_ranges", "is_direct", "load_tables"]


def is_direct(ds: Any) -> bool:
    """Whether a 1-D dataset's bytes can be read straight from the file, without HDF5.

    True for unfiltered datasets stored contiguously, or in chunks, as plain values
    (fixed-size numbers; not strings or compound types).
    """
    if not hasattr(ds, "id") or ds.ndim != 1 or ds.dtype.kind not in "biuf":
        return False
    if ds.chunks is None:
        return ds.id.get_offset() is not None
    return bool(ds.id.get_create_plist().get_nfilters() == 0)


def byte_ranges(ds: Any, starts: np.ndarray, stops: np.ndarray, cache: dict[str, Any],
                index: IndexReader | None = None) -> list[tuple[int, int]]:
    """Return the file byte ranges holding rows ``[starts[i], stops[i])`` of ``ds``.

    Contiguous datasets map rows to bytes directly; chunked datasets (compressed or not)
    map them to the chunks that hold them, located through the chunk index (cached in
    ``cache`` per dataset). Compact or unallocated datasets return nothing (their bytes
    sit in the metadata, which the file's block cache serves).
    """
    if not hasattr(ds, "id") or len(starts) == 0:
        return []
    chunks = ds.chunks
    rows_whole = chunks is not None and all(
        int(c) == int(n) for c, n in zip(chunks[1:], ds.shape[1:], strict=True))
    if chunks is None or rows_whole and ds.id.get_create_plist().get_nfilters() == 0:
        begin, end = direct_ranges(ds, starts, stops, cache, index)
        return list(zip(begin.tolist(), end.tolist(), strict=True))
    rows_per_chunk = int(chunks[0])
    first = np.asarray(starts) // rows_per_chunk
    last = (np.asarray(stops) - 1) // rows_per_chunk
    lengths = last - first + 1
    chunk_rows = np.unique(expand(first, lengths))
    other = [range(0, int(n), int(c)) for n, c in zip(ds.shape[1:], chunks[1:], strict=True)]
    key = f"chunks:{ds.name}"
    located: dict[tuple[int, ...], tuple[int, int] | None] = cache.setdefault(key, {})
    out = []
    for k in chunk_rows.tolist():
        for coord in _product(k * rows_per_chunk, other):
            if coord not in located:
                try:
                    info = ds.id.get_chunk_info_by_coord(coord)
                    located[coord] = (int(info.byte_offset), int(info.size))
                except (ValueError, KeyError, RuntimeError):
                    located[coord] = None  # an unwritten chunk reads as fill value
            where = located[coord]
            if where is not None and where[1] > 0:
                out.append((where[0], where[0] + where[1]))
    return out


def direct_ranges(ds: Any, starts: np.ndarray, stops: np.ndarray, cache: dict[str, Any],
                  index: IndexReader | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`byte_ranges` of a contiguous, or unfiltered and chunked by rows, dataset.

    Returns the ranges' starts and stops as arrays (nothing for an unallocated dataset).
    """
    begin, end, _ = direct_pieces(ds, starts, stops, cache, index)
    return begin, end


def direct_pieces(ds: Any, starts: np.ndarray, stops: np.ndarray, cache: dict[str, Any],
                  index: IndexReader | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`direct_ranges`, and for each byte range the position of its rows' range.

    A range of rows split across chunks gives several byte ranges, in order.
    """
    starts, stops = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
    which = np.flatnonzero(stops > starts)
    starts, stops = starts[which], stops[which]
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    if ds.chunks is not None:
        begin, end, piece_of = _partial_chunk_ranges(ds, starts, stops, int(ds.chunks[0]),
                                                     row_bytes, cache, index)
        return begin, end, which[piece_of]
    offset = ds.id.get_offset()
    if offset is None:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    return offset + starts * row_bytes, offset + stops * row_bytes, which


def _many(ds: Any, chunk_ids: np.ndarray, rows_per_chunk: int, cache: dict[str, Any]) -> bool:
    """Whether requests have touched an eighth of the chunks of ``ds``, these included."""
    located_now = cache.get(f"chunk-offsets:{ds.name}", {})
    missing = (sum(1 for k in chunk_ids.tolist() if k not in located_now) if located_now
               else len(chunk_ids))
    return (len(located_now) + missing) * 8 >= -(-int(ds.shape[0]) // rows_per_chunk)


def _keep_table(ds: Any, table: np.ndarray | None, cache: dict[str, Any]) -> None:
    if table is not None:
        cache[f"chunk-table:{ds.name}"] = table


def load_tables(items: list[tuple[Any, np.ndarray, np.ndarray]], cache: dict[str, Any],
                index: IndexReader | None) -> None:
    """Read, side by side, the chunk indexes that locating these rows will want.

    ``items`` are ``(dataset, starts, stops)`` as :func:`direct_ranges` takes them. The
    indexes of a sparse matrix's data and indices then cost the round trips of one.
    """
    from lamin_io.accessors.readpath.hdf5_index import chunk_tables

    if index is None:
        return
    wanting: list[Any] = []
    for ds, starts, stops in items:
        chunks = getattr(ds, "chunks", None)
        if (not chunks or ds.ndim != 1 or f"chunk-table-tried:{ds.name}" in cache
                or f"chunk-table:{ds.name}" in cache
                or any(ds.name == other.name for other in wanting)
                or ds.id.get_create_plist().get_nfilters() != 0):
            continue  # (chunks of filtered datasets are looked up one by one)
        n = int(chunks[0])
        starts, stops = np.asarray(starts), np.asarray(stops)
        keep = stops > starts
        if not keep.any():
            continue  # nothing to locate
        if index.whole or _many(ds, np.unique(_pieces(starts[keep], stops[keep], n)[0]), n,
                                cache):
            wanting.append(ds)
    for ds in wanting:
        cache[f"chunk-table-tried:{ds.name}"] = True  # (not again, should the walk raise)
    if wanting:
        for ds, table in zip(wanting, chunk_tables(wanting, index.read, index.size),
                             strict=True):
            _keep_table(ds, table, cache)


def _chunk_offsets(ds: Any, chunk_ids: np.ndarray, rows_per_chunk: int,
                   cache: dict[str, Any], index: IndexReader | None = None) -> np.ndarray:
    """File offsets of the given chunks (``-1`` where a chunk is not allocated).

    Looking one chunk up through HDF5 costs a walk of its chunk index (~30 us locally, a
    request per node remotely); listing the whole index costs ~4 us a chunk through HDF5,
    and a few concurrent reads through ``index`` (see :mod:`.hdf5_index`). So the whole
    index is read (and kept for the life of the open file) once requests (batches) have
    touched an eighth of the chunks, or always when ``index.whole``; until then chunks
    are looked up one by one (also kept).
    """
    from lamin_io.accessors.readpath.hdf5_index import chunk_table

    table: np.ndarray | None = cache.get(f"chunk-table:{ds.name}")
    if table is None:
        many = _many(ds, chunk_ids, rows_per_chunk, cache)
        if (index is not None and (many or index.whole)
                and f"chunk-table-tried:{ds.name}" not in cache):
            cache[f"chunk-table-tried:{ds.name}"] = True  # (not again, should it raise)
            table = chunk_table(ds, index.read, index.size)
            _keep_table(ds, table, cache)
        if table is None and many and hasattr(ds.id, "chunk_iter"):
            table = np.full(-(-int(ds.shape[0]) // rows_per_chunk), -1, dtype=np.int64)

            def visit(info: Any) -> None:
                if info.byte_offset is not None:
                    table[info.chunk_offset[0] // rows_per_chunk] = info.byte_offset

            ds.id.chunk_iter(visit)
            cache[f"chunk-table:{ds.name}"] = table
    if table is not None:
        return table[chunk_ids]
    located: dict[int, int] = cache.setdefault(f"chunk-offsets:{ds.name}", {})
    tail = (0,) * (len(ds.shape) - 1)
    out = np.empty(len(chunk_ids), dtype=np.int64)
    for i, k in enumerate(chunk_ids.tolist()):
        offset = located.get(k)
        if offset is None:
            try:
                info = ds.id.get_chunk_info_by_coord((k * rows_per_chunk, *tail))
                offset = int(info.byte_offset) if info.byte_offset is not None else -1
            except (ValueError, KeyError, RuntimeError):
                offset = -1
            located[k] = offset
        out[i] = offset
    return out


def _partial_chunk_ranges(ds: Any, starts: np.ndarray, stops: np.ndarray,
                          rows_per_chunk: int, row_bytes: int, cache: dict[str, Any],
                          index: IndexReader | None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact byte ranges inside unfiltered chunks that hold whole rows (vectorized).

    ``starts`` and ``stops`` are non-empty ranges. Unallocated chunks are skipped; callers
    compare sizes to notice them. Returns the byte ranges and, for each, its range's
    position in ``starts``.
    """
    chunk, n_pieces = _pieces(starts, stops, rows_per_chunk)
    piece_start = np.maximum(np.repeat(starts, n_pieces), chunk * rows_per_chunk)
    piece_stop = np.minimum(np.repeat(stops, n_pieces), (chunk + 1) * rows_per_chunk)
    unique, inverse = np.unique(chunk, return_inverse=True)
    offsets = _chunk_offsets(ds, unique, rows_per_chunk, cache, index)[inverse]
    allocated = offsets >= 0
    begin = offsets + (piece_start - chunk * rows_per_chunk) * row_bytes
    end = begin + (piece_stop - piece_start) * row_bytes
    piece_of = np.repeat(np.arange(len(starts)), n_pieces)
    return begin[allocated], end[allocated], piece_of[allocated]


def _pieces(starts: np.ndarray, stops: np.ndarray, rows_per_chunk: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Cut non-empty ranges at chunk edges: each piece's chunk, and the pieces a range."""
    first = starts // rows_per_chunk
    n_pieces = (stops - 1) // rows_per_chunk - first + 1
    return expand(first, n_pieces), n_pieces


def _product(row: int, other: list[range]) -> list[tuple[int, ...]]:
    coords: list[tuple[int, ...]] = [(row,)]
    for axis in other:
        coords = [(*c, o) for c in coords for o in axis]
    return coords
