"""Leases on pending records: a running save keeps its record; ``gc`` takes only dead ones.

A save writes its record as *pending* with ``lease_until`` a short time ahead, and a thread
of the saving process pushes that time forward while the bytes upload. ``gc`` removes a
pending record only once its lease has run out, so it never collects a save that is still
running, however long the upload takes; a save killed half-way stops renewing and its
record becomes collectable one lease later.

``LAMIN_IO_LEASE_SECONDS`` sets the lease (default 120 s); it is renewed every quarter of
that.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import update

from lamin_io.errors import InvalidArgumentError
from lamin_io.registry import _schema as s
from lamin_io.registry._record import PENDING

if TYPE_CHECKING:
    from types import TracebackType

    from lamin_io.registry._connection import Connection

__all__ = ["LEASE_SECONDS", "Lease", "lease_end", "lease_seconds"]

logger = logging.getLogger(__name__)

#: Default of ``LAMIN_IO_LEASE_SECONDS``.
LEASE_SECONDS = 120.0


def lease_seconds() -> float:
    """Return the lease a pending record gets (``LAMIN_IO_LEASE_SECONDS``, default 120 s)."""
    raw = os.environ.get("LAMIN_IO_LEASE_SECONDS", "").strip()
    try:
        value = float(raw) if raw else LEASE_SECONDS
    except ValueError:
        value = -1.0
    if not value > 0:
        msg = f"LAMIN_IO_LEASE_SECONDS must be a positive number of seconds, got {raw!r}"
        raise InvalidArgumentError(msg)
    return value


def lease_end(seconds: float | None = None) -> datetime:
    """Return when a lease taken now runs out."""
    return datetime.now(UTC) + timedelta(seconds=lease_seconds() if seconds is None
                                         else seconds)


class Lease:
    """Renew the lease of one pending artifact record from a thread, while in the block.

    ``lost`` tells, after the block, whether a renewal found the record gone or no longer
    pending (``gc`` collected it after the lease ran out: the process stalled).
    """

    def __init__(self, conn: Connection, row_id: int) -> None:
        self._conn = conn
        self._row_id = row_id
        self._seconds = lease_seconds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lamin-io-lease",
                                        daemon=True)
        self.lost = False

    def _renew(self) -> None:
        t = s.artifact
        while not self._stop.wait(self._seconds / 4):
            try:
                with self._conn.db.write() as c:
                    done = c.execute(update(t).where(t.c.id == self._row_id,
                                                     t.c.status == PENDING)
                                     .values(lease_until=lease_end(self._seconds)))
            except Exception:  # noqa: BLE001 (a locked or unreachable registry: try again)
                logger.debug("renewing the lease of record %s failed", self._row_id,
                             exc_info=True)
                continue
            if done.rowcount == 0:
                self.lost = True
                return

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
