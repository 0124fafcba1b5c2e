"""Where an HDF5 dataset's rows lie in the file, so remote reads can fetch exactly them."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["byte_ranges"]


def byte_ranges(ds: Any, starts: np.ndarray, stops: np.ndarray,
                cache: dict[str, Any]) -> list[tuple[int, int]]:
    """Return the file byte ranges holding rows ``[starts[i], stops[i])`` of ``ds``.

    Contiguous datasets map rows to bytes directly; chunked datasets (compressed or not)
    map them to the chunks that hold them, located through the chunk index (cached in
    ``cache`` per dataset). Compact or unallocated datasets return nothing (their bytes
    sit in the metadata, which the file's block cache serves).
    """
    if not hasattr(ds, "id") or len(starts) == 0:
        return []
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    chunks = ds.chunks
    if chunks is None:
        offset = ds.id.get_offset()
        if offset is None:
            return []
        return [(offset + int(s) * row_bytes, offset + int(e) * row_bytes)
                for s, e in zip(starts.tolist(), stops.tolist(), strict=True) if e > s]
    rows_per_chunk = int(chunks[0])
    unfiltered = ds.id.get_create_plist().get_nfilters() == 0
    rows_whole = all(int(c) == int(n) for c, n in zip(chunks[1:], ds.shape[1:], strict=True))
    if unfiltered and rows_whole:
        return _partial_chunk_ranges(ds, starts, stops, rows_per_chunk, row_bytes, cache)
    first = np.asarray(starts) // rows_per_chunk
    last = (np.asarray(stops) - 1) // rows_per_chunk
    lengths = last - first + 1
    chunk_rows = np.unique(np.repeat(first, lengths) + _ramp(lengths))
    other = [range(0, int(n), int(c)) for n, c in zip(ds.shape[1:], chunks[1:], strict=True)]
    key = f"chunks:{ds.file.filename}:{ds.name}"
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


def _chunk_offset(ds: Any, k: int, rows_per_chunk: int, cache: dict[str, Any]) -> int | None:
    key = f"chunks:{ds.file.filename}:{ds.name}"
    located: dict[tuple[int, ...], tuple[int, int] | None] = cache.setdefault(key, {})
    coord = (k * rows_per_chunk,) + (0,) * (len(ds.shape) - 1)
    if coord not in located:
        try:
            info = ds.id.get_chunk_info_by_coord(coord)
            located[coord] = (int(info.byte_offset), int(info.size))
        except (ValueError, KeyError, RuntimeError):
            located[coord] = None
    where = located[coord]
    return None if where is None else where[0]


def _partial_chunk_ranges(ds: Any, starts: np.ndarray, stops: np.ndarray,
                          rows_per_chunk: int, row_bytes: int,
                          cache: dict[str, Any]) -> list[tuple[int, int]]:
    """Exact byte ranges inside unfiltered chunks that hold whole rows."""
    out = []
    for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
        row = s
        while row < e:
            k = row // rows_per_chunk
            piece_end = min(e, (k + 1) * rows_per_chunk)
            base = _chunk_offset(ds, k, rows_per_chunk, cache)
            if base is not None:
                inner = row - k * rows_per_chunk
                out.append((base + inner * row_bytes,
                            base + (inner + piece_end - row) * row_bytes))
            row = piece_end
    return out


def _ramp(lengths: np.ndarray) -> np.ndarray:
    total = int(lengths.sum())
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.arange(total) - np.repeat(starts, lengths)


def _product(row: int, other: list[range]) -> list[tuple[int, ...]]:
    coords: list[tuple[int, ...]] = [(row,)]
    for axis in other:
        coords = [(*c, o) for c in coords for o in axis]
    return coords
