"""Rows of a CSR matrix (columns of a CSC one) read batch by batch into a scipy matrix."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors._index import to_array
from lamin_io.accessors.readpath.pipeline import pipelined
from lamin_io.accessors.readpath.plan import DEFAULT_BUDGET, Budget, expand, plan_sparse

if TYPE_CHECKING:
    from collections.abc import Callable

    import scipy.sparse as sp

    from lamin_io.accessors._index import Selection
    from lamin_io.accessors.readpath.backend import Backend

__all__ = ["SparseParts", "read_sparse"]


@dataclass(frozen=True)
class SparseParts:
    """The on-disk arrays of a CSR or CSC matrix."""

    data: Any
    indices: Any
    indptr: np.ndarray
    shape: tuple[int, int]
    format: str  # "csr" or "csc"


class MinorFilter:
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
        if isinstance(sel, slice) and sel.indices(n_minor)[2] == 1:
            start, stop, _ = sel.indices(n_minor)
            self.slice = (start, max(start, stop))
            self.n_out = max(0, stop - start)
            return
        positions = to_array(sel, n_minor)
        unique, inverse = np.unique(positions, return_inverse=True)
        self.lookup = np.full(n_minor, -1, dtype=np.int32 if n_minor < 2**31 else np.int64)
        if len(unique) == len(positions):  # new index = position in the request
            self.lookup[positions] = np.arange(len(positions))
        else:  # repeated columns: filter the unique ones, expand at the end
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


class _Assembly:
    """The selected elements of each batch, kept as they come, and the rows' counts."""

    def __init__(self, n_rows: int, minor: MinorFilter) -> None:
        self.minor = minor
        self.counts = np.zeros(n_rows, dtype=np.int64)
        self.data: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []

    def add(self, data: np.ndarray, indices: np.ndarray, rows: np.ndarray, starts: np.ndarray,
            lengths: np.ndarray) -> None:
        """Keep the selected elements of pieces ``[starts, starts + lengths)`` of a buffer."""
        n_selected = int(lengths.sum())
        inside = None
        if 4 * n_selected < len(data):  # a small selection in a large read: gather it
            gather = expand(starts, lengths)
            data, indices = data[gather], indices[gather]
            starts = np.cumsum(lengths) - lengths
        elif n_selected != len(data):  # gaps were read: mask them out
            inside = _inside_mask(len(data), starts, lengths)
        keep = self.minor.mask(indices)
        if inside is not None:
            keep = inside if keep is None else keep & inside
        if keep is None:
            self.counts[rows] += lengths
        elif 8 * int(np.count_nonzero(keep)) < len(keep):  # few kept (a gene list)
            at = np.flatnonzero(keep)
            row_of = np.searchsorted(starts, at, side="right") - 1
            self.counts[rows] += np.bincount(row_of, minlength=len(rows))
            data, indices = data[at], indices[at]
        else:
            kept = np.concatenate(([0], np.cumsum(keep, dtype=np.int64 if len(keep) >= 2**31
                                                  else np.int32)))
            self.counts[rows] += kept[starts + lengths] - kept[starts]
            data, indices = data[keep], indices[keep]
        self.data.append(data)
        self.indices.append(self.minor.remap(indices))

    def matrix(self, parts: SparseParts, row_inverse: np.ndarray | None) -> sp.spmatrix:
        import scipy.sparse as sp

        data = (np.concatenate(self.data) if self.data
                else np.empty(0, dtype=parts.data.dtype))
        indices = (np.concatenate(self.indices) if self.indices
                   else np.empty(0, dtype=parts.indices.dtype))
        indptr = np.concatenate(([0], np.cumsum(self.counts)))
        shape = (len(self.counts), self.minor.n_out)
        csr = parts.format == "csr"
        mat = (sp.csr_matrix if csr else sp.csc_matrix)((data, indices, indptr),
                                                        shape=shape if csr else shape[::-1])
        if self.minor.lookup is not None:
            mat.has_sorted_indices = False
            mat.sort_indices()
        major_inverse, minor_inverse = row_inverse, self.minor.inverse
        if major_inverse is not None:
            mat = mat[major_inverse] if csr else mat[:, major_inverse]
        if minor_inverse is not None:
            mat = mat[:, minor_inverse] if csr else mat[minor_inverse]
        return mat


def read_sparse(backend: Backend, parts: SparseParts, rows: np.ndarray,
                row_inverse: np.ndarray | None, minor: Selection | None,
                budget: Budget = DEFAULT_BUDGET) -> sp.spmatrix:
    """Read rows ``rows`` (sorted, unique) of a compressed matrix's compressed axis.

    ``row_inverse`` restores the requested order and repeats (``None``: as sorted);
    ``minor`` selects the other axis. The plan's batches are read ``backend.ahead`` in
    flight; a local file is advised the first ones up front.
    """
    n_minor = parts.shape[1] if parts.format == "csr" else parts.shape[0]
    item = parts.data.dtype.itemsize + parts.indices.dtype.itemsize
    layout = backend.layout(parts.data, item)
    if layout.gathered and not (backend.gathers(parts.indices)
                                and parts.data.chunks == parts.indices.chunks):
        layout = replace(layout, gathered=False)
    plan = plan_sparse(parts.indptr, rows, layout, budget)
    out = _Assembly(len(rows), MinorFilter(minor, n_minor))

    def runs(stop: int, start: int = 0) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        s, e = plan.run_starts[start:stop], plan.run_stops[start:stop]
        return [(parts.data, s, e), (parts.indices, s, e)]

    advised = plan.advised_runs(budget, item)
    end_advice: Callable[[], None] | None = backend.advise(runs(advised)) if advised else None
    if end_advice is None:
        advised = 0

    def start(b: int) -> Any:
        r0, r1 = plan.batches[b]
        return backend.start_runs(runs(r1, r0), advised=r1 <= advised)

    def use(b: int, buffers: list[np.ndarray]) -> None:
        out.add(buffers[0], buffers[1], *plan.pieces(b))

    # no read-ahead outlives the request: a failed one ends it before settling its reads
    pipelined(len(plan.batches), start, use, ahead=backend.ahead, on_failure=end_advice)
    if end_advice is not None:
        end_advice()
    return out.matrix(parts, row_inverse)
