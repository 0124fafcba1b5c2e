"""Garbage collection: finish or undo what killed saves and deletes left behind."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select, update

from lamin_io.registry import _schema as s
from lamin_io.registry._connection import current
from lamin_io.registry._keys import RESERVED_PREFIX
from lamin_io.registry._reading import stored_path
from lamin_io.registry._record import DELETING, PENDING, refresh_latest
from lamin_io.storage import abort_upload, open_uploads, remove, storage_errors, to_upath

if TYPE_CHECKING:
    from upath import UPath

__all__ = ["GcReport", "gc"]

logger = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What :func:`gc` removed (or would remove, with ``dry_run``)."""

    records: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    #: Unfinished S3 multipart uploads aborted (a save killed mid-upload leaves one).
    uploads: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{len(self.records)} unfinished record(s), "
                f"{len(self.objects)} orphan object(s), "
                f"{len(self.uploads)} unfinished upload(s)")


def _age_seconds(info: dict[str, Any]) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(stamp, datetime):
        return (datetime.now(UTC) - stamp.astimezone(UTC)).total_seconds()
    if isinstance(stamp, int | float):
        return time.time() - float(stamp)
    return float("inf")


def gc(*, older_than: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove what interrupted saves and deletes left behind.

    * *pending* records older than ``older_than`` seconds whose lease ran out (a save that
      stopped: a running save renews its lease, see ``LAMIN_IO_LEASE_SECONDS``), with their
      partial objects;
    * records stuck in *deleting* (a delete that never finished), with their objects;
    * objects under ``<root>/.lamin-io/objects/`` that no record points to, older than
      ``older_than`` seconds;
    * unfinished S3 multipart uploads there, older than ``older_than`` seconds, unless a
      running save (a pending record with a live lease) owns them.

    Parameters
    ----------
    older_than
        Leave younger pending work alone: another process may still be saving it.
    dry_run
        Report without removing anything.
    """
    conn = current()
    t = s.artifact
    report = GcReport()
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=older_than)
    if conn.db.dialect == "sqlite":  # (SQLite keeps naive UTC times)
        now, cutoff = now.replace(tzinfo=None), cutoff.replace(tzinfo=None)
    # a pending record is collected only when its save stopped renewing its lease (records
    # from before leases have none: their age alone decides) and it is older than asked
    dead = (t.c.status == PENDING) & (t.c.created_at < cutoff) & (
        t.c.lease_until.is_(None) | (t.c.lease_until < now))
    with conn.db.read() as c:
        stale = c.execute(select(t).where(or_(t.c.status == DELETING, dead))).all()
    for row in stale:
        settings = conn.settings_for(row.storage_id)
        path = stored_path(conn, row)
        if dry_run:
            report.records.append(f"{row.status} {row.key or row.uid} (uid {row.uid})")
            continue
        with conn.db.write() as c:  # taken over only if still dead: a save may have renewed
            taken = c.execute(update(t).where(t.c.id == row.id, or_(
                t.c.status == DELETING, dead)).values(status=DELETING, is_latest=False))
        if taken.rowcount == 0:
            continue
        report.records.append(f"{row.status} {row.key or row.uid} (uid {row.uid})")
        if row.managed:
            with storage_errors(str(path), settings.endpoint_url):
                remove(path)
        with conn.db.write() as c:
            c.execute(delete(t).where(t.c.id == row.id))
            refresh_latest(c, t, row.family_uid)

    objects_dir = to_upath(f"{conn.settings.root}/{RESERVED_PREFIX}/objects",
                           conn.settings.fsspec_options())
    with storage_errors(str(objects_dir), conn.settings.endpoint_url):
        entries = _listing(objects_dir)
    with conn.db.read() as c:
        known = set(c.execute(select(t.c.storage_key)
                              .where(t.c.storage_id == conn.storage_id)).scalars())
    for name, info in entries.items():
        key = f"{RESERVED_PREFIX}/objects/{name}"
        # (a local save assembles its object as ".<name>.partial-<random>" beside it)
        assembling = name.startswith(".") and ".partial-" in name and \
            f"{RESERVED_PREFIX}/objects/{name[1:].split('.partial-')[0]}" in known
        if key in known or assembling or _age_seconds(info) < older_than:
            continue
        report.objects.append(key)
        if not dry_run:
            with storage_errors(key, conn.settings.endpoint_url):
                remove(to_upath(f"{conn.settings.root}/{key}", conn.settings.fsspec_options()))
    _abort_uploads(objects_dir, conn.settings.endpoint_url, older_than=older_than,
                   dry_run=dry_run, report=report)
    logger.info("gc: %s", report)
    return report


def _abort_uploads(objects_dir: UPath, endpoint: str | None, *, older_than: float,
                   dry_run: bool, report: GcReport) -> None:
    """Abort the multipart uploads no running save owns (see :func:`gc`)."""
    t = s.artifact
    conn = current()
    with storage_errors(str(objects_dir), endpoint):
        uploads = open_uploads(objects_dir)
    if not uploads:
        return
    now = datetime.now(UTC)
    lease_now = now.replace(tzinfo=None) if conn.db.dialect == "sqlite" else now
    with conn.db.read() as c:  # the objects of saves still running: not ours to abort
        running = set(c.execute(select(t.c.storage_key).where(
            t.c.storage_id == conn.storage_id, t.c.status == PENDING,
            t.c.lease_until.is_not(None), t.c.lease_until >= lease_now)).scalars())
    base = objects_dir.path.rstrip("/")
    root_prefix = base[: -len(f"{RESERVED_PREFIX}/objects")]
    for path, upload_id, started in uploads:
        key = path[len(root_prefix):]
        owned = any(key == k or key.startswith(f"{k}/") for k in running)
        if owned or (now - started.astimezone(UTC)).total_seconds() < older_than:
            continue
        report.uploads.append(key)
        if not dry_run:
            with storage_errors(path, endpoint):
                abort_upload(objects_dir, path, upload_id)


def _listing(directory: UPath) -> dict[str, dict[str, Any]]:
    fs, root = directory.fs, directory.path.rstrip("/")
    try:
        items = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {item["name"].rstrip("/").rsplit("/", 1)[-1]: item for item in items}
