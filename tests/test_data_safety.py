"""Data safety: never publish, read or delete the wrong bytes (against the real S3 server).

A bucket with versioning keeps every object ever written, deleted or not: what a save
published for a moment (and removed while cleaning up) still shows there.
"""

from __future__ import annotations

import gc
import hashlib
import threading
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from conftest import snapshot, write_bytes
from sqlalchemy import update

import lamin_io as ln
from lamin_io import errors
from lamin_io.registry import _schema as s

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(scope="module")
def versioned_bucket(s3_endpoint: str) -> str:
    """A bucket keeping every version of every object."""
    import boto3

    name = f"versioned-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def s3_conn(versioned_bucket: str, s3_endpoint: str, tmp_path: Path) -> Any:
    """A registry whose storage is a fresh prefix of the versioned bucket."""
    prefix = uuid.uuid4().hex
    return ln.connect(tmp_path / "registry.db", f"s3://{versioned_bucket}/{prefix}",
                      endpoint_url=s3_endpoint)


def _ever_written(endpoint: str, bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    """Every object version ever written under ``prefix``, and the uploads still open."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    versions = client.list_object_versions(Bucket=bucket, Prefix=prefix).get("Versions", [])
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return [v["Key"] for v in versions], [u["Key"] for u in uploads]


def _writers_left(conn: Any) -> list[Any]:
    """The file objects writing under ``conn``'s storage that are still open or still held."""
    from fsspec.spec import AbstractBufferedFile

    gc.collect()
    root = conn.root.path
    return [f for f in gc.get_objects() if isinstance(f, AbstractBufferedFile)
            and f.mode != "rb" and str(f.path).startswith(root)]


def _prefix(conn: Any) -> tuple[str, str]:
    bucket, _, prefix = conn.root.path.partition("/")
    return bucket, prefix


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_source_changed_mid_copy_publishes_nothing(s3_conn, s3_endpoint, tmp_path,
                                                   monkeypatch, kind) -> None:
    """The source changes after it was hashed: a typed error, and no byte at a final key."""
    if kind == "file":
        source = write_bytes(tmp_path / "x.csv", b"a\n" + b"1\n" * 1000)
        changed = source
        key = "x.csv"
    else:
        source = tmp_path / "d.zarr"
        for i in range(4):
            write_bytes(source / f"c{i}", bytes([i]) * 1000)
        changed = source / "c2"
        key = "d.zarr"
    from lamin_io.registry import _artifact

    original = _artifact.hash_path

    def hash_then_edit(path: Any, **kw: Any) -> Any:
        out = original(path, **kw)
        changed.write_bytes(b"edited while saving")
        return out

    monkeypatch.setattr(_artifact, "hash_path", hash_then_edit)
    before = snapshot(s3_conn)
    with pytest.raises(errors.SourceChangedError, match="changed while") as raised:
        ln.Artifact(source, key=key).save(mute=True)
    del raised  # (its traceback holds the frames that held the writers)
    # every writer is closed and let go: one kept (fsspec's transaction list keeps the files
    # opened with autocommit=False) starts an upload from its finalizer, in whatever thread
    # the collector then runs (in the test server's thread, that stopped the server)
    assert _writers_left(s3_conn) == []
    assert snapshot(s3_conn) == before
    versions, uploads = _ever_written(s3_endpoint, *_prefix(s3_conn))
    assert versions == []  # nothing was ever visible at any key
    assert uploads == []  # and no multipart upload is left open


def test_a_writer_racing_the_save_never_gets_a_wrong_record(s3_conn, s3_endpoint,
                                                             tmp_path) -> None:
    """Either a record whose stored bytes hash to its hash, or a typed error and nothing."""
    source = tmp_path / "race.csv"
    rng = np.random.default_rng(0)
    source.write_bytes(rng.bytes(1 << 20))
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            source.write_bytes(rng.bytes(1 << 20) + str(n).encode())

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    outcomes = []
    try:
        for i in range(6):
            try:
                art = ln.Artifact(source, key=f"race{i}.csv").save(mute=True)
            except errors.SourceChangedError:
                outcomes.append(None)
            else:
                outcomes.append(art)
    finally:
        stop.set()
        thread.join(timeout=60)
    bucket, prefix = _prefix(s3_conn)
    versions, uploads = _ever_written(s3_endpoint, bucket, prefix)
    saved = [a for a in outcomes if a is not None]
    for art in saved:
        stored = art.path.fs.cat_file(art.path.path)
        assert hashlib.sha256(stored).hexdigest() == art.hash
    # only the saved objects were ever written, each once (a save of content saved before
    # returns that record)
    assert sorted(versions) == sorted({f"{prefix}/{a._saved().storage_key}" for a in saved})
    assert uploads == []
    assert _writers_left(s3_conn) == []  # published or aborted, no writer is kept


def test_upload_to_an_existing_object_is_refused(s3_conn, s3_endpoint, tmp_path) -> None:
    """The conditional create's answer (HTTP 412) is an ObjectExistsError; nothing changes."""
    from lamin_io.storage import hash_path, to_upath, upload

    source = to_upath(write_bytes(tmp_path / "new.csv", b"a\n2\n"))
    target = s3_conn.root / "taken.csv"
    target.fs.pipe_file(target.path, b"already here")
    digest = hash_path(source, mute=True)[0]
    with pytest.raises(errors.ObjectExistsError, match="refusing to overwrite"):
        upload(source, target, sha256=digest, manifest=None, mute=True)
    assert target.fs.cat_file(target.path) == b"already here"
    assert _writers_left(s3_conn) == []


def test_a_412_in_a_message_is_not_an_existing_object(tmp_path, s3_endpoint) -> None:
    """Only the server's code or status says "exists": a bucket named ...412... does not."""
    conn = ln.connect(tmp_path / "r.db", f"s3://no-such-bucket-412-{uuid.uuid4().hex[:6]}/x",
                      endpoint_url=s3_endpoint)
    source = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    with pytest.raises(errors.BucketNotFoundError):
        ln.Artifact(source, key="x.csv").save(mute=True)
    assert snapshot(conn)[0] == []


# -- storage keys read back from the registry ---------------------------------------------

@pytest.mark.parametrize("bad", ["../outside.csv", "/etc/passwd", "a/../../outside.csv",
                                 "s3://other-bucket/x.csv", ""])
def test_a_storage_key_leaving_the_root_is_never_used(tmp_path, bad) -> None:
    conn = ln.connect(tmp_path / "r.db", tmp_path / "root" / "storage")
    outside = write_bytes(tmp_path / "root" / "outside.csv", b"not yours\n")
    art = ln.Artifact(write_bytes(tmp_path / "x.csv", b"a\n1\n"), key="x.csv").save(mute=True)
    with conn.db.write() as c:
        c.execute(update(s.artifact).where(s.artifact.c.uid == art.uid)
                  .values(storage_key=bad))
    art = ln.Artifact.get(key="x.csv")
    for use in (art.delete, art.cache, art.load, art.open):
        with pytest.raises(errors.CorruptRegistryError, match="outside the storage root"):
            use()
    assert outside.read_bytes() == b"not yours\n"
    assert ln.Artifact.get(key="x.csv").uid == art.uid  # the row is left as it was
    # gc collects stuck rows through the same check
    with conn.db.write() as c:
        c.execute(update(s.artifact).where(s.artifact.c.uid == art.uid)
                  .values(status="deleting"))
    with pytest.raises(errors.CorruptRegistryError):
        ln.gc(older_than=0)
    assert outside.read_bytes() == b"not yours\n"


# -- no registry lock across a network call; our own bugs are not "damage" ----------------

def test_no_registry_write_lock_while_storage_is_asked(tmp_path, monkeypatch) -> None:
    """Registering in place asks storage for the file's state with no write lock held."""
    import sqlite3

    from lamin_io.registry import _artifact

    db = tmp_path / "r.db"
    root = tmp_path / "storage"
    ln.connect(db, root)
    inside = write_bytes(root / "in_place.csv", b"a\n1\n")
    real = _artifact.fingerprint
    others_could_write: list[bool] = []

    def probing(path: Any, **kw: Any) -> Any:  # while storage answers, another writer tries
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            others_could_write.append(True)
        except sqlite3.OperationalError:
            others_could_write.append(False)
        finally:
            other.close()
        return real(path, **kw)

    monkeypatch.setattr(_artifact, "fingerprint", probing)
    art = ln.Artifact(inside, key="in_place.csv").save(mute=True)
    assert not art.is_managed
    assert others_could_write == [True]
    assert art.cache().read_bytes() == b"a\n1\n"  # its recorded state matches


def test_our_own_key_error_is_not_reported_as_damage(tmp_path, monkeypatch) -> None:
    """A KeyError raised in lamin-io's code surfaces as itself, not as a damaged store."""
    from conftest import grouped_h5ad

    from lamin_io.accessors import _elements

    path = tmp_path / "x.h5ad"
    grouped_h5ad(path, 50, 10, "ab", seed=0)
    # a stand-in compiled as code of lamin-io's own module, with a lookup that goes wrong
    namespace: dict[str, Any] = {}
    exec(compile("def matrix(*args, **kwargs):\n    return {}['no such key']\n",  # noqa: S102
                 _elements.__file__, "exec"), namespace)
    monkeypatch.setattr(_elements, "matrix", namespace["matrix"])
    with ln.open(path) as acc, pytest.raises(KeyError, match="no such key") as info:
        acc.X  # noqa: B018
    assert not isinstance(info.value, errors.LaminIOError)
    # a library's ValueError on stored bytes is still damage, typed and named
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(errors.CorruptArtifactError):
        ln.open(path)


# -- a folder's file rewritten at the same size ----------------------------------------

def test_a_folder_file_rewritten_at_the_same_size_is_refused(conn, tmp_path) -> None:
    """Each file's ETag (S3) or time and inode, then hash (local), is checked, not its size."""
    import anndata as ad
    import numpy as np

    adata = ad.AnnData(np.arange(40, dtype=np.float32).reshape(10, 4))
    folder = tmp_path / "x.zarr"
    adata.write_zarr(folder)
    art = ln.Artifact(folder, key="x.zarr").save(mute=True)
    art.open().close()
    stored = art.path
    files = sorted(f for f in stored.fs.find(stored.path) if "/X/" in f and
                   not f.endswith((".zarray", ".zattrs", "zarr.json")))
    chunk = files[0]
    before = stored.fs.cat_file(chunk)
    if stored.protocol in ("", "file"):  # the same bytes written again: new time, same content
        stored.fs.pipe_file(chunk, before)
        art.open().close()
        assert art.cache().exists()
    stored.fs.pipe_file(chunk, bytes(reversed(before)))  # same size, other bytes
    for use in (art.open, art.cache, art.load):
        with pytest.raises(errors.StorageModifiedError, match="no longer matches"):
            use()


def test_a_local_file_replaced_by_another_inode_is_checked(tmp_path) -> None:
    """Replaced with the same size and time (an rsync, a restore): its hash decides."""
    import os

    ln.connect(tmp_path / "r.db", tmp_path / "storage")
    art = ln.Artifact(write_bytes(tmp_path / "x.csv", b"a\n1\n"), key="x.csv").save(mute=True)
    stored = art.cache()
    st = os.stat(stored)
    other = write_bytes(tmp_path / "other.csv", b"a\n2\n")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, stored)
    assert os.stat(stored).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(errors.StorageModifiedError):
        art.load()


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_a_local_h5ad_changed_while_open_is_never_mixed_in(tmp_path, how) -> None:
    """Size, modification time and inode are checked after every read of an open file."""
    import os

    from conftest import grouped_h5ad

    path = tmp_path / "x.h5ad"
    adata = grouped_h5ad(path, 200, 30, "ab", seed=1)
    other = tmp_path / "other.h5ad"
    grouped_h5ad(other, 200, 30, "ab", seed=2)
    os.utime(path, ns=(10**18, 10**18))  # a time no write now gives (a coarse clock's tick)
    with ln.open(path) as acc:
        assert list(acc.obs_names) == list(adata.obs_names)
        np.testing.assert_array_equal(acc[:5].X.toarray(), adata.X[:5].toarray())
        if how == "replaced":  # another file moved in under the same name
            os.replace(other, path)
        else:  # the same file's bytes rewritten in place (an editor, a botched copy)
            data = bytearray(path.read_bytes())
            data[-100:] = bytes(100)
            with open(path, "r+b") as f:
                f.write(data)
        with pytest.raises(errors.StorageModifiedError, match="open it again"):
            acc[5:50].X  # noqa: B018


def test_a_table_changed_during_a_polars_scan_is_reported(conn, tmp_path) -> None:
    """polars sends its own requests: the stored object is checked again after the block."""
    pytest.importorskip("polars")
    import pandas as pd

    source = tmp_path / "t.parquet"
    pd.DataFrame({"x": range(100)}).to_parquet(source)
    art = ln.Artifact(source, key="t.parquet").save(mute=True)
    with art.open(engine="polars") as lf:  # unchanged: no complaint
        assert lf.collect().height == 100
    other = tmp_path / "other.parquet"
    pd.DataFrame({"x": range(100, 200)}).to_parquet(other)
    stored = art.path
    scan = art.open(engine="polars")
    lf = scan.__enter__()
    stored.fs.put_file(str(other), stored.path)  # overwritten behind the registry
    lf.collect()
    with pytest.raises(errors.StorageModifiedError, match="no longer matches"):
        scan.__exit__(None, None, None)


# -- reads pinned to one version of an S3 object ------------------------------------------

def _two_h5ads(tmp_path: Path) -> tuple[Path, Any, Path]:
    from conftest import grouped_h5ad

    first, other = tmp_path / "a" / "x.h5ad", tmp_path / "b" / "x.h5ad"
    first.parent.mkdir()
    other.parent.mkdir()
    adata = grouped_h5ad(first, 300, 40, "abc", seed=1)
    grouped_h5ad(other, 300, 40, "abc", seed=2)
    return first, adata, other


@pytest.mark.parametrize("sender", ["direct", "client"])
def test_an_s3_h5ad_overwritten_while_open_is_never_mixed_in(s3_server, tmp_path, monkeypatch,
                                                             sender) -> None:
    """Both ways a ranged GET goes out pin it: signed and sent directly, or, with a proxy
    configured, through botocore's client."""
    from conftest import upload

    from lamin_io.storage import _pinned

    if sender == "client":  # a proxy for other hosts: the loopback server is reached directly
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _pinned._signed_gets.cache_clear()
    first, adata, other = _two_h5ads(tmp_path)
    remote = upload(first, s3_server.endpoint)
    with ln.open(remote) as acc:
        np.testing.assert_array_equal(acc[:5].X.toarray(), adata.X[:5].toarray())
        remote.fs.put_file(str(other), remote.path)  # another version under the same key
        with pytest.raises(errors.StorageModifiedError, match="open it again"):
            acc[100:].X  # noqa: B018
    assert (_pinned.PinnedObject(remote)._direct is None) == (sender == "client")
    _pinned._signed_gets.cache_clear()


def test_a_versioned_bucket_keeps_serving_the_version_opened(versioned_bucket, s3_endpoint,
                                                            tmp_path) -> None:
    from lamin_io.storage import to_upath

    first, adata, other = _two_h5ads(tmp_path)
    remote = to_upath(f"s3://{versioned_bucket}/{uuid.uuid4().hex}/x.h5ad",
                      {"endpoint_url": s3_endpoint})
    remote.fs.put_file(str(first), remote.path)
    with ln.open(remote) as acc:
        names = list(acc.obs_names)
        remote.fs.put_file(str(other), remote.path)  # overwritten: a new version
        got = acc[100:].X  # read by version id: still the version opened, consistent
    assert names == list(adata.obs_names)
    np.testing.assert_array_equal(got.toarray(), adata.X[100:].toarray())


def test_a_version_other_than_the_recorded_one_is_refused(s3_server, tmp_path) -> None:
    from conftest import upload

    first, _, _ = _two_h5ads(tmp_path)
    remote = upload(first, s3_server.endpoint)
    with pytest.raises(errors.StorageModifiedError):
        ln.open(remote, versions="0123456789abcdef0123456789abcdef")


def test_an_s3_zarr_chunk_rewritten_while_open_is_refused(s3_server, tmp_path) -> None:
    """Artifact.open pins each zarr object to the ETag recorded at save."""
    import anndata as ad

    adata = ad.AnnData(np.arange(4000, dtype=np.float32).reshape(200, 20))
    folder = tmp_path / "x.zarr"
    adata.write_zarr(folder, chunks=(50, 20))
    ln.connect(tmp_path / "r.db", f"s3://{s3_server.bucket}/{uuid.uuid4().hex}",
               endpoint_url=s3_server.endpoint)
    art = ln.Artifact(folder, key="x.zarr").save(mute=True)
    stored = art.path
    chunks = sorted(f for f in stored.fs.find(stored.path)
                    if "/X/" in f and f.rsplit("/", 1)[-1][0].isdigit())
    with art.open() as acc:
        np.testing.assert_array_equal(acc[:10].X, adata.X[:10])
        data = stored.fs.cat_file(chunks[-1])
        stored.fs.pipe_file(chunks[-1], bytes(reversed(data)))  # same size, other bytes
        with pytest.raises(errors.StorageModifiedError, match="recorded"):
            acc[150:].X  # noqa: B018


def test_a_download_is_pinned_to_the_recorded_version(s3_server, tmp_path) -> None:
    from conftest import upload

    from lamin_io.storage import download

    first, _, _ = _two_h5ads(tmp_path)
    remote = upload(first, s3_server.endpoint)
    with pytest.raises(errors.StorageModifiedError, match="no longer the version recorded"):
        download(remote, tmp_path / "copy.h5ad", sha256=None, manifest=None, what="x",
                 mute=True, versions="0123456789abcdef0123456789abcdef")
    assert not (tmp_path / "copy.h5ad").exists()
