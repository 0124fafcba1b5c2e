"""The read path by property: generated row sets, chunk layouts, gaps, dtypes and budgets.

Planning is pure, so its bounds are checked on the plans themselves: every selected element
is read, runs never overlap, and what is read through gaps stays within the bound the README
states (about twice the selected bytes; twice the chunks holding the selection where chunks
are read whole). Each backend's read is compared with the array library's on the same
selection, for matrices written by h5py and zarr in many layouts, locally and on the S3
server, with budgets small enough to cut a read into many batches.
"""

from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import upload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamin_io import errors
from lamin_io.accessors.readpath import Budget, Layout, Source
from lamin_io.accessors.readpath.plan import coalesce, plan_dense, plan_gather, plan_sparse
from lamin_io.storage import to_upath

if TYPE_CHECKING:
    from pathlib import Path

FAST = settings(max_examples=60, deadline=None)
FILES = settings(max_examples=30, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


# -- planning -------------------------------------------------------------------------------

@st.composite
def sorted_ranges(draw: st.DrawFn, max_n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint, non-empty ranges: gaps from touching to far apart."""
    n = draw(st.integers(1, max_n))
    gaps = np.array(draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 5000)),
                                  min_size=n, max_size=n)), dtype=np.int64)
    lengths = np.array(draw(st.lists(st.one_of(st.integers(1, 4), st.integers(1, 3000)),
                                     min_size=n, max_size=n)), dtype=np.int64)
    starts = np.cumsum(gaps + lengths) - lengths
    return starts, starts + lengths


def _chunks_of(starts: np.ndarray, stops: np.ndarray, chunk: int) -> set[int]:
    return {c for s, e in zip(starts.tolist(), stops.tolist(), strict=True)
            for c in range(s // chunk, (e - 1) // chunk + 1)}


def _check_runs(starts: np.ndarray, stops: np.ndarray, run_starts: np.ndarray,
                run_stops: np.ndarray, run_of: np.ndarray) -> None:
    """Every range lies in its run; runs are sorted, disjoint, and start and end at ranges."""
    assert np.all(run_starts[run_of] <= starts)
    assert np.all(stops <= run_stops[run_of])
    assert np.all(np.diff(run_of) >= 0)
    assert np.all(run_stops[:-1] <= run_starts[1:])
    assert set(run_starts.tolist()) <= set(starts.tolist())
    assert set(run_stops.tolist()) <= set(stops.tolist())


@FAST
@given(sorted_ranges(), st.integers(0, 4096), st.integers(0, 64),
       st.one_of(st.none(), st.integers(1, 20_000)))
def test_runs_read_at_most_twice_the_ranges_plus_slack(
        ranges: tuple[np.ndarray, np.ndarray], max_gap: int, slack: int,
        max_run: int | None) -> None:
    """Ranges any range costs its bytes (local files, unfiltered HDF5)."""
    starts, stops = ranges
    run_starts, run_stops, run_of = coalesce(starts, stops, max_gap=max_gap, slack=slack,
                                             max_run=max_run)
    _check_runs(starts, stops, run_starts, run_stops, run_of)
    selected = int((stops - starts).sum())
    read = int((run_stops - run_starts).sum())
    assert read <= 2 * selected + slack * (len(starts) - 1)
    # no gap read through is larger than the largest allowed
    inner = run_of[1:] == run_of[:-1]
    assert np.all((starts[1:] - stops[:-1])[inner] <= max_gap)
    if max_run is not None:  # a run's ranges all start within max_run of the run's start
        assert np.all(starts - run_starts[run_of] < max_run)


@FAST
@given(sorted_ranges(), st.integers(1, 500), st.integers(0, 4096), st.integers(0, 64),
       st.booleans())
def test_chunked_runs_read_at_most_twice_the_chunks_holding_ranges(
        ranges: tuple[np.ndarray, np.ndarray], chunk: int, max_gap: int, slack: int,
        bridge: bool) -> None:
    """Ranges of encoded chunks (read whole): chunks without a range are read only within
    the bound; remote stores (``bridge_chunks``, no slack) also merge across them."""
    starts, stops = ranges
    if bridge:
        slack = 0  # remote layouts have none
    run_starts, run_stops, run_of = coalesce(starts, stops, max_gap=max_gap, slack=slack,
                                             chunk=chunk, bridge_chunks=bridge)
    _check_runs(starts, stops, run_starts, run_stops, run_of)
    holding = _chunks_of(starts, stops, chunk)
    read = _chunks_of(run_starts, run_stops, chunk)
    assert holding <= read
    assert len(read) <= 2 * len(holding) + (len(starts) - 1) * -(-slack // chunk)
    # neighbours in the same or adjacent chunks always share a run: no chunk read twice
    same = (starts[1:] // chunk) - ((stops[:-1] - 1) // chunk) <= 1
    assert np.all(run_of[1:][same] == run_of[:-1][same])


@st.composite
def csr_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """An indptr (rows of 0 to many elements) and sorted unique rows of it."""
    n = draw(st.integers(1, 400))
    lengths = np.array(draw(st.lists(st.one_of(st.just(0), st.integers(0, 50),
                                               st.integers(0, 2000)),
                                     min_size=n, max_size=n)), dtype=np.int64)
    indptr = np.concatenate(([0], np.cumsum(lengths)))
    rows = np.unique(np.array(draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=n)),
                              dtype=np.int64))
    return indptr, rows


budgets = st.builds(Budget, max_gap_bytes=st.sampled_from([0, 64, 4096, 1 << 20]),
                    batch_bytes=st.sampled_from([8, 512, 8192, 4 << 20]),
                    gather_bytes=st.sampled_from([8, 1024, 65536, 16 << 20]),
                    advice_bytes=st.sampled_from([8, 1 << 20]))


@FAST
@given(csr_rows(), budgets, st.sampled_from([1, 8, 12]),
       st.one_of(st.none(), st.integers(1, 300)), st.booleans(), st.booleans())
def test_sparse_plans_read_every_selected_element_once(
        matrix: tuple[np.ndarray, np.ndarray], budget: Budget, itemsize: int,
        chunk: int | None, bridge: bool, gathered: bool) -> None:
    indptr, rows = matrix
    layout = Layout(itemsize, chunk=chunk, bridge_chunks=bridge and chunk is not None,
                    slack_bytes=0 if bridge else 4096, gathered=gathered and chunk is not None)
    plan = plan_sparse(indptr, rows, layout, budget)
    # batches partition the runs, in order, none empty
    bounds = [0, *(b for _, b in plan.batches)]
    assert plan.batches == list(zip(bounds[:-1], bounds[1:], strict=True))
    assert bounds[-1] == len(plan.run_starts)
    assert all(b > a for a, b in plan.batches)
    # every selected row's elements are in its pieces, each piece in one batch's buffer
    covered = {i: [] for i in range(len(rows))}
    for b in range(len(plan.batches)):
        run_starts, run_stops = plan.runs(b)
        size = int((run_stops - run_starts).sum())
        piece_rows, local, lengths = plan.pieces(b)
        assert len(set(piece_rows.tolist())) == len(piece_rows)  # a row once a batch
        assert np.all(local >= 0)
        assert np.all(local + lengths <= size)
        offsets = np.concatenate(([0], np.cumsum(run_stops - run_starts)))
        for r, at, n in zip(piece_rows.tolist(), local.tolist(), lengths.tolist(),
                            strict=True):
            run = int(np.searchsorted(offsets, at, side="right")) - 1
            covered[r].append(int(run_starts[run]) + at - int(offsets[run]))
            covered[r].append(n)
    for i, r in enumerate(rows.tolist()):
        pairs = covered[i]
        got = sorted(zip(pairs[::2], pairs[1::2], strict=True))
        elements = [e for s, n in got for e in range(s, s + n)]
        assert elements == list(range(int(indptr[r]), int(indptr[r + 1])))
    if layout.gathered:  # exact ranges; a batch decodes its chunks alone
        assert int((plan.run_stops - plan.run_starts).sum()) == int(
            (indptr[rows + 1] - indptr[rows]).sum())
        seen: dict[int, int] = {}
        for b in range(len(plan.batches)):
            for c in _chunks_of(*plan.runs(b), chunk):  # type: ignore[arg-type]
                assert seen.setdefault(c, b) == b
    elif plan.batches:  # runs start within their batch's share of the stream
        elements = max(1, budget.batch_bytes // itemsize)
        sizes = plan.run_stops - plan.run_starts
        stream = np.cumsum(sizes) - sizes
        for b, (r0, r1) in enumerate(plan.batches):
            assert np.all(stream[r0:r1] // elements == stream[r0] // elements)
            assert b == 0 or stream[r0] // elements > stream[r0 - 1] // elements


@FAST
@given(st.lists(st.integers(0, 5000), min_size=0, max_size=600), st.integers(1, 200),
       st.sampled_from([8, 4096, 80_000, 1 << 20, 8 << 20]), budgets)
def test_dense_blocks_partition_rows_and_never_split_a_chunk(
        rows: list[int], chunk: int, row_bytes: int, budget: Budget) -> None:
    positions = np.unique(np.array(rows, dtype=np.int64))
    blocks = plan_dense(positions, Layout(row_bytes, chunk=chunk), budget)
    if len(positions) == 0:
        assert blocks == []
        return
    assert [a for a, _ in blocks] == [0, *(b for _, b in blocks[:-1])]
    assert blocks[-1][1] == len(positions)
    block_of_chunk: dict[int, int] = {}
    for i, (a, b) in enumerate(blocks):
        for c in (positions[a:b] // chunk).tolist():
            assert block_of_chunk.setdefault(c, i) == i
    span = max(1, budget.batch_bytes // row_bytes)  # rows of a batch, or one chunk's
    for a, b in blocks:
        assert positions[b - 1] // chunk - positions[a] // chunk < max(1, span // chunk)
    gathered = plan_gather(positions, chunk, chunk * row_bytes, budget)
    per_batch = max(1, budget.gather_bytes // (chunk * row_bytes))
    for a, b in gathered:
        assert len(np.unique(positions[a:b] // chunk)) <= per_batch
    chunks_of = [set((positions[a:b] // chunk).tolist()) for a, b in gathered]
    assert all(not (x & y) for x, y in zip(chunks_of, chunks_of[1:], strict=False))


# -- backends against the array libraries ----------------------------------------------------

DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint16]


def _positions(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@st.composite
def matrices(draw: st.DrawFn) -> dict[str, Any]:
    """A matrix (sparse CSR/CSC or dense), how it is stored, and a selection of it."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["csr", "csc", "dense"]))
    n_rows, n_cols = draw(st.integers(1, 300)), draw(st.integers(1, 60))
    dtype = draw(st.sampled_from(DTYPES))
    density = draw(st.sampled_from([0.0, 0.02, 0.2, 1.0]))
    values = sp.random(n_rows, n_cols, density=density, format="csr", random_state=rng,
                       data_rvs=lambda k: rng.integers(1, 1000, size=k)).astype(dtype)
    value: Any = values.toarray() if kind == "dense" else values.asformat(kind)
    rows = draw(st.one_of(
        st.none(),
        st.lists(st.integers(0, n_rows - 1), max_size=2 * n_rows).map(_positions),
        st.builds(slice, st.integers(0, n_rows), st.integers(0, n_rows),
                  st.sampled_from([None, 1, 3, -1])),
        st.lists(st.booleans(), min_size=n_rows, max_size=n_rows).map(
            lambda x: np.array(x, dtype=bool))))
    cols = draw(st.one_of(
        st.none(),
        st.lists(st.integers(0, n_cols - 1), max_size=n_cols + 3).map(_positions),
        st.builds(slice, st.integers(0, n_cols), st.integers(0, n_cols))))
    return {"value": value, "kind": kind, "rows": rows, "cols": cols,
            "chunk": draw(st.one_of(st.none(), st.integers(1, 64))),
            "compressed": draw(st.booleans()),
            "zarr_format": draw(st.sampled_from([2, 3])),
            "codec": draw(st.sampled_from(["default", "none", "blosc", "gzip"]))}


def _expected(value: Any, rows: Any, cols: Any) -> np.ndarray:
    dense = value.toarray() if sp.issparse(value) else np.asarray(value)
    dense = dense[rows] if rows is not None else dense
    return dense[:, cols] if cols is not None else dense


def _parts(value: Any) -> tuple[dict[str, str | list[int]], dict[str, np.ndarray]]:
    attrs = {"encoding-type": f"{value.format}_matrix", "encoding-version": "0.1.0",
             "shape": list(value.shape)}
    return attrs, {"data": value.data, "indices": value.indices, "indptr": value.indptr}


def write_h5(path: Path, m: dict[str, Any]) -> None:
    import h5py

    value, chunk = m["value"], m["chunk"]
    with h5py.File(path, "w") as f:
        if m["kind"] == "dense":
            options: dict[str, Any] = {}
            if chunk is not None:
                options = {"chunks": (min(chunk, value.shape[0]), min(chunk, value.shape[1]))}
            if m["compressed"]:
                options.setdefault("chunks", True)
                options["compression"] = "gzip"
            f.create_dataset("X", data=value, **options)
            return
        attrs, arrays = _parts(value)
        group = f.create_group("X")
        group.attrs.update(attrs)
        for name, array in arrays.items():
            opts: dict[str, Any] = {}
            if name != "indptr" and len(array):
                if chunk is not None:
                    opts["chunks"] = (min(chunk, len(array)),)
                if m["compressed"]:
                    opts.setdefault("chunks", True)
                    opts["compression"] = "gzip"
            group.create_dataset(name, data=array, **opts)


def write_zarr(path: Path, m: dict[str, Any]) -> None:
    import zarr

    codec = {"default": "auto", "none": None}.get(m["codec"])
    if m["codec"] == "blosc":
        codec = (zarr.codecs.BloscCodec(cname="lz4") if m["zarr_format"] == 3
                 else __import__("numcodecs").Blosc(cname="lz4"))
    elif m["codec"] == "gzip":
        codec = (zarr.codecs.GzipCodec() if m["zarr_format"] == 3
                 else __import__("numcodecs").GZip())
    root = zarr.open_group(path, mode="w", zarr_format=m["zarr_format"])
    value, chunk = m["value"], m["chunk"] or 1000

    def array(where: Any, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        arr = where.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                 compressors=codec)
        if data.size:
            arr[...] = data

    if m["kind"] == "dense":
        array(root, "X", value, (min(chunk, value.shape[0]), min(chunk, value.shape[1])))
        return
    attrs, arrays = _parts(value)
    group = root.create_group("X", attributes=attrs)
    for name, data in arrays.items():
        array(group, name, data, (max(1, min(chunk, len(data))),))


@FILES
@given(m=matrices(), budget=budgets, store=st.sampled_from(["h5", "zarr"]))
def test_every_backend_reads_what_the_library_reads(tmp_path_factory: pytest.TempPathFactory,
                                                    m: dict[str, Any], budget: Budget,
                                                    store: str) -> None:
    path = tmp_path_factory.mktemp("m") / f"m.{store}"
    (write_h5 if store == "h5" else write_zarr)(path, m)
    source = Source(to_upath(path), budget=budget)
    try:
        got = source.read("X", m["rows"], m["cols"])
    finally:
        source.close()
    expected = _expected(m["value"], m["rows"], m["cols"])
    assert sp.issparse(got) == (m["kind"] != "dense")
    assert got.shape == expected.shape
    assert got.dtype == m["value"].dtype
    np.testing.assert_array_equal(got.toarray() if sp.issparse(got) else got, expected)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(m=matrices(), budget=budgets, store=st.sampled_from(["h5", "zarr"]))
def test_every_backend_reads_what_the_library_reads_on_s3(
        tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, m: dict[str, Any],
        budget: Budget, store: str) -> None:
    path = tmp_path_factory.mktemp("m") / f"m.{store}"
    (write_h5 if store == "h5" else write_zarr)(path, m)
    source = Source(upload(path, s3_endpoint), budget=budget)
    try:
        got = source.read("X", m["rows"], m["cols"])
    finally:
        source.close()
    expected = _expected(m["value"], m["rows"], m["cols"])
    np.testing.assert_array_equal(got.toarray() if sp.issparse(got) else got, expected)


# -- obs codes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 500
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["B", "T", "NK", None], size=n)),
        "batch": rng.choice(["b1", "b2", "b3"], size=n).astype(object),
        "n_genes": rng.integers(0, 50, size=n)}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(X=sp.random(n, 20, density=0.1, format="csr", random_state=rng,
                                   dtype=np.float32), obs=obs)
    folder = tmp_path_factory.mktemp("codes")
    adata.write_h5ad(folder / "a.h5ad")
    adata.write_zarr(folder / "a.zarr")
    return folder, adata


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
@pytest.mark.parametrize("column", ["cell_type", "batch", "n_genes"])
def test_codes_give_each_rows_label(labelled: tuple[Path, Any], suffix: str,
                                    column: str) -> None:
    folder, adata = labelled
    rows = np.array([499, 0, 7, 7, 250])
    with Source(to_upath(folder / f"a{suffix}")) as source:
        codes, categories = source.codes(f"obs/{column}", rows)
        all_codes, _ = source.codes(f"obs/{column}")
    values = adata.obs[column].to_numpy()[rows]
    labels = np.array([categories[c] if c >= 0 else None for c in codes], dtype=object)
    assert [v if v == v else None for v in values] == labels.tolist()  # noqa: PLR0124 (NaN)
    assert len(all_codes) == adata.n_obs
    assert codes.dtype == np.int64


def test_codes_of_a_missing_column_name_it(labelled: tuple[Path, Any]) -> None:
    folder, _ = labelled
    with Source(to_upath(folder / "a.h5ad")) as source, pytest.raises(
            errors.NameNotFoundError, match="obs/nope"):
        source.codes("obs/nope", np.array([0]))


# -- handles belong to a process --------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_a_source_pickles_without_handles_and_reopens(labelled: tuple[Path, Any],
                                                      suffix: str, where: str,
                                                      request: pytest.FixtureRequest) -> None:
    folder, adata = labelled
    path = folder / f"a{suffix}"
    source = Source(to_upath(path) if where == "local"
                    else upload(path, request.getfixturevalue("s3_endpoint")))
    rows = np.array([3, 1, 400])
    before = source.read("X", rows)
    blob = pickle.dumps(source)
    assert len(blob) < 4096  # no data, no handle
    copy = pickle.loads(blob)  # noqa: S301 (our own bytes)
    assert copy._opened is None  # noqa: SLF001 (opened on first use)
    np.testing.assert_array_equal(copy.read("X", rows).toarray(), before.toarray())
    np.testing.assert_array_equal(before.toarray(), adata.X[rows].toarray())
    copy.close()
    source.close()


def test_a_copy_of_a_changed_file_refuses_to_read(labelled: tuple[Path, Any],
                                                  tmp_path: Path) -> None:
    import shutil

    folder, _ = labelled
    path = tmp_path / "a.h5ad"
    shutil.copy(folder / "a.h5ad", path)
    source = Source(to_upath(path))
    source.read("X", np.array([0]))
    blob = pickle.dumps(source)
    source.close()
    with path.open("r+b") as f:  # same size, new content and mtime
        f.seek(os.path.getsize(path) - 1)
        f.write(b"\0")
    os.utime(path, ns=(0, 10**9))
    copy = pickle.loads(blob)  # noqa: S301
    with pytest.raises(errors.StorageModifiedError, match="changed"):
        copy.read("X", np.array([0]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_handles(labelled: tuple[Path, Any]) -> None:
    """A source used before a fork reads in the child through handles of its own."""
    import multiprocessing as mp

    folder, adata = labelled
    source = Source(to_upath(folder / "a.h5ad"))
    rows = np.array([10, 2, 2])
    source.read("X", rows)  # opened in the parent
    parent_group = source.group
    ctx = mp.get_context("fork")
    answers = ctx.Queue()
    # a forked process inherits the source as it is (its arguments are not pickled)
    child = ctx.Process(target=_read_in_child, args=(source, rows, parent_group, answers))
    child.start()
    got, same = answers.get(timeout=120)
    child.join(timeout=120)
    assert child.exitcode == 0
    assert not same
    np.testing.assert_array_equal(got, adata.X[rows].toarray())
    assert source.group is parent_group  # the parent's handles are untouched
    np.testing.assert_array_equal(source.read("X", rows).toarray(), got)
    source.close()


def _read_in_child(source: Source, rows: np.ndarray, parent_group: Any, answers: Any) -> None:
    block = source.read("X", rows).toarray()
    answers.put((block, source.group is parent_group))
