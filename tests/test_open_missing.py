"""``lamin_io.open`` on a path that does not exist: PathNotFoundError in every mode.

The suffix is checked first: one that no format opens is an UnsupportedFormatError whether
the path exists or not.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
from conftest import BUCKET

import lamin_io as ln
from lamin_io import errors

if TYPE_CHECKING:
    from pathlib import Path

SUFFIXES = [".zarr", ".h5ad", ".h5", ".tiledbsoma", ".parquet", ".csv", ""]
MODES = ["r", "r+", "w"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_local_path(tmp_path: Path, suffix: str, mode: str) -> None:
    path = tmp_path / f"missing{suffix}"
    with pytest.raises(errors.PathNotFoundError, match="does not exist") as info:
        ln.open(path, mode)
    assert isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value)
    assert "check the path" in str(info.value)
    if mode != "r":
        assert f"mode {mode!r}" in str(info.value)
        assert "never creates" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("suffix", [".zarr", ".h5ad", ".tiledbsoma", ".parquet"])
def test_missing_s3_path(s3_endpoint: str, suffix: str, mode: str) -> None:
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/missing{suffix}"
    with pytest.raises(errors.PathNotFoundError, match="bucket and prefix") as info:
        ln.open(url, mode, storage_options={"endpoint_url": s3_endpoint})
    assert url in str(info.value)


def test_bad_mode_is_checked_first(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="mode must be one of"):
        ln.open(tmp_path / "missing.zarr", "a")


def test_existing_store_still_dispatches(tmp_path: Path) -> None:
    """An existing generic zarr store still reaches its format's own mode check."""
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w").create_array("x", shape=(2,), dtype="i4")
    with pytest.raises(errors.WriteNotSupportedError):
        ln.open(tmp_path / "plain.zarr", "w")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["x.txt", "notes.xyz"])
def test_unsupported_suffix_comes_before_existence(tmp_path: Path, s3_endpoint: str,
                                                   name: str, mode: str) -> None:
    suffix = name[name.index("."):]
    for path, options in ((tmp_path / name, None),
                          (f"s3://{BUCKET}/{uuid.uuid4().hex}/{name}",
                           {"endpoint_url": s3_endpoint})):
        with pytest.raises(errors.UnsupportedFormatError, match=f"cannot open '\\{suffix}'; "
                           "supported suffixes: .arrow") as info:
            ln.open(path, mode, storage_options=options)
        assert ".h5ad" in str(info.value)
