"""A read-only file object over a remote object that serves prefetched byte ranges.

HDF5 reads through a Python file object one small read at a time. When the reader knows
which byte ranges a request needs (the accessor computes them from dataset offsets and
chunk locations), :meth:`RangeFile.prefetch` fetches them all at once with concurrent
range requests (touching ranges merged into one); the reads that follow are served from
memory. Any other read (metadata) is served from a small block cache when it is small, and
fetched as one exact range when it is large.

Every request goes through pyarrow's native S3 client, whose C++ code signs and sends it
without the GIL (about a third of the client time per request of a Python S3 client).
Reads that HDF5 makes (``readinto``) happen while HDF5 holds its global lock; they must
never wait on another Python thread (the garbage collector may run there and finalize an
HDF5 object, which needs the same lock), so they read in the calling thread. Concurrent
fetches use a thread pool and are only made outside HDF5 calls.
"""

from __future__ import annotations

import bisect
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from upath import UPath

__all__ = ["METADATA_BLOCK", "RangeFile", "sync_reader"]

#: Block size of the cache that serves small (metadata) reads.
METADATA_BLOCK = 16 * 1024
#: Reads at least this large bypass the block cache: one exact range request each.
DIRECT_READ = 64 * 1024
#: Blocks kept by the metadata cache.
MAX_BLOCKS = 256


def sync_reader(path: UPath) -> Any:
    """Return a file with ``read_at(n, offset)`` that reads in the calling thread.

    S3 objects open through pyarrow's native S3 client, built from the same settings as
    the path's fsspec filesystem (endpoint, region, credentials or anonymous access).
    """
    from lamin_io.storage._engines import pyarrow_filesystem

    return pyarrow_filesystem(path).open_input_file(path.path)


class RangeFile(io.RawIOBase):
    """Seekable binary reader of ``path`` with an explicit prefetch of byte ranges."""

    def __init__(self, path: UPath, *, block_size: int = METADATA_BLOCK) -> None:
        super().__init__()
        self._path = path.path
        self._reader = sync_reader(path)
        self.size = int(self._reader.size())
        self._block = block_size
        self._blocks: dict[int, bytes] = {}
        self._pos = 0
        self._starts: list[int] = []
        self._parts: list[tuple[int, memoryview]] = []

    def _read_at(self, start: int, stop: int) -> bytes:
        data: bytes = self._reader.read_at(stop - start, start)
        if len(data) != stop - start:
            msg = (f"{self._path}: read {len(data)} of {stop - start} bytes at offset "
                   f"{start}: the object is shorter than its metadata says (truncated?)")
            raise OSError(msg)
        return data

    def _get(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """Fetch sorted, non-overlapping ranges concurrently; touching ranges share a request."""
        merged: list[list[int]] = []
        for start, stop in ranges:
            if merged and start == merged[-1][1]:
                merged[-1][1] = stop
            else:
                merged.append([start, stop])
        if len(merged) == 1:
            blobs = [self._read_at(*merged[0])]
        else:
            from lamin_io.storage._localread import executor

            blobs = list(executor().map(lambda m: self._read_at(m[0], m[1]), merged))
        out: list[memoryview] = []
        for (start, stop), blob in zip(merged, blobs, strict=True):
            view, offset = memoryview(blob), 0
            while offset < stop - start:
                first, last = ranges[len(out)]
                out.append(view[offset:offset + last - first])  # no copy
                offset += last - first
        return out

    def prefetch(self, ranges: list[tuple[int, int]]) -> int:
        """Fetch ``[(start, stop), ...]`` concurrently and serve later reads from them.

        Replaces what an earlier prefetch held. Returns the number of bytes fetched.
        """
        merged: list[list[int]] = []
        for start, stop in sorted(r for r in ranges if r[1] > r[0]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        self._starts, self._parts = [], []
        if not merged:
            return 0
        blobs = self._get([(m[0], m[1]) for m in merged])
        for (start, _), blob in zip(merged, blobs, strict=True):
            self._starts.append(start)
            self._parts.append((start, blob))
        return sum(len(b) for _, b in self._parts)

    def fetch(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """Fetch byte ranges concurrently and return them in order (not kept).

        Call only outside HDF5 calls (see the module docstring).
        """
        if not ranges:
            return []
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        blobs = self._get([ranges[i] for i in order])
        out: list[memoryview] = [memoryview(b"")] * len(ranges)
        for i, blob in zip(order, blobs, strict=True):
            out[i] = blob
        return out

    def release(self) -> None:
        """Drop prefetched bytes."""
        self._starts, self._parts = [], []

    def _from_prefetch(self, start: int, n: int) -> memoryview | None:
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
        data: bytes | memoryview | None = self._from_prefetch(self._pos, n)
        if data is None and n >= DIRECT_READ:
            data = self._reader.read_at(n, self._pos)
        elif data is None:
            data = self._from_blocks(self._pos, n)
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _from_blocks(self, start: int, n: int) -> bytes:
        first, last = start // self._block, (start + n - 1) // self._block
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:  # one read for the missing span
            lo, hi = missing[0] * self._block, min(self.size, (missing[-1] + 1) * self._block)
            blob = self._reader.read_at(hi - lo, lo)
            for b in range(missing[0], missing[-1] + 1):
                self._blocks[b] = blob[(b - missing[0]) * self._block:
                                       (b - missing[0] + 1) * self._block]
            while len(self._blocks) > MAX_BLOCKS:
                self._blocks.pop(next(iter(self._blocks)))
        data = b"".join(self._blocks[b] for b in range(first, last + 1))
        offset = start - first * self._block
        return data[offset:offset + n]

    def close(self) -> None:  # noqa: D102
        if not self.closed:
            self._reader.close()
            self._blocks.clear()
            self.release()
        super().close()
