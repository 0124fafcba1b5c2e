"""Reading HDF5 chunk indexes ourselves: the same offsets as HDF5, in few round trips."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pytest
from byte_reader import Reader

from lamin_io.accessors.readpath.hdf5_index import IndexReader, chunk_table, chunk_tables
from lamin_io.accessors.readpath.hdf5_ranges import direct_ranges, load_tables

if TYPE_CHECKING:
    from pathlib import Path


def _table(path: Path, name: str) -> np.ndarray | None:
    """``chunk_table`` of dataset ``name`` in the file at ``path``."""
    reader = Reader(path)
    try:
        with h5py.File(path, "r") as f:
            return chunk_table(f[name], reader, reader.size)
    finally:
        reader.close()


def _hdf5_table(ds: h5py.Dataset) -> np.ndarray:
    rows = int(ds.chunks[0])
    table = np.full(-(-ds.shape[0] // rows), -1, dtype=np.int64)

    def visit(info: Any) -> None:
        table[info.chunk_offset[0] // rows] = info.byte_offset

    ds.id.chunk_iter(visit)
    return table


@pytest.mark.parametrize(("n", "chunk", "levels"), [
    (1000, 1000, 1), (50_000, 997, 1), (100_000, 300, 2), (300_000, 50, 3)])
def test_offsets_match_hdf5_in_one_round_trip_per_level(tmp_path: Path, n: int, chunk: int,
                                                        levels: int) -> None:
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a/values", data=np.arange(n, dtype=np.float32), chunks=(chunk,))
    reader = Reader(path)
    with h5py.File(path, "r") as f:
        ds = f["a/values"]
        got = chunk_table(ds, reader, reader.size)
        assert got is not None
        np.testing.assert_array_equal(got, _hdf5_table(ds))
    reader.close()
    assert reader.calls <= 1 + levels  # the object header, then one batch per tree level


def test_several_tables_in_the_round_trips_of_the_deepest(tmp_path: Path) -> None:
    """Indexes walked side by side: each step's reads of every dataset in one call."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X/data", data=np.arange(100_000, dtype=np.float32), chunks=(300,))
        f.create_dataset("X/indices", data=np.arange(100_000, dtype=np.int32), chunks=(300,))
        f.create_dataset("small", data=np.arange(1000, dtype=np.int64), chunks=(1000,))
        f.create_dataset("contiguous", data=np.ones(100))
    reader = Reader(path)
    with h5py.File(path, "r") as f:
        names = ["X/data", "small", "contiguous", "X/indices"]
        got = chunk_tables([f[n] for n in names], reader, reader.size)
        for name, table in zip(names, got, strict=True):
            if name == "contiguous":
                assert table is None  # not chunked: left to HDF5
            else:
                assert table is not None
                np.testing.assert_array_equal(table, _hdf5_table(f[name]))
    reader.close()
    assert reader.calls <= 1 + 2  # the headers, then one batch per level of the deepest


def test_tables_a_request_wants_are_loaded_together(tmp_path: Path) -> None:
    """A request over many chunks has both indexes read at once; a small one neither."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.arange(100_000, dtype=np.float32), chunks=(300,))
        f.create_dataset("indices", data=np.arange(100_000, dtype=np.int32), chunks=(300,))
    reader = Reader(path)
    index = IndexReader(reader, reader.size)
    with h5py.File(path, "r") as f:
        data, indices = f["data"], f["indices"]
        cache: dict[str, Any] = {}
        few = (np.array([5, 40_000]), np.array([10, 40_010]))  # 2 of 334 chunks
        load_tables([(data, *few), (indices, *few)], cache, index)
        assert reader.calls == 0
        assert "chunk-table:data" not in cache
        many = (np.arange(0, 100_000, 250), np.arange(0, 100_000, 250) + 7)
        load_tables([(data, *many), (indices, *many), (data, *many)], cache, index)
        assert reader.calls <= 3  # both tables: the headers, then the tree's two levels
        calls = reader.calls
        for ds in (data, indices):
            begin, end = direct_ranges(ds, *many, cache, index)  # served from the tables
            np.testing.assert_array_equal(begin, _hdf5_table(ds)[many[0] // 300]
                                          + many[0] % 300 * ds.dtype.itemsize)
            np.testing.assert_array_equal(end - begin, 7 * ds.dtype.itemsize)
        assert reader.calls == calls
        empty = np.empty(0, dtype=np.int64)
        load_tables([(data, empty, empty)], {}, IndexReader(reader, reader.size, whole=True))
        assert reader.calls == calls  # nothing to locate: no index read, even remotely
    reader.close()


def test_filtered_datasets_keep_their_indexes_unread(tmp_path: Path) -> None:
    """Chunks of compressed datasets are looked up one by one: no whole index for them."""
    path = tmp_path / "gz.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("values", data=np.arange(100_000, dtype=np.float32), chunks=(300,),
                         compression="gzip")
    reader = Reader(path)
    with h5py.File(path, "r") as f:
        cache: dict[str, Any] = {}
        every = (np.arange(0, 100_000, 250), np.arange(0, 100_000, 250) + 7)
        load_tables([(f["values"], *every)], cache, IndexReader(reader, reader.size,
                                                                 whole=True))
    reader.close()
    assert reader.calls == 0
    assert not cache


def test_a_damaged_index_spoils_only_its_own_table(tmp_path: Path) -> None:
    """A child address past the end of the file: that table is None, the other is read."""
    path = tmp_path / "damaged.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("deep", data=np.arange(100_000, dtype="i4"), chunks=(100,))
        f.create_dataset("flat", data=np.arange(1000, dtype="i4"), chunks=(100,))
    data = bytearray(path.read_bytes())
    key = 8 + 8 * 2  # chunk size, filter mask, two offsets
    patched = 0
    for at in range(len(data) - 64):  # the first child of "deep"'s level-1 node(s)
        if data[at:at + 4] == b"TREE" and data[at + 4] == 1 and data[at + 5] == 1:
            child = at + 24 + key
            data[child:child + 8] = (len(data) + 10**6).to_bytes(8, "little")
            patched += 1
    assert patched >= 1
    path.write_bytes(bytes(data))
    reader = Reader(path)
    with h5py.File(path, "r") as f:
        deep, flat = chunk_tables([f["deep"], f["flat"]], reader, reader.size)
        assert deep is None
        assert flat is not None
        np.testing.assert_array_equal(flat, _hdf5_table(f["flat"]))
    reader.close()


def test_unwritten_chunks_are_minus_one(tmp_path: Path) -> None:
    path = tmp_path / "holes.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("values", shape=(10_000,), dtype="i4", chunks=(100,))
        ds[2_000:2_500] = 7
        ds[9_950:] = 1
        f.create_dataset("empty", shape=(500,), dtype="f8", chunks=(10,))
    reader = Reader(path)
    with h5py.File(path, "r") as f:
        got = chunk_table(f["values"], reader, reader.size)
        assert got is not None
        np.testing.assert_array_equal(got, _hdf5_table(f["values"]))
        assert (got >= 0).sum() == 6
        empty = chunk_table(f["empty"], reader, reader.size)
        assert empty is not None
        assert (empty == -1).all()
    reader.close()


def test_other_layouts_are_left_to_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=np.ones((40, 40)), chunks=(10, 10))
        f.create_dataset("contiguous", data=np.ones(100))
    latest = tmp_path / "latest.h5"
    with h5py.File(latest, "w", libver="latest") as f:
        f.create_dataset("values", data=np.arange(1000), chunks=(10,))
    assert _table(path, "matrix") is None
    assert _table(path, "contiguous") is None
    assert _table(latest, "values") is None


def test_a_damaged_index_is_left_to_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "damaged.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("values", data=np.arange(50_000, dtype="i4"), chunks=(100,))
    data = bytearray(path.read_bytes())
    for at in range(len(data) - 4):  # break every chunk-index node's signature
        if data[at:at + 4] == b"TREE" and data[at + 4] == 1:
            data[at:at + 4] = b"TRE?"
    path.write_bytes(bytes(data))
    assert _table(path, "values") is None


def test_a_userblock_is_left_to_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "userblock.h5"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("values", data=np.arange(5_000, dtype="i4"), chunks=(100,))
    assert _table(path, "values") is None
