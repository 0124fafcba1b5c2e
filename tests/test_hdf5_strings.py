"""Reading variable-length HDF5 strings from the global heap ourselves: h5py's values."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from byte_reader import Reader

import lamin_io as ln
from lamin_io.accessors.readpath.hdf5_strings import read_vlen_strings
from lamin_io.errors import CorruptArtifactError

if TYPE_CHECKING:
    from pathlib import Path

VLEN = h5py.string_dtype()


def _read(path: Path, name: str) -> tuple[np.ndarray | None, int]:
    """``read_vlen_strings`` of dataset ``name``, and how many round trips it took."""
    got, reader = _read_counted(path, name)
    return got, reader.calls


def _read_counted(path: Path, name: str) -> tuple[np.ndarray | None, Reader]:
    reader = Reader(path)
    try:
        with h5py.File(path, "r") as f:
            return read_vlen_strings(f[name], reader, reader.size), reader
    finally:
        reader.close()


def _h5py(path: Path, name: str) -> list[str]:
    with h5py.File(path, "r") as f:
        return list(f[name].asstr()[()])


def _collections(path: Path, name: str) -> set[int]:
    """The file offsets of the heap collections holding the strings of ``name``."""
    with h5py.File(path, "r") as f:
        start, n = f[name].id.get_offset(), f[name].shape[0]
    with open(path, "rb") as fh:
        fh.seek(start)
        ids = np.frombuffer(fh.read(16 * n), dtype=[("n", "<u4"), ("at", "<u8"), ("i", "<u4")])
    return set(ids["at"].tolist()) - {0}


CASES = {
    "names": [f"cell_{i}" for i in range(30_000)],
    "many": [f"AACGT{i:08d}-1" for i in range(120_000)],  # heap collections over several slabs
    "unicode": [["Zelle_ü", "細胞", "", "a" * 100, "x"][i % 5] + str(i) * (i % 3)
                for i in range(5_000)],
    "empty": [""] * 1_000,
    "some empty": ["" if i % 7 else f"g{i}" for i in range(2_000)],
    "long": ["L" * 200_000, *[f"s{i}" for i in range(100)], "M" * 70_000],
    "repeated": ["same"] * 3_000,
    "one": ["only"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_strings_match_h5py_in_at_most_three_round_trips(tmp_path: Path, case: str) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=np.array(CASES[case], dtype=object), dtype=VLEN)
    got, calls = _read(path, "s")
    assert got is not None
    assert got.dtype == object
    assert list(got) == _h5py(path, "s") == CASES[case]
    assert all(type(v) is str for v in got)
    assert calls <= 3  # the heap IDs, the collections, the rest of collections over 1 MB


def test_datasets_sharing_a_collection(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        for k in range(4):  # small arrays: each continues in the collection of the one before
            f.create_dataset(f"s{k}", data=np.array([f"{k}-{i}" for i in range(50 + 300 * k)],
                                                    dtype=object), dtype=VLEN)
    held = [_collections(path, f"s{k}") for k in range(4)]
    assert any(held[k] & held[k + 1] for k in range(3))  # the case this test is about
    for k in range(4):
        got, _ = _read(path, f"s{k}")
        assert got is not None
        assert list(got) == _h5py(path, f"s{k}")


def test_rewritten_strings(tmp_path: Path) -> None:
    """Strings written again get new heap objects; the old ones are freed."""
    path = tmp_path / "s.h5"
    values = [f"v{i}" for i in range(5_000)]
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=np.array(values, dtype=object), dtype=VLEN)
    with h5py.File(path, "r+") as f:
        f["s"][3] = "changed"
        f["s"][100:200] = np.array([f"new-{i}" for i in range(100)], dtype=object)
        f["s"][4_999] = ""
    got, _ = _read(path, "s")
    assert got is not None
    assert list(got) == _h5py(path, "s")
    assert (got[3], got[150], got[4_999]) == ("changed", "new-50", "")


def test_ascii_strings(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    values = [f"gene_{i}" for i in range(3_000)]
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=np.array(values, dtype=object),
                         dtype=h5py.string_dtype("ascii"))
    got, _ = _read(path, "s")
    assert got is not None
    assert list(got) == values


def test_other_layouts_are_left_to_h5py(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    values = np.array([f"x{i}" for i in range(1_000)], dtype=object)
    with h5py.File(path, "w") as f:
        f.create_dataset("chunked", data=values, dtype=VLEN, chunks=(100,), compression="gzip")
        f.create_dataset("fixed", data=values.astype("S8"))
        f.create_dataset("two_d", data=values.reshape(10, 100), dtype=VLEN)
        f.create_dataset("numbers", data=np.arange(10))
    for name in ("chunked", "fixed", "two_d", "numbers"):
        assert _read(path, name)[0] is None, name
    block = tmp_path / "userblock.h5"
    with h5py.File(block, "w", userblock_size=512) as f:
        f.create_dataset("s", data=values, dtype=VLEN)
    assert _read(block, "s")[0] is None


def test_a_damaged_heap_is_left_to_h5py(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=np.array([f"x{i}" for i in range(2_000)], dtype=object),
                         dtype=VLEN)
    address = min(_collections(path, "s"))
    with open(path, "r+b") as fh:  # an object's header: index and size no longer match
        fh.seek(address + 16)
        fh.write(b"\xff\xff")
    assert _read(path, "s")[0] is None
    with open(path, "r+b") as fh:  # the collection's signature
        fh.seek(address)
        fh.write(b"XXXX")
    assert _read(path, "s")[0] is None


def test_accessor_names_from_the_heap_and_a_damaged_one(tmp_path: Path) -> None:
    adata = ad.AnnData(np.ones((3_000, 4), dtype=np.float32),
                       obs=pd.DataFrame({"label": [f"l{i % 9}é" for i in range(3_000)]},
                                        index=[f"细胞{i}" for i in range(3_000)]),
                       var=pd.DataFrame(index=list("abcd")))
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    with ln.open(path) as acc:
        pd.testing.assert_index_equal(acc.obs_names, adata.obs_names)
        pd.testing.assert_frame_equal(acc.obs, adata.obs)
    collections = sorted(_collections(path, "obs/_index"))
    with open(path, "r+b") as fh:  # one of obs names (and maybe of other elements' attributes)
        fh.seek(collections[-1])
        fh.write(b"XXXX")
    with pytest.raises(CorruptArtifactError), ln.open(path) as acc:
        acc.obs_names  # noqa: B018
    with open(path, "r+b") as fh:  # this one also holds the root's attributes
        fh.seek(collections[0])
        fh.write(b"XXXX")
    with pytest.raises(CorruptArtifactError, match="damaged"):
        ln.open(path)


def test_a_nul_ends_a_string_as_in_h5py(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=np.array([f"cell_{i}" for i in range(2_000)], dtype=object),
                         dtype=VLEN)
    data = path.read_bytes()
    at = data.index(b"cell_1234")
    path.write_bytes(data[:at + 2] + b"\x00" + data[at + 3:])
    got, _ = _read(path, "s")
    assert got is not None
    assert list(got) == _h5py(path, "s")
    assert got[1234] == "ce"


def test_reads_only_the_collections_bytes_between_other_data(tmp_path: Path) -> None:
    """Small collections far apart (other data between them): their bytes, not the gaps."""
    path = tmp_path / "s.h5"
    values = [f"name-{i}" for i in range(4_000)]
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("s", shape=(len(values),), dtype=VLEN)
        for k in range(0, len(values), 200):
            ds[k:k + 200] = np.array(values[k:k + 200], dtype=object)
            f.create_dataset(f"filler{k}", data=np.zeros(100_000))  # 800 KB apart
    assert len(_collections(path, "s")) >= 10
    got, reader = _read_counted(path, "s")
    assert got is not None
    assert list(got) == values
    assert reader.bytes < 2 * 16 * len(values) + len(_collections(path, "s")) * 8192
    assert reader.calls <= 3


def test_addresses_outside_the_file_are_left_to_h5py(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=np.array([f"x{i}" for i in range(2_000)], dtype=object),
                         dtype=VLEN)
        start = f["s"].id.get_offset()
    size = path.stat().st_size
    for address in (size + 10, 2**63 + 5):
        with open(path, "r+b") as fh:  # the first heap ID's collection address
            fh.seek(start + 4)
            fh.write(address.to_bytes(8, "little"))
        assert _read(path, "s")[0] is None


def test_names_behind_an_external_link_come_from_the_linked_file(tmp_path: Path) -> None:
    names = [f"cell_{i}" for i in range(3_000)]
    adata = ad.AnnData(np.ones((3_000, 2), dtype=np.float32),
                       obs=pd.DataFrame(index=names), var=pd.DataFrame(index=["a", "b"]))
    adata.write_h5ad(tmp_path / "a.h5ad")
    adata.obs_names = [f"other_{i}" for i in range(3_000)]
    adata.write_h5ad(tmp_path / "b.h5ad")
    with h5py.File(tmp_path / "a.h5ad", "r+") as f:  # a's own names stay in its file
        del f["obs/_index"]
        f["obs/_index"] = h5py.ExternalLink(str(tmp_path / "b.h5ad"), "obs/_index")
    with ln.open(tmp_path / "a.h5ad") as acc:
        assert list(acc.obs_names) == list(adata.obs_names)

