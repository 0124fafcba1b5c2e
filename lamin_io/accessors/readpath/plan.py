"""Planning reads: rows of an on-disk array -> ranges, runs and batches, with no I/O.

Every function here is pure: it takes positions, offsets and a :class:`Layout` (what is
known of how an array is stored) and returns what to read, so it can be tested on its own
(``tests/test_readpath_plan.py`` generates row sets, chunk layouts and gaps). The
backends execute the plans; :mod:`lamin_io.accessors.readpath.sparse` and ``.dense`` turn
what they read into matrices.

The bound every plan keeps (the README states it): a run reads through a gap only when it
is at most :attr:`Budget.max_gap_bytes` and at most the range before it plus the layout's
slack, so the bytes read are at most twice the bytes selected plus the slack once per
range; ranges in the same or adjacent chunks of a chunked layout are merged (the chunks
are read whole anyway), and a remote layout may merge across chunks holding nothing as
long as those number no more than the chunks holding ranges (at most twice their bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lamin_io.accessors._index import to_array

if TYPE_CHECKING:
    from lamin_io.accessors._index import Selection

__all__ = ["DEFAULT_BUDGET", "Budget", "Layout", "SparsePlan", "coalesce", "cut", "expand",
           "plan_dense", "plan_gather", "plan_sparse", "unique_sorted"]


@dataclass(frozen=True)
class Budget:
    """How much a request may read at once and through how large a gap.

    Tests pass small budgets to make many batches of a small file; the defaults were
    measured on the subset benchmark (see ``benchmarks/README.md``).
    """

    #: Two ranges separated by more bytes than this stay two reads.
    max_gap_bytes: int = 1 << 20
    #: Bytes one batch reads before columns are selected, roughly: a batch is cut before
    #: the run that starts past this bound, so its last run can take it to about twice
    #: as much (remote batches include the gaps read through). ``1 + ahead`` batches are
    #: in memory at once: one processed, the next ones on their way.
    batch_bytes: int = 4 << 20
    #: Decoded bytes of the chunks one batch covers where the store decodes chunks itself
    #: (:attr:`Layout.gathered`): it holds the selected values only, plus a chunk a thread.
    gather_bytes: int = 16 << 20
    #: Bytes of a request's runs (from its start) a local file is advised to read ahead:
    #: the page cache holds them until their batch copies them.
    advice_bytes: int = 256 << 20


DEFAULT_BUDGET = Budget()
#: A gap up to this size is always worth reading through in a local file (a page).
PAGE_BYTES = 4096


@dataclass(frozen=True)
class Layout:
    """What planning knows of how a 1-D array (or an array's rows) is stored.

    ``chunk``: elements (rows) per chunk that is read whole (encoded chunks; ``None``
    where any range costs its own bytes). ``bridge_chunks``: merge runs across chunks
    holding nothing, the shortest gaps first (remote stores pay per request).
    ``slack_bytes``: gaps this small are read through even after a short range (a local
    page). ``gathered``: the store decodes chunks itself and takes exact ranges, in
    batches that never share a chunk.
    """

    itemsize: int
    chunk: int | None = None
    bridge_chunks: bool = False
    slack_bytes: int = 0
    gathered: bool = False


def expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(s, s + n)`` for every pair, vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shifts = starts - np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.repeat(shifts, lengths) + np.arange(total, dtype=np.int64)


def unique_sorted(sel: Selection, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted unique positions and the inverse that restores the request (None: same)."""
    positions = to_array(sel, n)
    if isinstance(sel, slice) and (sel.step or 1) > 0:
        return positions, None
    if len(positions) < 2 or bool(np.all(positions[1:] > positions[:-1])):
        return positions, None
    unique, inverse = np.unique(positions, return_inverse=True)
    return unique, inverse


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
    Runs are cut so none spans more than ``max_run`` elements (a single range longer than
    that stays whole), and between ranges on either side of a multiple of ``cut_every``.
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


def cut(rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
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


@dataclass(frozen=True)
class SparsePlan:
    """What to read of a compressed matrix's ``data`` and ``indices`` for some rows.

    Rows (of the compressed axis) are cut into *pieces* (a row's elements; a row crossing
    a gathered batch's window gives two), pieces merged into *runs* (one read each), runs
    grouped into *batches* (``batches[b] = (first run, end run)``) read one after the
    other, a few in flight.
    """

    piece_rows: np.ndarray  # position of each piece's row among the requested rows
    piece_starts: np.ndarray  # element offsets
    piece_lengths: np.ndarray
    run_starts: np.ndarray
    run_stops: np.ndarray
    run_of: np.ndarray  # run of each piece
    batches: list[tuple[int, int]]

    def runs(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the runs' ``(starts, stops)`` of batch ``b``."""
        r0, r1 = self.batches[b]
        return self.run_starts[r0:r1], self.run_stops[r0:r1]

    def pieces(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return batch ``b``'s pieces: ``(rows, starts in its buffer, lengths)``.

        The buffer holds the batch's runs concatenated; a row has at most one piece in a
        batch.
        """
        r0, r1 = self.batches[b]
        inside = (self.run_of >= r0) & (self.run_of < r1)
        runs = self.run_of[inside]
        sizes = self.run_stops[r0:r1] - self.run_starts[r0:r1]
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        starts = offsets[runs - r0] + (self.piece_starts[inside] - self.run_starts[runs])
        return self.piece_rows[inside], starts, self.piece_lengths[inside]

    def advised_runs(self, budget: Budget, itemsize: int) -> int:
        """Return how many runs a local file is told up front (0: none).

        The budget's worth of bytes, at least the first batch; only for two batches or
        more.
        """
        if len(self.batches) < 2:
            return 0
        sizes = self.run_stops - self.run_starts
        last = int(np.searchsorted(np.cumsum(sizes), budget.advice_bytes // itemsize, "right"))
        return max(last, self.batches[0][1])


def _batches(batch_of_run: np.ndarray) -> list[tuple[int, int]]:
    if len(batch_of_run) == 0:
        return []
    bounds = np.flatnonzero(np.diff(batch_of_run)) + 1
    return list(zip([0, *bounds.tolist()], [*bounds.tolist(), len(batch_of_run)],
                    strict=True))


def plan_sparse(indptr: np.ndarray, rows: np.ndarray, layout: Layout,
                budget: Budget = DEFAULT_BUDGET) -> SparsePlan:
    """Plan reading rows ``rows`` (sorted, unique) of a compressed matrix.

    ``layout.itemsize`` is the bytes of one element of ``data`` and ``indices`` together.
    """
    starts = indptr[rows].astype(np.int64)
    lengths = indptr[rows + 1].astype(np.int64) - starts
    nonempty = lengths > 0
    item = layout.itemsize
    piece_rows, piece_starts, piece_lengths = (np.flatnonzero(nonempty), starts[nonempty],
                                               lengths[nonempty])
    if layout.gathered and layout.chunk:
        # exact ranges, cut at windows of whole chunks: a batch decodes its chunks alone
        window = max(1, budget.gather_bytes // item // layout.chunk) * layout.chunk
        piece_rows, piece_starts, piece_lengths = cut(piece_rows, piece_starts,
                                                      piece_lengths, window)
        run_starts, run_stops, run_of = coalesce(piece_starts, piece_starts + piece_lengths,
                                                 max_gap=0, cut_every=window)
        batch_of_run = run_starts // window
    else:
        batch_elements = max(1, budget.batch_bytes // item)
        run_starts, run_stops, run_of = coalesce(
            piece_starts, piece_starts + piece_lengths,
            max_gap=max(1, budget.max_gap_bytes // item), slack=layout.slack_bytes // item,
            chunk=layout.chunk, max_run=batch_elements, bridge_chunks=layout.bridge_chunks)
        sizes = run_stops - run_starts
        batch_of_run = (np.cumsum(sizes) - sizes) // batch_elements
    return SparsePlan(piece_rows, piece_starts, piece_lengths, run_starts, run_stops, run_of,
                      _batches(batch_of_run))


def plan_dense(positions: np.ndarray, layout: Layout,
               budget: Budget = DEFAULT_BUDGET) -> list[tuple[int, int]]:
    """Split sorted unique rows into ``[first, last)`` groups, each read as one block.

    ``layout.itemsize`` is the bytes of one row. Rows closer than the budget's gap (or in
    one chunk) share a block; no block spans more than :attr:`Budget.batch_bytes`, and
    with chunks no chunk is read by two blocks.
    """
    if len(positions) == 0:
        return []
    row_bytes, chunk = layout.itemsize, layout.chunk
    run_starts, _, run_of = coalesce(positions, positions + 1,
                                     max_gap=max(1, budget.max_gap_bytes // row_bytes),
                                     slack=layout.slack_bytes // row_bytes, chunk=chunk)
    per_block = max(1, budget.batch_bytes // row_bytes)
    if chunk:  # blocks of whole chunks (at least one): no chunk is decoded by two blocks
        window = positions // (chunk * max(1, per_block // chunk))
    else:
        window = (positions - run_starts[run_of]) // per_block
    bounds = np.flatnonzero((np.diff(run_of) != 0) | (np.diff(window) != 0)) + 1
    firsts = np.concatenate(([0], bounds)).tolist()
    lasts = np.concatenate((bounds, [len(positions)])).tolist()
    return list(zip(firsts, lasts, strict=True))


def plan_gather(positions: np.ndarray, chunk_rows: int, chunk_bytes: int,
                budget: Budget = DEFAULT_BUDGET) -> list[tuple[int, int]]:
    """Split sorted unique rows of a 2-D array the store gathers into ``[first, last)`` batches.

    Batches of whole row chunks (at least one), ``chunk_bytes`` being the decoded bytes
    of one row chunk's selected column chunks, up to :attr:`Budget.gather_bytes`.
    """
    per_batch = max(1, budget.gather_bytes // max(1, chunk_bytes))
    row_chunk = positions // chunk_rows
    rank = np.cumsum(np.diff(row_chunk, prepend=-1) != 0) - 1  # of a row's chunk, 0, 1, ..
    cuts = (np.flatnonzero(np.diff(rank // per_batch)) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, len(positions)], strict=True))
