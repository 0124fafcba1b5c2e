"""zarr dense matrices read chunk by chunk: each chunk holding selected values, once.

The accessor decodes the chunks of a 2-D dense array itself when their codecs allow (see
``lamin_io.accessors.readpath.zarr.chunk_decoder``), reads only those holding a selected row and
column, each once, and hands other layouts to zarr. These tests write the same matrix with
many codecs and small chunks that do not divide its shape, cut reads into many batches, and
compare every result with AnnData in memory; which chunks were read is checked on the
files read locally and on the requests the S3 server received.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anndata as ad
import numcodecs
import numpy as np
import pandas as pd
import pytest
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

N_OBS, N_VARS, CHUNKS = 300, 200, (16, 24)  # edge chunks on both axes

# (zarr format, compressors, serializer, shards, memory order, decoded by lamin-io itself)
CODECS: dict[str, tuple[int, Any, Any, Any, str, bool]] = {
    "v2-blosc": (2, numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1), None, None, "C", True),
    "v2-zstd": (2, numcodecs.Zstd(level=3), None, None, "C", True),
    "v2-raw": (2, None, None, None, "C", True),
    "v2-fortran": (2, numcodecs.Zstd(level=3), None, None, "F", False),
    "v3-zstd": (3, zarr.codecs.ZstdCodec(level=1), None, None, "C", True),
    "v3-gzip": (3, zarr.codecs.GzipCodec(level=1), None, None, "C", True),
    "v3-big-endian": (3, None, zarr.codecs.BytesCodec(endian="big"), None, "C", False),
    "v3-sharded": (3, zarr.codecs.ZstdCodec(), None, (32, 48), "C", False),
}


def _adata() -> ad.AnnData:
    rng = np.random.default_rng(5)
    x = rng.poisson(0.5, (N_OBS, N_VARS)).astype(np.float32)
    obs = pd.DataFrame({"group": pd.Categorical(rng.choice(["a", "b", "c"], N_OBS))},
                       index=[f"c{i}" for i in range(N_OBS)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_VARS)]))


def _write(adata: ad.AnnData, path: Path, codec: str, *, fill_value: float = 0.0) -> None:
    """Write ``adata`` as zarr, then rewrite X with ``codec`` in chunks of ``CHUNKS``."""
    fmt, compressors, serializer, shards, order, _ = CODECS[codec]
    group = write_in_format(adata, path, fmt)
    extra = {"order": order} if fmt == 2 else {}
    rewrite_array(group, "X", adata.X, fmt=fmt, compressors=compressors,
                  serializer=serializer, shards=shards, chunks=CHUNKS, fill_value=fill_value,
                  **extra)
    zarr.consolidate_metadata(path)


@pytest.fixture(scope="module")
def truth() -> ad.AnnData:
    return _adata()


@pytest.fixture(scope="module")
def stores(truth: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_each(truth, tmp_path_factory.mktemp("dense"), CODECS, _write)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches smaller than a row of chunks, so reads are cut into many.

    Chunks we decode: a row of chunks a batch, several in flight; chunks zarr decodes:
    blocks of 5 rows are asked for, which must not split a chunk's rows between reads.
    """
    monkeypatch.setattr(Source, "budget", Budget(gather_bytes=2 * CHUNKS[0] * CHUNKS[1] * 4,
                                                 batch_bytes=5 * N_VARS * 4))


def _genes(*numbers: int) -> list[str]:
    return [f"g{i}" for i in numbers]


SELECTIONS = {
    "mask-genes": lambda a: (np.asarray(a.obs["group"] == "b"), _genes(150, 3, 77, 4, 199)),
    "unsorted-repeats": lambda a: (np.array([299, 3, 3, 150, 0, 298]), _genes(7, 1, 7)),
    "slices": lambda a: (slice(40, 250), slice(10, 190)),
    "everything": lambda a: (slice(None), slice(None)),
    "no-rows": lambda a: (np.zeros(N_OBS, dtype=bool), slice(None)),
    "last-column": lambda a: (slice(None), _genes(199)),
    "reversed": lambda a: (slice(None, None, -3), slice(None, None, -1)),
}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_every_codec_and_selection_matches_anndata(stores: dict[str, Path], truth: ad.AnnData,
                                                   codec: str, selection: str,
                                                   small_batches: None) -> None:
    rows, cols = SELECTIONS[selection](truth)
    with ln.open(stores[codec]) as acc:
        assert ZarrBackend().gathers(acc.storage["X"]) is CODECS[codec][5]
        got = acc[rows, cols].X
    expected = truth[rows, cols].X
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def _selection(truth: ad.AnnData) -> tuple[np.ndarray, list[str], set[tuple[int, int]]]:
    """Rows of group "a" outside the middle third, 4 genes: the chunks holding them."""
    in_a = np.flatnonzero(np.asarray(truth.obs["group"] == "a"))
    rows = np.concatenate((in_a[in_a < 100], in_a[in_a > 200]))
    genes = _genes(150, 30, 1, 31)
    cols = [int(g[1:]) for g in genes]
    touched = {(r // CHUNKS[0], c // CHUNKS[1]) for r in rows.tolist() for c in cols}
    return rows, genes, touched


def _chunk_coords(key: str) -> tuple[int, int]:
    """The grid coordinates in a chunk's key, ``.../X/3.1`` (v2) or ``.../X/c/3/1`` (v3)."""
    tail = key.split("/X/", 1)[1].removeprefix("c/")
    r, c = tail.replace("/", ".").split(".")
    return int(r), int(c)


def test_each_chunk_is_read_once_and_only_chunks_holding_the_selection(
        stores: dict[str, Path], truth: ad.AnnData, small_batches: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    read = record_chunk_files(monkeypatch)
    rows, genes, touched = _selection(truth)
    with ln.open(stores["v2-blosc"]) as acc:
        got = acc[rows, genes].X
    np.testing.assert_array_equal(got, truth[rows, genes].X)
    chunks = [_chunk_coords(p) for p in read if "/X/" in p]
    assert sorted(chunks) == sorted(touched)  # each once, none without a selected value
    assert len(touched) < 19 * 9 // 2  # the selection skips most of the 19 x 9 chunks


@pytest.mark.parametrize("codec", ["v2-blosc", "v3-zstd", "v2-fortran"])
def test_s3_each_chunk_is_requested_once_and_only_chunks_holding_the_selection(
        stores: dict[str, Path], truth: ad.AnnData, s3_server: Any, small_batches: None,
        codec: str) -> None:
    remote = upload(stores[codec], s3_server.endpoint)
    rows, genes, touched = _selection(truth)
    with ln.open(remote) as acc:
        s3_server.reset()
        got = acc[rows, genes].X
    np.testing.assert_array_equal(got, truth[rows, genes].X)
    chunks = [_chunk_coords(path) for _, path, _, _ in s3_server.stats.gets()
              if "/X/" in path]
    assert sorted(chunks) == sorted(touched)


def test_missing_chunk_reads_as_fill_value_like_zarr(truth: ad.AnnData, tmp_path: Path) -> None:
    path = tmp_path / "holes.zarr"
    _write(truth, path, "v2-blosc", fill_value=7.0)
    (path / "X" / "2.3").unlink()
    expected = ad.read_zarr(path)
    assert np.all(expected.X[32:48, 72:96] == 7)
    with ln.open(path) as acc:
        got = acc[20:60, 50:120].X
    np.testing.assert_array_equal(got, expected[20:60, 50:120].X)


@pytest.mark.parametrize("codec", ["v2-blosc", "v2-zstd", "v2-raw", "v3-gzip"])
def test_damaged_chunk_is_a_corrupt_artifact(truth: ad.AnnData, tmp_path: Path,
                                             codec: str) -> None:
    path = tmp_path / f"{codec}.zarr"
    _write(truth, path, codec)
    chunk = path / "X" / ("1.2" if codec.startswith("v2") else "c/1/2")
    chunk.write_bytes(chunk.read_bytes()[:40])
    with ln.open(path) as acc, pytest.raises(errors.CorruptArtifactError, match="X"):
        _ = acc[:, 50:].X


def test_start_block_refuses_arrays_zarr_must_read(stores: dict[str, Path]) -> None:
    with ln.open(stores["v3-sharded"]) as acc:
        arr = acc.storage["X"]
        out = np.empty((2, 2), dtype=arr.dtype)
        with pytest.raises(ValueError, match="through zarr"):
            ZarrBackend().start_block(arr, np.array([0, 1]), np.array([0, 1]), out)
