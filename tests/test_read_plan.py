"""How the read path plans reads: coalescing rules, their byte bounds, and batching."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import grouped_h5ad

import lamin_io as ln
from lamin_io.accessors import _rows
from lamin_io.accessors._rows import coalesce

if TYPE_CHECKING:
    from pathlib import Path

    import anndata as ad


def _chunks_read(starts: np.ndarray, stops: np.ndarray, chunk: int) -> set[int]:
    return {c for s, e in zip(starts.tolist(), stops.tolist(), strict=True)
            for c in range(s // chunk, (e - 1) // chunk + 1)}


@pytest.mark.parametrize("seed", range(20))
def test_bridging_chunks_reads_at_most_twice_the_chunks_holding_ranges(seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunk = 100
    # sorted, disjoint ranges, clustered so that some chunks hold none
    starts = np.sort(rng.choice(20_000, size=rng.integers(1, 300), replace=False)) * 5
    stops = starts + rng.integers(1, 5, size=len(starts))
    holding = _chunks_read(starts, stops, chunk)
    run_starts, run_stops, run_of = coalesce(starts, stops, max_gap=0, chunk=chunk,
                                             bridge_chunks=True)
    read = _chunks_read(run_starts, run_stops, chunk)
    assert holding <= read
    assert len(read) <= 2 * len(holding)
    # every range lies in its run, and runs are sorted and disjoint
    assert np.all(run_starts[run_of] <= starts)
    assert np.all(stops <= run_stops[run_of])
    assert np.all(run_stops[:-1] < run_starts[1:])
    # fewer runs than merging only neighbouring chunks
    plain = coalesce(starts, stops, max_gap=0, chunk=chunk)[0]
    assert len(run_starts) <= len(plain)


def test_bridging_takes_the_shortest_gaps_first() -> None:
    chunk = 10
    # ranges in chunks 0, 2, 3, 9 and 30: gaps of 1, 5 and 20 empty chunks
    starts = np.array([0, 20, 30, 90, 300])
    stops = starts + 1
    run_starts, _, run_of = coalesce(starts, stops, max_gap=0, chunk=chunk,
                                     bridge_chunks=True)
    # 5 chunks hold ranges: the gaps of 1 and then 5 fit (6 > 5 does not: only the 1)
    assert run_of.tolist() == [0, 0, 0, 1, 2]
    assert run_starts.tolist() == [0, 90, 300]


def test_cut_every_keeps_runs_inside_windows() -> None:
    starts = np.arange(0, 100, 10)
    stops = starts + 10  # touching ranges: one run without a cut
    run_starts, run_stops, _ = coalesce(starts, stops, max_gap=0, cut_every=30)
    assert run_starts.tolist() == [0, 30, 60, 90]
    assert run_stops.tolist() == [30, 60, 90, 100]


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ad.AnnData]:
    path = tmp_path_factory.mktemp("plan") / "small.h5ad"
    return path, grouped_h5ad(path, 3000, 400, "abcd", seed=7)


@pytest.mark.parametrize("batch_bytes", [64, 4096, 40_000])
def test_many_small_batches_in_flight_give_the_same_answer(
        h5ad: tuple[Path, ad.AnnData], batch_bytes: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are fetched ahead of their processing; tiny ones make many in a row."""
    path, adata = h5ad
    monkeypatch.setattr(_rows, "BATCH_BYTES", batch_bytes)
    rows = np.flatnonzero(np.asarray(adata.obs["g"] == "b"))[::-1]  # unsorted
    genes = ["g5", "g399", "g0", "g77"]
    with ln.open(path) as acc:
        got = acc[rows, genes].X
        whole = acc[:].X
    np.testing.assert_array_equal(got.toarray(), adata[rows, genes].X.toarray())
    np.testing.assert_array_equal(whole.toarray(), adata.X.toarray())


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_batches_ahead_are_in_flight_together(h5ad: tuple[Path, ad.AnnData], ahead: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``ahead`` batches are on their way while one is waited for; a failure settles the
    others started (waits for their I/O, never finishes them)."""
    import h5py

    path, adata = h5ad
    monkeypatch.setattr(_rows, "BATCH_BYTES", 8192)
    log: list[tuple[str, int]] = []
    started = 0

    def start_runs(items: list[tuple[object, np.ndarray, np.ndarray]], *,
                   advised: bool = False) -> object:
        nonlocal started
        batch = started
        started += 1
        if batch == fail_start:
            raise RuntimeError("boom")
        log.append(("start", batch))

        def wait() -> list[None]:
            log.append(("wait", batch))
            if batch == fail_at:
                raise RuntimeError("boom")
            return [None] * len(items)

        return _rows.Pending(wait, lambda: log.append(("settle", batch)))

    rows = np.arange(0, adata.n_obs, 2)
    with h5py.File(path) as f:
        g = f["X"]
        parts = _rows.SparseParts(g["data"], g["indices"], g["indptr"][:], adata.shape, "csr")
        hooks = _rows.ReadHooks(start_runs=start_runs, ahead=ahead)  # type: ignore[arg-type]
        fail_at, fail_start = -1, -1
        got = _rows.read_sparse(parts, rows, None, hooks)
        np.testing.assert_array_equal(got.toarray(), adata.X[rows].toarray())
        n = started
        assert n > ahead + 2
        first_wait = log.index(("wait", 0))
        assert log[:first_wait] == [("start", b) for b in range(ahead + 1)]
        # batch b + ahead is started before batch b is waited for
        for b in range(n - ahead):
            assert log.index(("start", b + ahead)) < log.index(("wait", b))
        for failing_wait, failing_start in ((2, -1), (-1, 1), (-1, ahead + 1)):
            # a wait that fails, and starts that fail (while the first batches start, and
            # in the loop)
            log.clear()
            started, fail_at, fail_start = 0, failing_wait, failing_start
            with pytest.raises(RuntimeError, match="boom"):
                _rows.read_sparse(parts, rows, None, hooks)
            # every started batch was finished or settled before the error left the
            # request; none was finished after the failure
            waited = [b for kind, b in log if kind == "wait"]
            settled = [b for kind, b in log if kind == "settle"]
            assert {b for kind, b in log if kind == "start"} == {*waited, *settled}
            assert settled
            if failing_wait >= 0:
                assert max(waited) == failing_wait


@pytest.mark.parametrize("seed", range(20))
def test_dense_blocks_never_split_a_chunk(seed: int) -> None:
    """Blocks read through the array library hold whole chunks, so none is decoded twice."""
    rng = np.random.default_rng(seed)
    chunk = int(rng.integers(1, 200))
    positions = np.sort(rng.choice(5000, size=rng.integers(1, 600), replace=False))
    row_bytes = int(rng.choice([8, 4096, 80_000, 1 << 20, 8 << 20]))  # blocks of any rows
    blocks = _rows._dense_blocks(positions, row_bytes, chunk)
    assert [a for a, _ in blocks] == [0, *(b for _, b in blocks[:-1])]  # all, in order
    assert blocks[-1][1] == len(positions)
    block_of_chunk: dict[int, int] = {}
    for i, (a, b) in enumerate(blocks):
        for c in (positions[a:b] // chunk).tolist():
            assert block_of_chunk.setdefault(c, i) == i
    # a block spans at most BATCH_BYTES of rows, or one chunk where a chunk is more
    span = max(1, _rows.BATCH_BYTES // row_bytes)
    for a, b in blocks:
        assert positions[b - 1] // chunk - positions[a] // chunk < max(1, span // chunk)


class _Dense:
    """A 2-D array in memory, chunked like a store's, for the dense read pipeline."""

    def __init__(self, values: np.ndarray, chunks: tuple[int, int]) -> None:
        self.values, self.chunks = values, chunks
        self.shape, self.dtype, self.ndim = values.shape, values.dtype, values.ndim


@pytest.mark.parametrize("ahead", [1, 2])
def test_dense_blocks_ahead_are_in_flight_together(ahead: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``start_block`` batches: whole chunk rows, ``ahead`` started before one is waited
    for, and a failure settles every other started batch (waits for its fetches, never
    decodes it) before it leaves the request."""
    values = np.arange(90 * 40, dtype=np.float32).reshape(90, 40)
    arr = _Dense(values, (7, 16))
    monkeypatch.setattr(_rows, "GATHER_BYTES", 7 * 16 * 4 * 3)  # one row of 3 chunks a batch
    log: list[tuple[str, int]] = []
    started = 0
    fail_at = -1

    def start_block(a: _Dense, rows: np.ndarray, cols: np.ndarray | None,
                    out: np.ndarray) -> object:
        nonlocal started
        batch = started
        started += 1
        assert len(set((rows // 7).tolist())) == 1  # one row of chunks
        log.append(("start", batch))

        def wait() -> None:
            log.append(("wait", batch))
            if batch == fail_at:
                raise RuntimeError("boom")
            out[...] = a.values[np.ix_(rows, cols if cols is not None else np.arange(40))]

        return _rows.Pending(wait, lambda: log.append(("settle", batch)))

    hooks = _rows.ReadHooks(gathers=lambda a: True, start_block=start_block,  # type: ignore[arg-type]
                            ahead=ahead)
    rows, cols = np.array([89, 3, 3, 40, 0, 41, 60]), np.array([39, 0, 5, 5])
    got = _rows.read_matrix(arr, rows, cols, hooks)
    np.testing.assert_array_equal(got, values[np.ix_(rows, cols)])
    n = started
    assert n == len({0, 40 // 7, 60 // 7, 89 // 7})
    for b in range(n - ahead):
        assert log.index(("start", b + ahead)) < log.index(("wait", b))
    log.clear()
    assert not [kind for kind, _ in log if kind == "settle"]
    log.clear()
    started, fail_at = 0, 1
    with pytest.raises(RuntimeError, match="boom"):
        _rows.read_matrix(arr, rows, cols, hooks)
    waited = [b for kind, b in log if kind == "wait"]
    assert waited == [0, 1]  # none decoded after the failure
    settled = [b for kind, b in log if kind == "settle"]
    assert settled == list(range(2, min(n, 2 + ahead)))  # those started, once each
    assert {b for kind, b in log if kind == "start"} == {*waited, *settled}
