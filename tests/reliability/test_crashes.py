"""A real SIGKILL of the saving (or deleting) process at 5 points, on local and S3 storage.

After each: no ready record points at incomplete bytes; after ``lamin-io gc`` (the lease
shortened, so no waiting), no pending or deleting record, no orphan object and no open
multipart upload; saving again gives one record. The kill points are
``LAMIN_IO_KILL_AT`` in ``lamin_io._faults``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import lamin_io as ln
from lamin_io._faults import POINTS
from lamin_io.registry import _schema as s
from lamin_io.storage import hash_path, open_uploads, to_upath

SAVE_POINTS = ["hashing", "upload", "after-upload", "commit"]
LEASE = "0.3"  # seconds: the killed save's lease, which gc waits out


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cells.zarr"
    for i, size in enumerate((300_000, 200, 50_000)):
        (folder / f"part{i}").mkdir(parents=True, exist_ok=True)
        (folder / f"part{i}" / "0").write_bytes(bytes([i + 1]) * size)
    (folder / ".zattrs").write_text("{}")
    return folder


def _child(env: dict[str, str], point: str, body: str) -> None:
    env = dict(env, LAMIN_IO_KILL_AT=point, LAMIN_IO_LEASE_SECONDS=LEASE)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr)


def _rows(conn: Any) -> list[Any]:
    with conn.db.read() as c:
        return c.execute(select(s.artifact)).all()


def _no_ready_record_lies(conn: Any) -> None:
    for row in _rows(conn):
        if row.status == "ready":
            artifact = ln.Artifact.get(row.uid)
            assert hash_path(artifact.verify(), mute=True)[0] == row.hash


def _wait_out_leases(conn: Any) -> None:
    """Wait until every pending record's lease (at most LEASE seconds) has run out."""
    leases = [r.lease_until for r in _rows(conn) if r.lease_until is not None]
    if leases:
        end = max(t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in leases)
        time.sleep(max((end - datetime.now(UTC)).total_seconds(), 0) + 0.05)


def _stored_objects(conn: Any) -> set[str]:
    objects = to_upath(f"{conn.settings.root}/.lamin-io/objects", conn.settings.fsspec_options())
    try:
        names = objects.fs.find(objects.path.rstrip("/"), withdirs=False)
    except FileNotFoundError:
        return set()
    base = objects.path.rstrip("/")
    return {n[len(base) + 1:].split("/")[0] for n in names}


@pytest.mark.parametrize("point", [*SAVE_POINTS, "delete"])
def test_killed_save_or_delete_leaves_nothing_gc_cannot_collect(point, storage_root, tmp_path,
                                                                 cli_env, request):
    assert point in POINTS
    endpoint = request.getfixturevalue("s3_endpoint") if storage_root.startswith("s3") \
        else None
    registry = str(tmp_path / "registry.db")
    folder = _folder(tmp_path)
    connect = f"ln.connect({registry!r}, {storage_root!r}, endpoint_url={endpoint!r})"
    conn = ln.connect(registry, storage_root, endpoint_url=endpoint)
    if point == "delete":
        ln.Artifact(folder, key="cells.zarr").save(mute=True)
        _child(cli_env, point, f"""
            import lamin_io as ln
            {connect}
            ln.Artifact.get(key="cells.zarr").delete()
        """)
    else:
        _child(cli_env, point, f"""
            import lamin_io as ln
            {connect}
            ln.Artifact({str(folder)!r}, key="cells.zarr").save(mute=True)
        """)
    _no_ready_record_lies(conn)
    if point == "upload" and endpoint is not None:  # the kill left an upload open
        assert open_uploads(to_upath(f"{storage_root}/.lamin-io/objects",
                                     conn.settings.fsspec_options()))
    _wait_out_leases(conn)
    env = dict(cli_env, LAMIN_IO_REGISTRY=registry, LAMIN_IO_STORAGE=storage_root)
    if endpoint is not None:
        env["AWS_ENDPOINT_URL"] = endpoint
    done = subprocess.run([sys.executable, "-m", "lamin_io.cli", "gc", "--older-than", "0"],
                          env=env, capture_output=True, text=True, timeout=300, check=True)
    assert "unfinished record" in done.stdout

    rows = _rows(conn)
    assert {r.status for r in rows} <= {"ready"}
    assert _stored_objects(conn) == {Path(r.storage_key).name for r in rows}
    assert open_uploads(to_upath(f"{storage_root}/.lamin-io/objects",
                                 conn.settings.fsspec_options())) == []
    if point == "delete":  # gc finished the delete
        assert rows == []
    saved = ln.Artifact(folder, key="cells.zarr").save(mute=True)
    rows = _rows(conn)
    assert [r.uid for r in rows] == [saved.uid]
    assert hash_path(saved.verify(), mute=True)[0] == saved.hash
    assert _stored_objects(conn) == {Path(saved._saved().storage_key).name}  # noqa: SLF001
