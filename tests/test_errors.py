"""Bad input gets a typed error and changes nothing in the registry or in storage."""

from __future__ import annotations

import sqlite3
import time

import pytest
from conftest import BUCKET, snapshot, write_bytes

import lamin_io as ln
from lamin_io import errors
from lamin_io.registry._keys import RESERVED_PREFIX


@pytest.fixture
def seeded(conn, tmp_path):
    """A registry with one artifact, so 'unchanged' is checked against real content."""
    ln.Artifact(write_bytes(tmp_path / "seed.csv", b"a\n0\n"), key="seed.csv").save()
    return conn


def test_missing_path(seeded, tmp_path):
    before = snapshot(seeded)
    with pytest.raises(errors.PathNotFoundError, match="does not exist") as info:
        ln.Artifact(tmp_path / "nope.h5ad", key="nope.h5ad").save()
    assert isinstance(info.value, FileNotFoundError)
    assert snapshot(seeded) == before


@pytest.mark.parametrize("key", ["../escape.csv", "a/../../b.csv", "/abs/x.csv", "a\\b.csv",
                                 "", "  ", "a//b.csv", "./x.csv",
                                 f"{RESERVED_PREFIX}/objects/x.csv", "s3://b/x.csv"])
def test_unsafe_keys(seeded, tmp_path, key):
    f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    before = snapshot(seeded)
    with pytest.raises(errors.InvalidKeyError) as info:
        ln.Artifact(f, key=key).save()
    assert isinstance(info.value, ValueError)
    assert snapshot(seeded) == before


def test_key_suffix_must_match(seeded, tmp_path):
    f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    before = snapshot(seeded)
    with pytest.raises(errors.InvalidKeyError, match=r"must end in \.csv"):
        ln.Artifact(f, key="x.parquet").save()
    assert snapshot(seeded) == before


def test_unknown_suffix_is_registered_but_not_loaded(seeded, tmp_path):
    f = write_bytes(tmp_path / "notes.xyz", b"hello")
    art = ln.Artifact(f, key="notes.xyz").save()  # a registry keeps any file
    before = snapshot(seeded)
    with pytest.raises(errors.UnsupportedFormatError, match=r"\.h5ad") as info:
        art.load()
    assert "'.xyz'" in str(info.value)
    assert snapshot(seeded) == before


def test_stored_object_went_missing(seeded, tmp_path):
    art = ln.Artifact.get(key="seed.csv")
    art.path.fs.rm_file(art.path.path)
    before = snapshot(seeded)
    with pytest.raises(errors.StorageObjectMissingError, match="seed.csv") as info:
        art.cache()
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(errors.StorageObjectMissingError):
        art.load()
    assert snapshot(seeded) == before


def test_stored_object_overwritten_behind_registry(seeded, storage_kind):
    art = ln.Artifact.get(key="seed.csv")
    local = art.cache()
    time.sleep(0.01)  # a new mtime on coarse-clock filesystems
    art.path.fs.pipe_file(art.path.path, b"a\n7\n")  # same size, other bytes
    with pytest.raises(errors.StorageModifiedError, match="no longer matches"):
        art.cache()
    if storage_kind == "s3":
        assert local.read_bytes() == b"a\n0\n"  # the cached copy is left untouched


def test_folder_missing_a_listed_file_is_corrupt(conn, tmp_path):
    folder = tmp_path / "d.zarr"
    write_bytes(folder / "zarr.json", b"{}")
    write_bytes(folder / "c" / "0", b"chunk")
    art = ln.Artifact(folder, key="d.zarr").save()
    art.path.fs.rm_file(f"{art.path.path}/c/0")
    with pytest.raises(errors.CorruptArtifactError, match="c/0"):
        art.cache()


def test_unreachable_s3_endpoint(tmp_path, monkeypatch):
    # credentials of its own: without any, signing fails before a connection is tried
    # (a CredentialsError), whether or not another test started the S3 server first
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket_closed_port() as port:
        endpoint = f"http://127.0.0.1:{port}"
        conn = ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/x", endpoint_url=endpoint)
        f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
        start = time.monotonic()
        with pytest.raises(errors.StorageUnreachableError, match=f"127.0.0.1:{port}") as info:
            ln.Artifact(f, key="x.csv").save()
        assert time.monotonic() - start < 60  # bounded retries, never a hang
        assert isinstance(info.value, ConnectionError)
        assert "testing" not in str(info.value)  # no secret in the message
        with conn.db.read() as c:
            from sqlalchemy import func, select

            from lamin_io.registry import _schema as s

            assert c.execute(select(func.count()).select_from(s.artifact)).scalar() == 0


class socket_closed_port:  # noqa: N801
    """A loopback port that refuses connections."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = int(s.getsockname()[1])
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


def test_locked_sqlite_registry(tmp_path):
    db = tmp_path / "r.db"
    conn = ln.connect(db, tmp_path / "storage", busy_timeout=0.3)
    f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(errors.RegistryLockedError, match="locked") as info:
            ln.Artifact(f, key="x.csv").save()
        assert isinstance(info.value, TimeoutError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert snapshot(conn) == ([], [])
    assert ln.Artifact(f, key="x.csv").save().key == "x.csv"  # works once released


def test_failed_upload_leaves_no_record(conn, tmp_path, monkeypatch):
    """A real failure mid-upload: the source folder loses a file while it is copied."""
    folder = tmp_path / "d.zarr"
    for i in range(5):
        write_bytes(folder / f"c{i}", bytes([i]) * 100)
    art = ln.Artifact(folder, key="d.zarr")
    from lamin_io.storage import _hashing

    original = _hashing.hash_path

    def hash_then_vanish(path, **kw):  # the user deletes a file after it was hashed
        out = original(path, **kw)
        (folder / "c3").unlink()
        return out

    monkeypatch.setattr("lamin_io.registry._artifact.hash_path", hash_then_vanish)
    before = snapshot(conn)
    with pytest.raises(errors.SourceChangedError, match="c3"):
        art.save(mute=True)
    assert snapshot(conn) == before


def test_failed_record_write_leaves_no_orphan(tmp_path, monkeypatch):
    """The registry becomes locked between upload and publish: the object is removed."""
    monkeypatch.setenv("LAMIN_IO_LEASE_SECONDS", "0.5")
    db = tmp_path / "r.db"
    conn = ln.connect(db, tmp_path / "storage", busy_timeout=0.3)
    f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    from lamin_io.storage import _transfer

    original = _transfer.upload
    holder: dict[str, sqlite3.Connection] = {}

    def upload_then_lock(src, dest, **kw):
        original(src, dest, **kw)
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        holder["c"] = blocker

    import lamin_io.registry._artifact as art_mod

    art_mod_upload = art_mod.upload
    art_mod.upload = upload_then_lock
    try:
        with pytest.raises(errors.RegistryLockedError):
            ln.Artifact(f, key="x.csv").save()
    finally:
        art_mod.upload = art_mod_upload
        holder["c"].execute("ROLLBACK")
        holder["c"].close()
    objects = tmp_path / "storage" / RESERVED_PREFIX / "objects"
    assert not objects.exists() or not any(objects.iterdir())
    # the pending record could not be dropped (locked); once its lease ran out (the save
    # stopped renewing it when it failed), gc collects it
    time.sleep(0.6)
    ln.gc(older_than=0)
    assert snapshot(conn) == ([], [])


def test_newer_schema_is_refused(tmp_path):
    db = tmp_path / "r.db"
    ln.connect(db, tmp_path / "storage")
    ln.disconnect()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE lamin_io_meta SET value='999' WHERE name='schema_version'")
    with pytest.raises(errors.SchemaVersionError, match="999"):
        ln.connect(db, tmp_path / "storage")


def test_bad_arguments(conn, tmp_path):
    f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    with pytest.raises(errors.InvalidArgumentError, match="saved Artifact"):
        ln.Artifact(f, revises="x.csv")
    with pytest.raises(errors.InvalidArgumentError, match="saved artifacts"):
        ln.Collection([ln.Artifact(f)], key="c")
    with pytest.raises(errors.InvalidArgumentError, match="at least one"):
        ln.Collection([], key="c")
    with pytest.raises(errors.InvalidArgumentError, match="unsupported storage"):
        ln.connect(tmp_path / "r.db", "gs://bucket")
    with pytest.raises(errors.InvalidArgumentError, match="not saved"):
        _ = ln.Artifact(f).uid


def _damaged_anndata(tmp_path, kind):
    """An AnnData file or store whose bytes anndata cannot decode, made from a real one."""
    import shutil

    import anndata as ad
    import numpy as np

    adata = ad.AnnData(np.arange(2000, dtype=np.float32).reshape(200, 10))
    if kind == "truncated.h5ad":
        adata.write_h5ad(tmp_path / "whole.h5ad")
        data = (tmp_path / "whole.h5ad").read_bytes()
        return write_bytes(tmp_path / kind, data[: len(data) // 2])
    if kind == "chunk.h5ad":  # the header is fine, a gzip chunk of X is not
        import h5py

        path = tmp_path / kind
        adata.write_h5ad(path, compression="gzip")
        with h5py.File(path) as f:
            offset = f["X"].id.get_chunk_info(0).byte_offset
        data = bytearray(path.read_bytes())
        data[offset:offset + 50] = b"\xff" * 50
        return write_bytes(path, bytes(data))
    store = tmp_path / kind  # a zarr store whose X chunks are not blosc
    adata.write_zarr(tmp_path / "whole.zarr")
    shutil.copytree(tmp_path / "whole.zarr", store)
    chunks = [p for p in (store / "X").rglob("*") if p.is_file() and not p.name.startswith(".")
              and p.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"garbage" * 10)
    return store


@pytest.mark.parametrize("kind", ["truncated.h5ad", "chunk.h5ad", "chunk.zarr"])
def test_load_of_damaged_anndata_is_corrupt(conn, tmp_path, kind):
    """load() reports damage as open() does, saved or not (not h5py's OSError, not blosc's
    RuntimeError), naming the file."""
    path = _damaged_anndata(tmp_path, kind)
    with pytest.raises(errors.CorruptArtifactError, match=kind) as info:
        ln.Artifact(path).load()
    assert "restore it from its source" in str(info.value)
    saved = ln.Artifact(path, key=kind).save()
    with pytest.raises(errors.CorruptArtifactError, match="as AnnData cannot be read") as info:
        saved.load()
    assert any(kind in note for note in info.value.__notes__)  # which artifact
    with pytest.raises(errors.CorruptArtifactError):
        ln.open(path).to_memory()


def test_registry_or_storage_under_a_regular_file(tmp_path):
    blocker = write_bytes(tmp_path / "somefile", b"not a folder")
    cases = [
        (blocker / "registry.db", tmp_path / "storage"),
        (tmp_path / "r.db", blocker / "storage"),
        (tmp_path / "r2.db", blocker),  # the storage root itself is a file
        (blocker / "deeper" / "registry.db", tmp_path / "storage"),
    ]
    for registry, storage in cases:
        with pytest.raises(errors.InvalidArgumentError) as info:
            ln.connect(registry, storage)
        text = str(info.value)
        assert f"{blocker} is a regular file, not a directory" in text
        wrong = registry if blocker in (registry, *registry.parents) else storage
        assert str(wrong) in text  # which setting is wrong
    assert blocker.read_bytes() == b"not a folder"
