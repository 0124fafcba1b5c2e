"""``lamin_io.probe``: untrusted files are read once in a child process (issue 25, item 1).

A native reader that crashes on damaged bytes (h5py's ``SIGSEGV`` on some h5ad mutants)
would take the caller's process down; the probe reads everything in a child and reports
any failure, a crash included, as :class:`~lamin_io.errors.CorruptArtifactError`. The crash
is a real one: the child kills itself at the ``probe`` kill point (``LAMIN_IO_KILL_AT``).
"""

from __future__ import annotations

import shutil
import uuid
from typing import TYPE_CHECKING

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
