"""Reading byte ranges of a local file the way the HDF5 parsers' callers do, counted."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class Reader:
    """Reads byte ranges of a file with ``os.pread``, counting calls (round trips) and bytes."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.calls = 0
        self.bytes = 0

    def __call__(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls += 1
        self.bytes += sum(b - a for a, b in ranges)
        return [os.pread(self.fd, b - a, a) for a, b in ranges]

    def close(self) -> None:
        os.close(self.fd)
