"""zarr sparse matrices read chunk by chunk: every codec we decode ourselves, exactly once.

The accessor decodes the chunks of a sparse matrix's ``data`` and ``indices`` itself when
their codecs allow (see ``lamin_io.accessors.readpath.zarr.chunk_decoder``) and hands anything else
to zarr. These tests write the same matrix with many codecs and small chunks, cut reads
into many small batches, and compare every result with AnnData in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anndata as ad
import numcodecs
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
import zarr.codecs
from conftest import upload
from zarr_codecs import record_chunk_files, rewrite_array, write_each, write_in_format

import lamin_io as ln
from lamin_io import errors
from lamin_io.accessors.readpath import Budget, Source
from lamin_io.accessors.readpath.zarr import ZarrBackend

if TYPE_CHECKING:
    from pathlib import Path

N_OBS, N_VARS, CHUNK = 600, 300, 997  # a chunk length that rows straddle

# (zarr format, compressors, serializer, shards, decoded by lamin-io itself)
CODECS: dict[str, tuple[int, Any, Any, Any, bool]] = {
    "v2-blosc": (2, numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1), None, None, True),
    "v2-zstd": (2, numcodecs.Zstd(level=3), None, None, True),
    "v2-raw": (2, None, None, None, True),
    "v3-zstd": (3, zarr.codecs.ZstdCodec(level=1), None, None, True),
    "v3-blosc": (3, zarr.codecs.BloscCodec(cname="zstd"), None, None, True),
    "v3-gzip": (3, zarr.codecs.GzipCodec(level=1), None, None, True),
    "v3-big-endian": (3, None, zarr.codecs.BytesCodec(endian="big"), None, False),
    "v3-sharded": (3, zarr.codecs.ZstdCodec(), None, (CHUNK * 4,), False),
}


def _adata() -> ad.AnnData:
    rng = np.random.default_rng(3)
    x = sp.random(N_OBS, N_VARS, density=0.05, format="csr", dtype=np.float32,
                  random_state=rng)
    x[5] = 0  # empty rows
    x[6] = 0
    x.eliminate_zeros()
    obs = pd.DataFrame({"group": pd.Categorical(rng.choice(["a", "b", "c"], N_OBS))},
                       index=[f"c{i}" for i in range(N_OBS)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_VARS)]))


def _write(adata: ad.AnnData, path: Path, codec: str) -> None:
    """Write ``adata`` as zarr, then rewrite X's data and indices with ``codec``."""
    fmt, compressors, serializer, shards, _ = CODECS[codec]
    group = write_in_format(adata, path, fmt)
    for name in ("data", "indices"):
        rewrite_array(group["X"], name, np.asarray(group[f"X/{name}"][:]), fmt=fmt,
                      compressors=compressors, serializer=serializer, shards=shards,
                      chunks=(CHUNK,))
    zarr.consolidate_metadata(path)


@pytest.fixture(scope="module")
def truth() -> ad.AnnData:
    return _adata()


@pytest.fixture(scope="module")
def stores(truth: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_each(truth, tmp_path_factory.mktemp("codecs"), CODECS, _write)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of a few chunks, so reads are cut into many windows."""
    monkeypatch.setattr(Source, "budget", Budget(gather_bytes=3 * CHUNK * 8))


SELECTIONS = {
    "mask": lambda a: (np.asarray(a.obs["group"] == "b"), slice(None)),
    "unsorted-repeats": lambda a: (np.array([599, 3, 3, 250, 5, 0, 598, 250]), slice(None)),
    "slice-genes": lambda a: (slice(40, 400), ["g7", "g1", "g299", "g150"]),
    "everything": lambda a: (slice(None), slice(None)),
    "empty-rows": lambda a: (np.array([5, 6]), slice(None)),
}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_every_codec_and_selection_matches_anndata(stores: dict[str, Path], truth: ad.AnnData,
                                                   codec: str, selection: str,
                                                   small_batches: None) -> None:
    rows, cols = SELECTIONS[selection](truth)
    with ln.open(stores[codec]) as acc:
        assert ZarrBackend().gathers(acc.storage["X/data"]) is CODECS[codec][4]
        got = acc[rows, cols].X
    expected = truth[rows, cols].X
    assert sp.issparse(got)
    np.testing.assert_array_equal(got.toarray(), expected.toarray())


def test_each_chunk_is_read_once_and_only_chunks_holding_rows(
        stores: dict[str, Path], truth: ad.AnnData, small_batches: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    read = record_chunk_files(monkeypatch)
    in_a = np.flatnonzero(np.asarray(truth.obs["group"] == "a"))
    rows = np.concatenate((in_a[in_a < 150], in_a[in_a > 450]))[::3]  # a gap of chunks
    with ln.open(stores["v2-blosc"]) as acc:
        got = acc[rows].X
    np.testing.assert_array_equal(got.toarray(), truth[rows].X.toarray())
    indptr = truth.X.indptr
    touched = {c for r in rows for c in range(indptr[r] // CHUNK,
                                              (indptr[r + 1] - 1) // CHUNK + 1)
               if indptr[r + 1] > indptr[r]}
    for name in ("data", "indices"):
        chunks = [int(p.rsplit("/", 1)[-1]) for p in read if f"/X/{name}/" in p]
        assert sorted(chunks) == sorted(touched), name  # each once, none without rows
    assert len(touched) < -(-truth.X.nnz // CHUNK)  # the selection skips some chunks


def test_missing_chunk_reads_as_fill_value_like_zarr(truth: ad.AnnData, tmp_path: Path) -> None:
    path = tmp_path / "holes.zarr"
    _write(truth, path, "v2-blosc")
    (path / "X" / "data" / "2").unlink()
    expected = ad.read_zarr(path)
    with ln.open(path) as acc:
        got = acc[100:300].X
    np.testing.assert_array_equal(got.toarray(), expected[100:300].X.toarray())


@pytest.mark.parametrize("codec", ["v2-blosc", "v2-zstd", "v2-raw", "v3-gzip"])
def test_damaged_chunk_is_a_corrupt_artifact(truth: ad.AnnData, tmp_path: Path,
                                             codec: str) -> None:
    path = tmp_path / f"{codec}.zarr"
    _write(truth, path, codec)
    chunk = path / "X" / "indices" / ("1" if codec.startswith("v2") else "c/1")
    chunk.write_bytes(chunk.read_bytes()[:40])
    with ln.open(path) as acc, pytest.raises(errors.CorruptArtifactError, match="X"):
        _ = acc[:].X


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_damaged_indptr_is_a_corrupt_artifact(truth: ad.AnnData, tmp_path: Path,
                                              suffix: str) -> None:
    """An indptr pointing past the stored values must not read as zeros or padding."""
    import h5py

    path = tmp_path / f"bad{suffix}"
    if suffix == ".zarr":
        _write(truth, path, "v2-blosc")
        indptr = zarr.open_group(path, mode="r+", use_consolidated=False)["X/indptr"]
    else:
        truth.write_h5ad(path)
        indptr = h5py.File(path, "r+")["X/indptr"]
    values = np.asarray(indptr[:])
    values[-1] += 5_000  # past the end of data and indices
    indptr[:] = values
    if suffix == ".h5ad":
        indptr.file.close()
    with ln.open(path) as acc, pytest.raises(errors.CorruptArtifactError, match="indptr"):
        _ = acc[-3:].X


def test_runs_in_any_order_decode_each_chunk_once(stores: dict[str, Path],
                                                  truth: ad.AnnData) -> None:
    with ln.open(stores["v2-blosc"]) as acc:
        arr = acc.storage["X/data"]
        starts, stops = np.array([5000, 10, 2990]), np.array([5100, 30, 3010])
        (got,) = ZarrBackend().start_runs([(arr, starts, stops)])()
    expected = np.concatenate([truth.X.data[s:e] for s, e in zip(starts, stops, strict=True)])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("codec", ["v2-blosc", "v3-zstd"])
def test_s3_each_chunk_is_read_once_and_only_chunks_holding_rows(
        stores: dict[str, Path], truth: ad.AnnData, s3_server: Any, small_batches: None,
        codec: str) -> None:
    remote = upload(stores[codec], s3_server.endpoint)
    in_a = np.flatnonzero(np.asarray(truth.obs["group"] == "a"))
    rows = np.concatenate((in_a[in_a < 150], in_a[in_a > 450]))[::3]
    with ln.open(remote) as acc:
        s3_server.reset()
        got = acc[rows, ["g7", "g1", "g299"]].X
    np.testing.assert_array_equal(got.toarray(), truth[rows, ["g7", "g1", "g299"]].X.toarray())
    indptr = truth.X.indptr
    touched = {c for r in rows for c in range(indptr[r] // CHUNK,
                                              (indptr[r + 1] - 1) // CHUNK + 1)
               if indptr[r + 1] > indptr[r]}
    for name in ("data", "indices"):
        chunks = [int(path.rsplit("/", 1)[-1]) for _, path, _, _ in s3_server.stats.gets()
                  if f"/X/{name}/" in path]
        assert sorted(chunks) == sorted(touched), name  # each once, none without rows


def test_s3_missing_and_damaged_chunks(truth: ad.AnnData, tmp_path: Path,
                                       s3_server: Any) -> None:
    path = tmp_path / "holes.zarr"
    _write(truth, path, "v2-blosc")
    (path / "X" / "data" / "2").unlink()
    expected = ad.read_zarr(path)
    chunk = path / "X" / "indices" / "4"
    chunk.write_bytes(chunk.read_bytes()[:40])
    remote = upload(path, s3_server.endpoint)
    with ln.open(remote) as acc:  # chunk 2 of data: as zarr reads it, the fill value
        np.testing.assert_array_equal(acc[100:200].X.toarray(),
                                      expected[100:200].X.toarray())
    with ln.open(remote) as acc, pytest.raises(errors.CorruptArtifactError, match="X"):
        _ = acc[:].X



def test_s3_next_batch_is_fetched_while_one_decodes(stores: dict[str, Path], truth: ad.AnnData,
                                                    s3_server: Any, small_batches: None) -> None:
    """Batches of 3 chunks per array: the next batch's requests overlap this one's."""
    remote = upload(stores["v2-blosc"], s3_server.endpoint)
    with ln.open(remote) as acc:
        s3_server.reset()
        # chunk GETs wait until more than one batch's are in flight (or 30 s have passed)
        s3_server.stats.hold_gets = 2 * 3 + 1
        s3_server.stats.hold_paths = ("/X/data/", "/X/indices/")
        try:
            got = acc[:].X
        finally:
            s3_server.stats.hold_gets = 0
            s3_server.stats.hold_paths = ()
        in_flight = s3_server.stats.max_in_flight
        reached = s3_server.stats.gate_reached
    np.testing.assert_array_equal(got.toarray(), truth.X.toarray())
    assert reached
    assert in_flight > 2 * 3  # more than one batch's 3 data and 3 indices chunks


def test_write_in_format_restores_the_setting(tmp_path: Path) -> None:
    """The helper left anndata's zarr_write_format at 2 whatever it was before."""
    with ad.settings.override(zarr_write_format=3):
        write_in_format(_adata(), tmp_path / "v2.zarr", 2)
        assert ad.settings.zarr_write_format == 3
    assert zarr.open_group(tmp_path / "v2.zarr", mode="r").metadata.zarr_format == 2


def test_settling_started_runs_reads_and_decodes_nothing(
        stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that failed settles the batches it started, which reads nothing more: a
    local store's chunks (read by the decode threads) and arrays left to zarr (sharded
    ones, counted here through zarr's LoggingStore) were read by settling."""
    from zarr.storage import LocalStore, LoggingStore

    def runs(data: Any) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        return [(data, np.array([0, 3 * CHUNK]), np.array([10, 3 * CHUNK + 5]))]

    def expected(data: Any) -> np.ndarray:
        return np.concatenate([data[:10], data[3 * CHUNK:3 * CHUNK + 5]])

    read = record_chunk_files(monkeypatch)
    local = zarr.open_group(stores["v2-blosc"], mode="r")["X/data"]
    ZarrBackend().start_runs(runs(local)).settle()
    assert read == []
    np.testing.assert_array_equal(ZarrBackend().start_runs(runs(local))()[0], expected(local))
    assert read  # called, it reads them

    store = LoggingStore(LocalStore(stores["v3-sharded"], read_only=True))
    sharded = zarr.open_group(store, mode="r")["X/data"]
    assert not ZarrBackend().gathers(sharded)
    before = store.counter["get"]
    ZarrBackend().start_runs(runs(sharded)).settle()
    assert store.counter["get"] == before
    np.testing.assert_array_equal(ZarrBackend().start_runs(runs(sharded))()[0], expected(sharded))
    assert store.counter["get"] > before
