"""Another process reading files while the tests run, as on a busy shared machine.

It reads a scratch file over and over, and every few seconds drops from the page cache every
file under the temporary directory (where pytest keeps the tests' files), so a test that
assumes what the kernel keeps cached, or how fast a read is, fails here rather than by
chance in a later run. Stops when its parent process exits, or after ``--minutes``.

    python .ci/load.py --minutes 30 &
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

CHUNK = 8 << 20


def _evict_tree(root: Path) -> int:
    """Drop the cached pages of every regular file below ``root``; return how many."""
    n = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue  # gone meanwhile, a socket, not ours to read
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return n


def main() -> None:
    """Read and evict until the parent exits or the time is up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--scratch-mb", type=int, default=512)
    parser.add_argument("--evict-every", type=float, default=2.0, help="seconds")
    args = parser.parse_args()
    parent = os.getppid()
    deadline = time.monotonic() + 60 * args.minutes
    tmp = Path(tempfile.gettempdir())
    with tempfile.NamedTemporaryFile(prefix="lamin-io-load-") as scratch:
        block = os.urandom(CHUNK)
        for _ in range(max(1, args.scratch_mb * (1 << 20) // CHUNK)):
            scratch.write(block)
        scratch.flush()
        next_evict = 0.0
        while time.monotonic() < deadline and os.getppid() == parent:
            with open(scratch.name, "rb", buffering=0) as f:
                while f.read(CHUNK):
                    time.sleep(0.005)  # a reader, not a CPU hog
            if time.monotonic() >= next_evict:
                _evict_tree(tmp)
                next_evict = time.monotonic() + args.evict_every
            os.posix_fadvise(scratch.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


if __name__ == "__main__":
    main()
