"""A save killed half-way, for real, and what `gc` does about it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

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
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
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
    time.sleep(0.05)
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
