"""A save killed half-way, for real, and what `gc` does about it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import snapshot, write_bytes
from sqlalchemy import select

import lamin_io as ln
from lamin_io.registry import _schema as s

_CHILD = textwrap.dedent("""
    import sys, time
    import lamin_io as ln
    import lamin_io.registry._artifact as artifact_module

    def stalled_upload(src, dest, **kw):
        # Write part of the object, then hang: the parent kills this process here.
        dest.fs.makedirs(dest.parent.path, exist_ok=True)
        dest.fs.pipe_file(dest.path, b"partial")
        print("uploading", flush=True)
        time.sleep(600)

    artifact_module.upload = stalled_upload
    ln.connect(sys.argv[1], sys.argv[2], endpoint_url=sys.argv[3] or None)
    ln.Artifact(sys.argv[4], key="killed.csv").save(mute=True)
""")


def test_killed_save_is_invisible_and_collected(conn, tmp_path, storage_root, request):
    endpoint = request.getfixturevalue("s3_endpoint") if storage_root.startswith("s3") else ""
    f = write_bytes(tmp_path / "killed.csv", b"a\n1\n")
    registry = conn.db.url.removeprefix("sqlite:///")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, registry, storage_root, endpoint, str(f)],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "LAMIN_IO_LEASE_SECONDS": "1"})  # a dead save's lease runs out soon
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "uploading"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    # readers never see the pending record
    assert len(ln.Artifact.filter()) == 0
    with conn.db.read() as c:
        assert c.execute(select(s.artifact.c.status)).scalars().all() == ["pending"]
    rows, objects = snapshot(conn)
    assert any("objects" in name for name in objects)

    assert ln.gc(older_than=3600).records == []  # young pending work is left alone
    with conn.db.read() as c:
        lease_until, created_at = c.execute(select(s.artifact.c.lease_until,
                                                   s.artifact.c.created_at)).one()
    assert lease_until > created_at
    # the dead save renews its lease no more: once it ran out, gc collects the record
    time.sleep(max(0.0, (lease_until - created_at).total_seconds()) + 0.1)
    report = ln.gc(older_than=0)
    assert len(report.records) == 1
    assert snapshot(conn) == ([], [])
    # the same file saves cleanly afterwards
    assert ln.Artifact(f, key="killed.csv").save().key == "killed.csv"


def test_gc_removes_orphan_objects_only(conn, tmp_path):
    kept = ln.Artifact(write_bytes(tmp_path / "k.csv", b"a\n1\n"), key="k.csv").save()
    orphan = conn.root / ".lamin-io" / "objects" / "AAAAAAAAAAAAAAAA.csv"
    orphan.fs.makedirs(orphan.parent.path, exist_ok=True)
    orphan.fs.pipe_file(orphan.path, b"left behind")
    assert ln.gc(older_than=0, dry_run=True).objects == [".lamin-io/objects/AAAAAAAAAAAAAAAA.csv"]
    assert orphan.exists()
    ln.gc(older_than=0)
    assert not orphan.exists()
    assert kept.cache().read_bytes() == b"a\n1\n"


# -- leases: gc never collects a save that is still running --------------------------------

def _upload_with(monkeypatch, before) -> None:
    """Run ``before(row_uid)`` in the middle of every save, just before its bytes upload."""
    from lamin_io.registry import _artifact

    real = _artifact.upload

    def upload(src, dest, **kw):
        before(dest.name.split(".")[0])
        return real(src, dest, **kw)

    monkeypatch.setattr(_artifact, "upload", upload)


def _lease_of(conn, uid):
    with conn.db.read() as c:
        return c.execute(select(s.artifact.c.lease_until)
                         .where(s.artifact.c.uid == uid)).scalar()


def test_gc_leaves_a_running_save_alone(conn, tmp_path, monkeypatch):
    reports = []
    _upload_with(monkeypatch, lambda uid: reports.append(ln.gc(older_than=0)))
    art = ln.Artifact(write_bytes(tmp_path / "slow.csv", b"a\n1\n"), key="slow.csv").save()
    assert reports[0].records == []  # the pending record of the running save was kept
    assert art.cache().read_bytes() == b"a\n1\n"


def test_a_running_save_renews_its_lease(conn, tmp_path, monkeypatch):
    monkeypatch.setenv("LAMIN_IO_LEASE_SECONDS", "0.4")
    seen = []

    def wait_for_renewals(uid):
        first = _lease_of(conn, uid)
        deadline = time.monotonic() + 120
        while len(set(seen)) < 3 and time.monotonic() < deadline:
            seen.append(_lease_of(conn, uid))
            time.sleep(0.05)
        seen.insert(0, first)

    _upload_with(monkeypatch, wait_for_renewals)
    art = ln.Artifact(write_bytes(tmp_path / "x.csv", b"a\n1\n"), key="x.csv").save()
    assert len(set(seen)) >= 3  # pushed forward twice while the save was paused
    assert sorted(seen) == seen
    assert _lease_of(conn, art.uid) is None  # a ready record holds no lease


def test_a_save_whose_record_was_collected_fails_typed(conn, tmp_path, monkeypatch):
    from sqlalchemy import update

    monkeypatch.setenv("LAMIN_IO_LEASE_SECONDS", "3600")  # no renewal during the test

    def stall_past_the_lease(uid):  # as if this process stalled past its lease
        with conn.db.write() as c:
            c.execute(update(s.artifact).where(s.artifact.c.uid == uid)
                      .values(lease_until=s.artifact.c.created_at))
        assert len(ln.gc(older_than=0).records) == 1

    _upload_with(monkeypatch, stall_past_the_lease)
    f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    with pytest.raises(ln.errors.SaveInterruptedError, match="lamin-io gc"):
        ln.Artifact(f, key="x.csv").save()
    assert snapshot(conn) == ([], [])  # the upload it made meanwhile was removed
    monkeypatch.undo()
    assert ln.Artifact(f, key="x.csv").save().key == "x.csv"
