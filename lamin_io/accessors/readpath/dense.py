"""Rows (and columns) of a dense on-disk array, read by coalesced row blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors._index import length, to_array
from lamin_io.accessors.readpath.pipeline import pipelined
from lamin_io.accessors.readpath.plan import (
    DEFAULT_BUDGET,
    Budget,
    plan_dense,
    plan_gather,
    unique_sorted,
)

if TYPE_CHECKING:
    from lamin_io.accessors._index import Selection
    from lamin_io.accessors.readpath.backend import Backend

__all__ = ["read_dense"]


def read_dense(backend: Backend, arr: Any, rows: np.ndarray, row_inverse: np.ndarray | None,
               cols: Selection | None, budget: Budget = DEFAULT_BUDGET) -> np.ndarray:
    """Read rows ``rows`` (sorted, unique) and columns ``cols`` of a dense array.

    ``row_inverse`` restores the requested order and repeats (``None``: as sorted).
    ``cols`` selects the second axis of a 2-D array (``None``: all); arrays of more
    dimensions (``obsm`` cubes) are read whole along the other axes. Columns are selected
    per block, so memory follows the selection: the array library reads only the column
    chunks needed where it can (zarr), otherwise whole rows of one block at a time; a
    backend that gathers the array reads only the chunks holding a selected value.
    """
    two_d = arr.ndim == 2
    if two_d and backend.gathers(arr):
        out = _gather(backend, arr, rows, cols, budget)
        return out[row_inverse] if row_inverse is not None else out
    n_cols = int(arr.shape[1]) if two_d else 1
    col_sel: Any = slice(None) if two_d else None  # what the array library reads
    col_after: np.ndarray | None = None  # then selected in memory, per block
    if two_d and cols is not None:
        if isinstance(cols, slice) and (cols.step or 1) > 0:
            col_sel = cols
        elif hasattr(arr, "oindex"):  # zarr: decode only the column chunks needed
            col_sel, col_after = np.unique(to_array(cols, n_cols), return_inverse=True)
        else:
            col_after = to_array(cols, n_cols)
    tail: tuple[int, ...] = tuple(int(n) for n in arr.shape[1:])
    if two_d:
        tail = (len(col_after) if col_after is not None else length(col_sel, n_cols),)
    out = np.empty((len(rows), *tail), dtype=arr.dtype)
    layout = backend.layout(arr)
    blocks = plan_dense(rows, layout, budget)
    fetched_until = 0
    for i, (first, last) in enumerate(blocks):
        if i >= fetched_until:  # the next blocks, up to a batch's bytes, in one go
            fetched_until = _prefetch(backend, arr, rows, blocks, i, layout.itemsize, budget)
        s, e = int(rows[first]), int(rows[last - 1]) + 1
        block = backend.read_block(arr, s, e, col_sel)[rows[first:last] - s]
        out[first:last] = block[:, col_after] if col_after is not None else block
    return out[row_inverse] if row_inverse is not None else out


def _prefetch(backend: Backend, arr: Any, rows: np.ndarray, blocks: list[tuple[int, int]],
              i: int, row_bytes: int, budget: Budget) -> int:
    """Tell the backend blocks from ``i`` on, up to a batch; return the next one not told."""
    starts, stops, total, j = [], [], 0, i
    while j < len(blocks) and (j == i or total < budget.batch_bytes):
        s, e = int(rows[blocks[j][0]]), int(rows[blocks[j][1] - 1]) + 1
        starts.append(s)
        stops.append(e)
        total += (e - s) * row_bytes
        j += 1
    backend.prefetch([(arr, np.array(starts), np.array(stops))])
    return j


def _gather(backend: Backend, arr: Any, rows: np.ndarray, cols: Selection | None,
            budget: Budget) -> np.ndarray:
    """Read rows x ``cols`` of a 2-D array the backend gathers, batch by batch.

    Batches of whole row chunks (:func:`~lamin_io.accessors.readpath.plan.plan_gather`)
    are read straight into the output, ``backend.ahead`` in flight while one is decoded;
    the requested order and repeats of columns are restored at the end.
    """
    n_cols = int(arr.shape[1])
    col_pos: np.ndarray | None = None
    col_inverse: np.ndarray | None = None
    if cols is not None and not (isinstance(cols, slice) and cols.indices(n_cols) ==
                                 (0, n_cols, 1)):
        col_pos, col_inverse = unique_sorted(cols, n_cols)
    out = np.empty((len(rows), n_cols if col_pos is None else len(col_pos)), dtype=arr.dtype)
    size_rows, size_cols = (int(n) for n in arr.chunks)
    n_col_chunks = (-(-n_cols // size_cols) if col_pos is None
                    else len(np.unique(col_pos // size_cols)))
    batches = plan_gather(rows, size_rows,
                          n_col_chunks * size_rows * size_cols * arr.dtype.itemsize, budget)

    def start(b: int) -> Any:
        a, e = batches[b]
        return backend.start_block(arr, rows[a:e], col_pos, out[a:e])

    pipelined(len(batches), start, lambda b, _: None, ahead=backend.ahead)
    return out[:, col_inverse] if col_inverse is not None else out
