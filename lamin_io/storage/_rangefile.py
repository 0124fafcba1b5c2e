"""A read-only file object over a remote object that serves prefetched byte ranges.

HDF5 reads through a Python file object one small read at a time. When the reader knows
which byte ranges a request needs (the accessor computes them from dataset offsets and
chunk locations), :meth:`RangeFile.prefetch` fetches them all at once with concurrent,
coalesced range requests; the reads that follow are served from memory. Any other read
(metadata) goes to an fsspec file with a small block cache.
"""

from __future__ import annotations

import bisect
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from upath import UPath

__all__ = ["METADATA_BLOCK", "RangeFile"]

#: Block size of the cache that serves metadata reads.
METADATA_BLOCK = 256 * 1024


class RangeFile(io.RawIOBase):
    """Seekable binary reader of ``path`` with an explicit prefetch of byte ranges."""

    def __init__(self, path: UPath, *, block_size: int = METADATA_BLOCK) -> None:
        super().__init__()
        self._fs = path.fs
        self._path = path.path
        self._file = self._fs.open(self._path, "rb", block_size=block_size,
                                   cache_type="blockcache")
        self.size = int(self._file.size)
        self._pos = 0
        self._starts: list[int] = []
        self._parts: list[tuple[int, bytes]] = []

    def prefetch(self, ranges: list[tuple[int, int]], *, max_gap: int = 1 << 20) -> int:
        """Fetch ``[(start, stop), ...]`` concurrently, merging ranges closer than ``max_gap``.

        Replaces what an earlier prefetch held. Returns the number of bytes fetched.
        """
        merged: list[list[int]] = []
        for start, stop in sorted(r for r in ranges if r[1] > r[0]):
            if merged and start - merged[-1][1] <= max_gap:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        self._starts, self._parts = [], []
        if not merged:
            return 0
        blobs = self._fs.cat_ranges([self._path] * len(merged), [m[0] for m in merged],
                                    [m[1] for m in merged])
        for (start, _), blob in zip(merged, blobs, strict=True):
            if isinstance(blob, Exception):
                raise blob
            self._starts.append(start)
            self._parts.append((start, bytes(blob)))
        return sum(len(b) for _, b in self._parts)

    def release(self) -> None:
        """Drop prefetched bytes."""
        self._starts, self._parts = [], []

    def _from_prefetch(self, start: int, n: int) -> bytes | None:
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0:
            return None
        base, blob = self._parts[i]
        if start + n <= base + len(blob):
            return blob[start - base:start - base + n]
        return None

    def readable(self) -> bool:  # noqa: D102
        return True

    def seekable(self) -> bool:  # noqa: D102
        return True

    def tell(self) -> int:  # noqa: D102
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:  # noqa: D102
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self.size + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:  # noqa: D102
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self.size - self._pos))
        if n == 0:
            return 0
        data = self._from_prefetch(self._pos, n)
        if data is None:
            self._file.seek(self._pos)
            data = self._file.read(n)
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:  # noqa: D102
        if not self.closed:
            self._file.close()
            self.release()
        super().close()
