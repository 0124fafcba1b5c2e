"""Kill points: where crash tests stop lamin-io with a real ``SIGKILL``.

``LAMIN_IO_KILL_AT=<point>`` makes the process kill itself the first time it reaches that
point (see :data:`POINTS`), so a test can check what a crash there leaves behind: no ready
record pointing at incomplete bytes, and nothing ``lamin-io gc`` cannot collect. Unset (as
it always is outside tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "kill_point"]

#: The points, in the order a save or delete reaches them.
POINTS = (
    "hashing",       # a save, while the source is hashed
    "upload",        # a save, with part of the bytes uploaded (mid multipart upload on S3)
    "after-upload",  # a save, all bytes stored, the record still pending
    "commit",        # a save, inside the transaction that marks the record ready
    "delete",        # a delete, the record marked deleting, the bytes partly removed
    "migration",     # a schema migration, its first step done, not committed
    "probe",         # lamin_io.probe's child, about to read (a reader that crashes)
)


def kill_point(name: str) -> None:
    """Kill this process with ``SIGKILL`` if ``LAMIN_IO_KILL_AT`` names this point."""
    if os.environ.get("LAMIN_IO_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
