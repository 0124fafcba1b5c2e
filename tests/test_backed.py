"""The generic accessor: ``.storage`` and ``.connection`` as documented, local and on S3."""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import numpy as np
import pytest
import zarr
from conftest import upload

import lamin_io as ln
from lamin_io import errors
from lamin_io.accessors._backed import BackedAccessor

if TYPE_CHECKING:
    from pathlib import Path




def _write_h5(tmp_path: Path) -> Path:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(10)
        f.create_group("nested")["x"] = np.ones((3, 2))
    return path


def _write_zarr(tmp_path: Path) -> Path:
    path = tmp_path / "plain.zarr"
    group = zarr.open_group(path, mode="w")
    group.create_array("a", data=np.arange(5))
    return path


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _open(path: Path, where: str, request: pytest.FixtureRequest) -> BackedAccessor:
    if where == "local":
        acc = ln.open(path)
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        remote = upload(path, endpoint)
        acc = ln.open(str(remote), storage_options={"endpoint_url": endpoint})
    assert isinstance(acc, BackedAccessor)
    return acc


def _assert_closed_for_use(acc: BackedAccessor) -> None:
    assert acc.closed
    for use in (lambda: acc["values"], acc.keys, lambda: "values" in acc):
        with pytest.raises(errors.AccessorClosedError, match="is closed") as info:
            use()
        assert isinstance(info.value, ValueError)
        assert acc.path in str(info.value)
    assert "closed" in repr(acc)
    acc.close()  # a second close does nothing


def test_hdf5_storage_and_connection(tmp_path: Path, where: str,
                                     request: pytest.FixtureRequest) -> None:
    acc = _open(_write_h5(tmp_path), where, request)
    with acc:
        assert isinstance(acc.storage, h5py.File)
        assert acc.connection is not None  # a file handle, local and remote alike
        assert acc.connection.closed is False
        assert acc.keys() == ["nested", "values"]
        assert "nested/x" in acc
        np.testing.assert_array_equal(acc["values"][2:5], [2, 3, 4])
        np.testing.assert_array_equal(acc["nested/x"][:], np.ones((3, 2)))
    assert not acc.storage  # an h5py File is falsy once closed
    assert not acc.storage.id.valid
    assert acc.connection.closed
    _assert_closed_for_use(acc)


def test_zarr_storage_and_no_connection(tmp_path: Path, where: str,
                                        request: pytest.FixtureRequest) -> None:
    acc = _open(_write_zarr(tmp_path), where, request)
    with acc:
        assert isinstance(acc.storage, zarr.Group)
        assert acc.connection is None  # a zarr store is many objects, not one file
        np.testing.assert_array_equal(acc["a"][1:3], [1, 2])
    _assert_closed_for_use(acc)


def test_local_hdf5_handle_is_an_fsspec_file(tmp_path: Path) -> None:
    from fsspec.implementations.local import LocalFileOpener

    with ln.open(_write_h5(tmp_path)) as acc:
        assert isinstance(acc.connection, LocalFileOpener)
        assert acc.connection.path.endswith("plain.h5")


def test_damaged_hdf5_is_a_corrupt_artifact(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    path.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(errors.CorruptArtifactError, match="not a readable HDF5 file"):
        ln.open(path)


def test_generic_stores_are_read_only(tmp_path: Path) -> None:
    path = _write_h5(tmp_path)
    with pytest.raises(errors.WriteNotSupportedError, match="read-only"):
        ln.open(path, "r+")
