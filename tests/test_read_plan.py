"""How the read path plans and pipelines reads: examples of its coalescing rules, and its
batches in flight (the bounds themselves are property-tested in ``test_readpath.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import grouped_h5ad

import lamin_io as ln
from lamin_io.accessors.readpath import Backend, Budget, Pending, SparseParts
from lamin_io.accessors.readpath.dense import read_dense
from lamin_io.accessors.readpath.plan import coalesce
from lamin_io.accessors.readpath.sparse import read_sparse

if TYPE_CHECKING:
    from pathlib import Path

    import anndata as ad

    from lamin_io.accessors.readpath.backend import Runs


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
        h5ad: tuple[Path, ad.AnnData], batch_bytes: int) -> None:
    """Batches are fetched ahead of their processing; tiny ones make many in a row."""
    path, adata = h5ad
    rows = np.flatnonzero(np.asarray(adata.obs["g"] == "b"))[::-1]  # unsorted
    genes = ["g5", "g399", "g0", "g77"]
    with ln.open(path) as acc:
        acc._store.budget = Budget(batch_bytes=batch_bytes)  # noqa: SLF001
        got = acc[rows, genes].X
        whole = acc[:].X
    np.testing.assert_array_equal(got.toarray(), adata[rows, genes].X.toarray())
    np.testing.assert_array_equal(whole.toarray(), adata.X.toarray())


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_batches_ahead_are_in_flight_together(h5ad: tuple[Path, ad.AnnData],
                                              ahead: int) -> None:
    """``ahead`` batches are on their way while one is waited for; a failure settles the
    others started (waits for their I/O, never finishes them)."""
    import h5py

    path, adata = h5ad
    log: list[tuple[str, int]] = []
    started = 0

    class Logging(Backend):
        def start_runs(self, items: list[Runs], *, advised: bool = False
                       ) -> Pending[list[np.ndarray]]:
            nonlocal started
            batch = started
            started += 1
            if batch == fail_start:
                raise RuntimeError("boom")
            log.append(("start", batch))
            read = super().start_runs(items)

            def wait() -> list[np.ndarray]:
                log.append(("wait", batch))
                if batch == fail_at:
                    raise RuntimeError("boom")
                return read()

            return Pending(wait, lambda: log.append(("settle", batch)))

    backend = Logging()
    backend.ahead = ahead
    small = Budget(batch_bytes=8192)
    rows = np.arange(0, adata.n_obs, 2)
    with h5py.File(path) as f:
        g = f["X"]
        parts = SparseParts(g["data"], g["indices"], g["indptr"][:], adata.shape, "csr")
        fail_at, fail_start = -1, -1
        got = read_sparse(backend, parts, rows, None, None, small)
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
                read_sparse(backend, parts, rows, None, None, small)
            # every started batch was finished or settled before the error left the
            # request; none was finished after the failure
            waited = [b for kind, b in log if kind == "wait"]
            settled = [b for kind, b in log if kind == "settle"]
            assert {b for kind, b in log if kind == "start"} == {*waited, *settled}
            assert settled
            if failing_wait >= 0:
                assert max(waited) == failing_wait


class _Dense:
    """A 2-D array in memory, chunked like a store's, for the dense read pipeline."""

    def __init__(self, values: np.ndarray, chunks: tuple[int, int]) -> None:
        self.values, self.chunks = values, chunks
        self.shape, self.dtype, self.ndim = values.shape, values.dtype, values.ndim


def _read_dense(backend: Backend, arr: _Dense, rows: np.ndarray, cols: np.ndarray,
                budget: Budget) -> np.ndarray:
    unique, inverse = np.unique(rows, return_inverse=True)
    return read_dense(backend, arr, unique, inverse, cols, budget)


@pytest.mark.parametrize("ahead", [1, 2])
def test_dense_blocks_ahead_are_in_flight_together(ahead: int) -> None:
    """``start_block`` batches: whole chunk rows, ``ahead`` started before one is waited
    for, and a failure settles every batch started and not finished (waits for its
    fetches, never decodes it) before it leaves the request."""
    values = np.arange(90 * 40, dtype=np.float32).reshape(90, 40)
    arr = _Dense(values, (7, 16))
    budget = Budget(gather_bytes=7 * 16 * 4 * 3)  # one row of 3 chunks a batch
    log: list[tuple[str, int]] = []
    started = 0
    fail_at = -1

    class Gathering(Backend):
        def gathers(self, a: object) -> bool:
            return True

        def start_block(self, a: _Dense, rows: np.ndarray,  # type: ignore[override]
                        cols: np.ndarray | None, out: np.ndarray) -> Pending[None]:
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

            return Pending(wait, lambda: log.append(("settle", batch)))

    backend = Gathering()
    backend.ahead = ahead
    rows, cols = np.array([89, 3, 3, 40, 0, 41, 60]), np.array([39, 0, 5, 5])
    got = _read_dense(backend, arr, rows, cols, budget)
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
        _read_dense(backend, arr, rows, cols, budget)
    waited = [b for kind, b in log if kind == "wait"]
    assert waited == [0, 1]  # none decoded after the failure
    settled = [b for kind, b in log if kind == "settle"]
    assert settled == list(range(1, min(n, 2 + ahead)))  # the failed one and those started
    assert {b for kind, b in log if kind == "start"} == {*waited, *settled}
