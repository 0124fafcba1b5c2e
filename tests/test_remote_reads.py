"""Remote subsetting reads byte ranges, not whole objects (counted at the S3 server)."""

from __future__ import annotations

import io
import time
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import upload
from fsspec.implementations.memory import MemoryFileSystem

import lamin_io as ln
from lamin_io.storage._localread import READ_THREADS

if TYPE_CHECKING:
    from pathlib import Path

N_OBS, N_VARS = 20_000, 2_000


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ad.AnnData]:
    """20k cells x 2k genes, CSR at 3% density, 40 cell types, one holding ~5% of cells."""
    rng = np.random.default_rng(0)
    X = sp.random(N_OBS, N_VARS, density=0.03, format="csr", dtype=np.float32,
                  random_state=0)
    weights = np.full(40, 0.95 / 39)
    weights[7] = 0.05
    obs = pd.DataFrame({"cell_type": pd.Categorical(
        rng.choice([f"type_{i}" for i in range(40)], N_OBS, p=weights))},
        index=[f"cell_{i}" for i in range(N_OBS)])
    var = pd.DataFrame(index=[f"gene_{i}" for i in range(N_VARS)])
    adata = ad.AnnData(X, obs=obs, var=var)
    folder = tmp_path_factory.mktemp("atlas")
    adata.write_h5ad(folder / "atlas.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata.write_zarr(folder / "atlas.zarr")
    return folder, adata




def _selection(adata: ad.AnnData) -> tuple[np.ndarray, list[str]]:
    mask = (adata.obs["cell_type"] == "type_7").to_numpy()
    genes = [f"gene_{i}" for i in np.random.default_rng(1).choice(N_VARS, 200, replace=False)]
    return mask, genes


def _read(remote: Any, mask: np.ndarray, genes: list[str]) -> Any:
    """What a user does: open, select cells by their obs category and genes by name."""
    with ln.open(remote) as acc:
        chosen = acc.obs["cell_type"] == "type_7"
        return acc[chosen.to_numpy() & mask, genes].X


def _touched_chunk_bytes(f: h5py.File, rows: np.ndarray, indptr: np.ndarray) -> tuple[int, int]:
    """Bytes of the X/data and X/indices chunks holding the rows, and the runs they form."""
    total, runs = 0, 0
    for name in ("data", "indices"):
        ds = f[f"X/{name}"]
        chunk = ds.chunks[0]
        touched: set[int] = set()
        for s, e in zip(indptr[rows], indptr[rows + 1], strict=True):
            if e > s:
                touched.update(range(int(s) // chunk, (int(e) - 1) // chunk + 1))
        total += len(touched) * chunk * ds.dtype.itemsize
        ordered = sorted(touched)
        runs += 1 + sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b > a + 1)
    return total, runs


@pytest.mark.parametrize("chunk", [None, 64], ids=["anndata-chunks", "fine-chunks"])
def test_h5ad_reads_only_the_chunks_holding_the_selection(atlas, s3_server, tmp_path,
                                                          chunk) -> None:
    folder, adata = atlas
    local = folder / "atlas.h5ad"
    if chunk is not None:  # the same file with X in small chunks: most hold no selected row
        local = tmp_path / "fine.h5ad"
        local.write_bytes((folder / "atlas.h5ad").read_bytes())
        with h5py.File(local, "r+") as f:
            del f["X"]
            ad.io.write_elem(f, "X", adata.X, dataset_kwargs={"chunks": (chunk,)})
    remote = upload(local, s3_server.endpoint)
    mask, genes = _selection(adata)
    assert 0.03 < mask.mean() < 0.07
    # what the same steps read with no cell selected: headers, b-trees, obs, var, indptr
    s3_server.reset()
    assert _read(remote, np.zeros_like(mask), genes).nnz == 0
    empty, metadata_requests = s3_server.stats.bytes_sent, len(s3_server.stats.gets())
    metadata_heads = _heads(s3_server.stats)
    # and what listing X's chunk index costs (a large selection locates its chunks so)
    s3_server.reset()
    with ln.open(remote) as acc:
        for name in ("data", "indices"):
            acc.storage[f"X/{name}"].id.chunk_iter(lambda info: None)
    metadata = empty + s3_server.stats.bytes_sent
    s3_server.reset()
    got = _read(remote, mask, genes)
    served, requests = s3_server.stats.bytes_sent, len(s3_server.stats.gets())
    heads = _heads(s3_server.stats)
    np.testing.assert_array_equal(got.toarray(), adata[mask, genes].X.toarray())

    rows = np.flatnonzero(mask)
    with h5py.File(local) as f:
        assert empty < 2 * sum(_stored_bytes(f[name]) for name in (
            "obs/_index", "obs/cell_type/codes", "obs/cell_type/categories", "var/_index",
            "X/indptr")) + 256 * 1024  # the no-selection read is metadata, nothing more
        needed, chunk_runs = _touched_chunk_bytes(f, rows, adata.X.indptr)
        x_bytes = sum(f[f"X/{n}"].id.get_storage_size() for n in ("data", "indices"))
    # every chunk holding selected rows is fetched, merged with its neighbours, also across
    # chunks holding none: within twice the bytes of the chunks that hold them
    assert served - metadata <= 2 * needed, (served, metadata, needed)
    assert requests - metadata_requests <= chunk_runs + 10
    # the concurrent requests each use a file handle, whose opening costs a HEAD request
    assert heads - metadata_heads <= READ_THREADS
    if chunk is not None:
        assert needed < x_bytes / 2  # most chunks hold no selected row...
        assert served - metadata < x_bytes / 2  # ...and are not read
    # X's range requests go out concurrently: read it again on the same accessor (its
    # metadata and chunk indexes known), GETs held until two are in flight (or 30 s passed)
    with ln.open(remote) as acc:
        chosen = (acc.obs["cell_type"] == "type_7").to_numpy() & mask
        acc[chosen, genes].X  # noqa: B018
        s3_server.reset()
        s3_server.stats.hold_gets = 2
        try:
            again = acc[chosen, genes].X
        finally:
            s3_server.stats.hold_gets = 0
        assert s3_server.stats.gate_reached
    np.testing.assert_array_equal(again.toarray(), got.toarray())


def _heads(stats: Any) -> int:
    return sum(1 for method, *_ in stats.log if method == "HEAD")


def _stored_bytes(ds: h5py.Dataset) -> int:
    """A dataset's bytes, plus its strings in the global heap for variable-length strings."""
    size = int(ds.id.get_storage_size())
    if h5py.check_string_dtype(ds.dtype) is not None and ds.dtype.kind == "O":
        size += sum(len(s) + 16 for s in ds[()])  # heap object: 16-byte header + bytes
    return size


def _zarr_chunk_sizes(remote: Any, array: str) -> dict[int, int]:
    listing = remote.fs.find(f"{remote.path}/{array}", detail=True)
    sizes = {}
    for name, info in listing.items():
        last = name.rsplit("/", 1)[-1].split(".")[-1]
        if last.isdigit():
            sizes[int(last)] = int(info["size"])
    return sizes


def test_zarr_reads_only_the_chunks_holding_the_selection(atlas, s3_server) -> None:
    folder, adata = atlas
    remote = upload(folder / "atlas.zarr", s3_server.endpoint)
    mask, genes = _selection(adata)
    s3_server.reset()
    got = _read(remote, mask, genes)
    served = s3_server.stats.bytes_sent
    np.testing.assert_array_equal(got.toarray(), adata[mask, genes].X.toarray())

    import zarr

    chunk = zarr.open_group(folder / "atlas.zarr", mode="r")["X/data"].chunks[0]
    rows = np.flatnonzero(mask)
    indptr = adata.X.indptr
    touched: set[int] = set()
    for s, e in zip(indptr[rows], indptr[rows + 1], strict=True):
        if e > s:
            touched.update(range(int(s) // chunk, (int(e) - 1) // chunk + 1))
    needed = sum(_zarr_chunk_sizes(remote, f"X/{name}")[c] for name in ("data", "indices")
                 for c in touched)
    metadata = sum(sum(_zarr_chunk_sizes(remote, name).values()) for name in (
        "obs/_index", "obs/cell_type/codes", "obs/cell_type/categories", "var/_index",
        "X/indptr")) + 64 * 1024  # json metadata documents
    assert served <= 2 * needed + metadata, (served, needed, metadata)
    # every X chunk fetched holds selected rows, and none is fetched twice
    pairs = []
    for _, path, _, _ in s3_server.stats.gets():
        for name in ("data", "indices"):
            if f"/X/{name}/" in path:
                last = path.rsplit("/", 1)[-1].split(".")[-1]
                if last.isdigit():
                    pairs.append((name, int(last)))
    assert pairs, "no chunk requests were seen"
    assert {c for _, c in pairs} <= touched
    assert len(pairs) == len(set(pairs))


def test_range_file_shares_requests_across_small_gaps_only(s3_server, tmp_path) -> None:
    from lamin_io.storage._rangefile import RangeFile

    blob = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "blob.bin").write_bytes(blob)
    remote = upload(tmp_path / "blob.bin", s3_server.endpoint)
    # a gap no longer than the range before it is read through; a longer one is not; a
    # large range is read straight into place
    ranges = [(0, 1000), (1500, 2000), (2600, 2700), (100_000, 100_010), (1 << 20, 3 << 20)]
    with RangeFile(remote) as rf:
        s3_server.reset()
        out = bytes(rf.start_read(ranges)())
    assert bytes(out) == b"".join(blob[a:b] for a, b in ranges)
    gets = sorted(r for _, _, r, _ in s3_server.stats.gets())
    assert gets == sorted(["bytes=0-1999", "bytes=2600-2699", "bytes=100000-100009",
                           f"bytes={1 << 20}-{(3 << 20) - 1}"])


def test_range_file_reads_ahead_of_in_order_small_reads_only(s3_server, tmp_path) -> None:
    from lamin_io.storage._rangefile import METADATA_BLOCK, READ_AHEAD, RangeFile

    blob = np.random.default_rng(1).integers(0, 255, 4 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "heap.bin").write_bytes(blob)
    remote = upload(tmp_path / "heap.bin", s3_server.endpoint)
    with RangeFile(remote) as rf:
        s3_server.reset()
        for at in range(0, 2 << 20, 4096):  # HDF5 reading a heap in order, 4 KB at a time
            rf.seek(at)
            assert rf.read(4096) == blob[at:at + 4096]
        in_order = len(s3_server.stats.gets())
        largest = max(n for *_, n in s3_server.stats.gets())
        s3_server.reset()
        for at in range(3 << 20, 4 << 20, 64 * 1024):  # scattered: no read-ahead
            rf.seek(at)
            assert rf.read(100) == blob[at:at + 100]
        scattered = s3_server.stats.gets()
    assert in_order <= (2 << 20) // READ_AHEAD + 8  # 16, 32, ... 1024 KB, then 1 MB each
    assert largest == READ_AHEAD
    assert len(scattered) == 16
    assert all(n == METADATA_BLOCK for *_, n in scattered)


def test_h5ad_names_come_from_the_string_heap_in_few_requests(atlas, s3_server) -> None:
    """obs and var names: the heap IDs in one request, their heap collections in one more."""
    folder, adata = atlas
    remote = upload(folder / "atlas.h5ad", s3_server.endpoint)
    with ln.open(remote) as acc:
        acc.storage["obs/_index"].id.get_offset()  # the dataset's header, read by HDF5
        s3_server.reset()
        names = acc.obs_names
        gets = s3_server.stats.gets()
        assert list(names) == list(adata.obs_names)
        with h5py.File(folder / "atlas.h5ad") as f:
            ids = f["obs/_index"].id.get_storage_size()
        # the IDs and every collection, each once (HDF5 reads a collection at a time)
        assert len(gets) <= 4, gets
        assert sum(n for *_, n in gets) < 4 * ids


def test_zarr_dataframe_arrays_are_fetched_together_once(atlas, s3_server) -> None:
    """obs of a remote zarr: every object of its arrays in one concurrent batch, once."""
    folder, adata = atlas
    remote = upload(folder / "atlas.zarr", s3_server.endpoint)
    with ln.open(remote) as acc:
        s3_server.reset()
        s3_server.stats.hold_gets = 3  # GETs wait until three are in flight (or 30 s)
        try:
            obs = acc.obs
        finally:
            s3_server.stats.hold_gets = 0
        paths = [path for _, path, _, _ in s3_server.stats.gets()]
        in_flight = s3_server.stats.max_in_flight
        assert s3_server.stats.gate_reached
    pd.testing.assert_frame_equal(obs, adata.obs)
    objects = {p for p in paths if "/obs/" in p and p.rsplit("/", 1)[-1].isdigit()}
    assert objects == {p for p in paths if "/obs/" in p}  # no metadata asked for again
    assert len(objects) == len(paths) == 3  # the index, the codes and the categories
    assert in_flight == 3  # all at once
    with ln.open(remote) as acc:
        names = acc.obs_names
        s3_server.reset()
        obs = acc.obs  # the index was read already: not fetched again
        paths = [path for _, path, _, _ in s3_server.stats.gets()]
    assert list(names) == list(adata.obs_names)
    pd.testing.assert_frame_equal(obs, adata.obs)
    assert len(paths) == 2
    assert not [p for p in paths if "/obs/_index/" in p]


def test_fetching_ahead_leaves_arrays_and_local_groups_alone(atlas, s3_server) -> None:
    """Only a remote zarr group is fetched ahead; an array (an old, structured obs) or a
    local group gets a no-op, and nothing is requested."""
    from lamin_io.accessors.readpath.zarr_store import fetch_arrays_ahead, open_zarr_group

    folder, _ = atlas
    remote = upload(folder / "atlas.zarr", s3_server.endpoint)
    group = open_zarr_group(remote, "r")
    s3_server.reset()
    fetch_arrays_ahead(group["obs/_index"])()
    assert s3_server.stats.requests == 0
    import zarr

    fetch_arrays_ahead(zarr.open_group(folder / "atlas.zarr", mode="r")["obs"])()
    assert s3_server.stats.requests == 0


def test_zarr_store_opens_and_reads_without_a_head_per_object(atlas, s3_server) -> None:
    """Remote zarr: probes read root attributes with plain GETs; chunks cost one GET each."""
    folder, adata = atlas
    remote = upload(folder / "atlas.zarr", s3_server.endpoint)
    s3_server.reset()
    with ln.open(remote) as acc:
        opened = list(s3_server.stats.log)
        got = acc[:100, ["gene_3", "gene_1999"]].X
    np.testing.assert_array_equal(got.toarray(), adata[:100, ["gene_3", "gene_1999"]].X.toarray())
    heads = [path for method, path, _, _ in s3_server.stats.log if method == "HEAD"]
    assert len(heads) <= 1, heads  # the existence check alone
    assert len(opened) <= 12, opened


def test_range_file_prime_reads_head_and_tail_in_one_round(s3_server, tmp_path) -> None:
    """``prime``: the first blocks and the tail at once; reads inside them cost nothing."""
    from lamin_io.storage._rangefile import HEAD_BYTES, RangeFile, tail_size

    size = 12 << 20
    blob = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8).tobytes()
    (tmp_path / "object.h5").write_bytes(blob)
    remote = upload(tmp_path / "object.h5", s3_server.endpoint)
    tail = tail_size(size)
    assert HEAD_BYTES < tail < size // 2
    with RangeFile(remote) as rf:
        s3_server.reset()
        s3_server.stats.hold_gets = 2  # GETs wait until two are in flight (or 30 s)
        try:
            rf.prime()
        finally:
            s3_server.stats.hold_gets = 0
        gets = sorted(r for _, _, r, _ in s3_server.stats.gets())
        assert gets == sorted([f"bytes=0-{HEAD_BYTES - 1}", f"bytes={size - tail}-{size - 1}"])
        assert s3_server.stats.max_in_flight == 2
        assert s3_server.stats.gate_reached
        s3_server.reset()
        for at, n in [(100, 5000), (HEAD_BYTES - 10, 10), (size - tail, 300_000),
                      (size - 100, 100)]:  # small and large reads inside head and tail
            rf.seek(at)
            assert rf.read(n) == blob[at:at + n]
        inside = [(size - tail + 10, size - tail + 90), (size - 4000, size - 1000)]
        assert bytes(rf.start_read(inside)()) == b"".join(blob[a:b] for a, b in inside)
        assert s3_server.stats.requests == 0
        rf.seek(size // 2)  # anywhere else is read as before
        assert rf.read(100) == blob[size // 2:size // 2 + 100]
        straddling = [(size - tail - 50, size - tail + 50)]
        assert bytes(rf.start_read(straddling)()) == blob[size - tail - 50:size - tail + 50]
        assert len(s3_server.stats.gets()) == 2


def test_range_file_prime_reads_a_small_object_whole(s3_server, tmp_path) -> None:
    from lamin_io.storage._rangefile import RangeFile

    blob = np.random.default_rng(3).integers(0, 255, 100_000, dtype=np.uint8).tobytes()
    (tmp_path / "small.h5").write_bytes(blob)
    remote = upload(tmp_path / "small.h5", s3_server.endpoint)
    with RangeFile(remote) as rf:
        s3_server.reset()
        rf.prime()
        assert [r for _, _, r, _ in s3_server.stats.gets()] == ["bytes=0-99999"]
        rf.seek(0)
        assert rf.read() == blob
        assert len(s3_server.stats.gets()) == 1


def test_h5ad_open_reads_its_tail_metadata_in_one_round(atlas, s3_server) -> None:
    """Opening a remote h5ad fetches the head and tail of the file at once: var (written
    last) and obs's columns then cost no request of their own."""
    folder, adata = atlas
    remote = upload(folder / "atlas.h5ad", s3_server.endpoint)
    s3_server.reset()
    with ln.open(remote) as acc:
        opened = len(s3_server.stats.gets())
        s3_server.reset()
        var_names, cell_types = acc.var_names, acc.obs["cell_type"]
        later = [r for _, _, r, _ in s3_server.stats.gets()]
    assert list(var_names) == list(adata.var_names)
    pd.testing.assert_series_equal(cell_types, adata.obs["cell_type"])
    # head and tail, and the obs group's header (outside the last 336 KB of this file);
    # HDF5 alone reads 7 blocks one after the other
    assert opened <= 3, opened
    # obs's index (heap IDs and strings) lies outside the tail: its two rounds, and one
    # heap block; HDF5 alone reads 10
    assert len(later) <= 3, later
    from lamin_io.storage._rangefile import tail_size

    with h5py.File(folder / "atlas.h5ad") as f:
        tail_start = f.id.get_filesize() - tail_size(f.id.get_filesize())
        assert f["var/_index"].id.get_offset() > tail_start
        assert all(int(r[6:].split("-")[0]) < tail_start for r in later)


def test_h5ad_large_indptr_is_read_in_one_round_of_ranges(s3_server, tmp_path) -> None:
    """A remote CSR's indptr (400 KB) is read with our range requests: its chunk index,
    then its chunks at once, not block after block (16, 32, ... 256 KB)."""
    from lamin_io.storage._rangefile import tail_size

    n_obs = 100_000
    X = sp.random(n_obs, 50, density=0.02, format="csr", dtype=np.float32, random_state=1)
    adata = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]))
    adata.write_h5ad(tmp_path / "tall.h5ad")
    remote = upload(tmp_path / "tall.h5ad", s3_server.endpoint)
    with h5py.File(tmp_path / "tall.h5ad") as f:
        indptr = f["X/indptr"]
        assert indptr.id.get_storage_size() >= 400_000
        begin = min(indptr.id.get_chunk_info(i).byte_offset
                    for i in range(indptr.id.get_num_chunks()))
        end = begin + indptr.id.get_storage_size()
        nbytes = indptr.size * indptr.dtype.itemsize
        outside = begin < f.id.get_filesize() - tail_size(f.id.get_filesize())
    assert outside  # the tail read at open does not hold it
    with ln.open(remote) as acc:
        acc.obs_names, acc.var_names  # noqa: B018 (read before counting)
        s3_server.reset()
        got = acc[n_obs - 10:].X
        ranges = [r for _, _, r, _ in s3_server.stats.gets()]
    np.testing.assert_array_equal(got.toarray(), X[n_obs - 10:].toarray())
    spans = [tuple(int(x) for x in r[6:].split("-")) for r in ranges]
    into_indptr = [r for r, (a, b) in zip(ranges, spans, strict=True) if a < end and b >= begin]
    # its header, its chunk index, its chunks merged into one request; h5py reads 5 blocks
    assert len(into_indptr) <= 3, into_indptr
    assert max(b - a + 1 for a, b in spans) >= nbytes


class _SlowFile(io.BytesIO):
    """An in-memory file whose reads take 10 ms, as a remote store's do."""

    def read(self, n: int | None = -1) -> bytes:
        time.sleep(0.01)
        return super().read(n)

    def readinto(self, buffer: Any) -> int:
        time.sleep(0.01)
        return super().readinto(buffer)


class _SlowMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory file system with slow reads (read through pyarrow's fsspec handler,
    whose ``read_at`` moves the file's one position: seek, then read)."""

    protocol = "slowmemory"

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.replace("slowmemory://", "memory://", 1))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        return _SlowFile(f.getvalue()) if "r" in mode else f


def test_range_file_prime_on_an_fsspec_store_reads_the_right_tail() -> None:
    """Through fsspec's file systems, the head and the tail read at once never share the
    file's one position (the tail read through it got the head's bytes)."""
    import fsspec
    from upath import UPath
    from upath.implementations.memory import MemoryPath
    from upath.registry import register_implementation

    from lamin_io.storage._rangefile import RangeFile, tail_size

    fsspec.register_implementation("slowmemory", _SlowMemoryFileSystem, clobber=True)
    register_implementation("slowmemory", MemoryPath, clobber=True)
    blob = np.random.default_rng(4).integers(0, 255, 12 << 20, dtype=np.uint8).tobytes()
    fsspec.filesystem("slowmemory").pipe("/prime/blob.h5", blob)
    tail = tail_size(len(blob))
    try:
        with RangeFile(UPath("slowmemory:///prime/blob.h5")) as rf:
            rf.prime()
            rf.seek(len(blob) - tail)
            assert rf.read(tail) == blob[-tail:]
            rf.seek(0)
            assert rf.read(5000) == blob[:5000]
    finally:
        fsspec.filesystem("slowmemory").rm("/prime", recursive=True)
