"""``lamin_io.probe``: untrusted files are read once in a child process (issue 25, item 1).

A native reader that crashes on damaged bytes (h5py's ``SIGSEGV`` on some h5ad mutants)
would take the caller's process down; the probe reads everything in a child and reports
any failure, a crash included, as :class:`~lamin_io.errors.CorruptArtifactError`. The crash
is a real one: the child kills itself at the ``probe`` kill point (``LAMIN_IO_KILL_AT``).
"""

from __future__ import annotations

import shutil
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from _damage import FORMATS, write_sources
from conftest import BUCKET

import lamin_io as ln
from lamin_io import errors
from lamin_io.storage import to_upath

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("probe"))


def _data_file(path: Path) -> Path:
    """The file of a format whose bytes a reader must decode (a folder's largest file)."""
    if path.is_file():
        return path
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_intact_file_passes(fmt: str, sources: dict[str, Path]) -> None:
    assert ln.probe(sources[fmt]) is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_bytes_are_a_typed_error_naming_the_path(fmt: str, sources: dict[str, Path],
                                                          tmp_path: Path) -> None:
    copy = tmp_path / sources[fmt].name
    if sources[fmt].is_dir():
        shutil.copytree(sources[fmt], copy)
    else:
        shutil.copy2(sources[fmt], copy)
    data = _data_file(copy)
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])  # truncated to 50 %
    with pytest.raises(errors.CorruptArtifactError) as info:
        ln.probe(copy)
    assert str(copy) in str(info.value)


def test_a_reader_that_crashes_is_a_typed_error(sources: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The child dies of SIGKILL before it reads: the caller gets an error, not a crash."""
    monkeypatch.setenv("LAMIN_IO_KILL_AT", "probe")
    with pytest.raises(errors.CorruptArtifactError) as info:
        ln.probe(sources["h5ad"])
    assert "SIGKILL" in str(info.value)
    assert str(sources["h5ad"]) in str(info.value)


def test_a_missing_path_and_an_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(errors.PathNotFoundError):
        ln.probe(tmp_path / "absent.h5ad")
    (tmp_path / "notes.xyz").write_text("x")
    with pytest.raises(errors.UnsupportedFormatError):
        ln.probe(tmp_path / "notes.xyz")


def test_a_file_on_s3(sources: dict[str, Path], s3_endpoint: str) -> None:
    """Storage options reach the child (through its stdin, not its command line)."""
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/x.h5ad"
    remote = to_upath(url, {"endpoint_url": s3_endpoint})
    remote.fs.put(str(sources["h5ad"]), remote.path)
    assert ln.probe(url, storage_options={"endpoint_url": s3_endpoint}) is None
    remote.fs.pipe(remote.path, sources["h5ad"].read_bytes()[:4096])
    with pytest.raises(errors.CorruptArtifactError):
        ln.probe(url, storage_options={"endpoint_url": s3_endpoint})


def test_a_dense_soma_array_is_read_a_band_at_a_time(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """All of it is read, never more than a band of rows in memory at once."""
    import numpy as np
    import pyarrow as pa
    import tiledbsoma

    from lamin_io.accessors import _probe

    path = tmp_path / "dense.tiledbsoma"
    values = np.arange(3000.0).reshape(300, 10)
    with tiledbsoma.DenseNDArray.create(str(path), type=pa.float64(),
                                        shape=values.shape) as array:
        array.write((slice(0, 299), slice(0, 9)), pa.Tensor.from_numpy(values))
    assert ln.probe(path) is None

    monkeypatch.setattr(_probe, "_BLOCK_BYTES", 100 * 10 * 8)  # 100 rows a band
    read, bands = tiledbsoma.DenseNDArray.read, []

    def counted(self: Any, coords: Any = (), **kwargs: Any) -> Any:
        got = read(self, coords, **kwargs)
        bands.append(got.to_numpy())
        return got

    monkeypatch.setattr(tiledbsoma.DenseNDArray, "read", counted)
    with tiledbsoma.open(str(path)) as array:
        _probe._walk_soma(array)
    assert [band.shape for band in bands] == [(100, 10)] * 3
    np.testing.assert_array_equal(np.concatenate(bands), values)
