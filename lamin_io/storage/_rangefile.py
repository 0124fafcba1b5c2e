"""A read-only file object over a remote object that serves prefetched byte ranges.

HDF5 reads through a Python file object one small read at a time. When the reader knows
which byte ranges a request needs (the accessor computes them from dataset offsets and
chunk locations), :meth:`RangeFile.prefetch` fetches them all at once with concurrent
range requests (touching ranges merged into one); the reads that follow are served from
memory. Any other read (metadata) is served from a small block cache when it is small, and
fetched as one exact range when it is large. :meth:`RangeFile.prime` reads the object's
first 64 KB and its tail in one round of requests before HDF5 starts: writers put the
metadata they write last there (an AnnData's obs and var, and the object headers of its
groups), which HDF5 would otherwise fetch one small read after another.

On S3 every request is pinned to the version of the object opened
(:class:`lamin_io.storage._pinned.PinnedObject`: by version id, or ``If-Match`` on the ETag
found at open or recorded at save), so an object overwritten while it is read raises
:class:`StorageModifiedError` instead of mixing two versions. Other remote stores are read
through pyarrow over their fsspec file system. Reads that HDF5 makes (``readinto``) happen
while HDF5 holds its global lock; they must never wait on another Python thread (the
garbage collector may run there and finalize an HDF5 object, which needs the same lock), so
they read in the calling thread. Concurrent fetches use a thread pool and are only made
outside HDF5 calls.
"""

from __future__ import annotations

import bisect
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from upath import UPath

__all__ = ["METADATA_BLOCK", "RangeFile"]

#: Block size of the cache that serves small (metadata) reads.
METADATA_BLOCK = 16 * 1024
#: Reads at least this large bypass the block cache: one exact range request each.
DIRECT_READ = 64 * 1024
#: Ranges closer than this share one request (the bytes between are read and dropped).
BRIDGE = 64 * 1024
#: Misses of the block cache that follow each other in the file read twice as far ahead
#: each time, up to this many bytes (HDF5 reads a string column's heap in order, a block
#: at a time).
READ_AHEAD = 1 << 20
#: Blocks kept by the metadata cache.
MAX_BLOCKS = 256
#: Bytes :meth:`RangeFile.prime` reads from the start of the object (into the block cache):
#: the superblock and the root group's header and index.
HEAD_BYTES = 4 * METADATA_BLOCK
#: :meth:`RangeFile.prime` keeps the last ``size // TAIL_FRACTION`` bytes of the object,
#: within these bounds. In an h5ad that anndata wrote, obs and var (written after X) take
#: about 2% of the file: the last 4 MB of a 217 MB file hold all but obs's index, those of
#: an 863 MB one obs's columns and var. More would add to a read's peak of memory.
TAIL_FRACTION = 32
MIN_TAIL = 256 * 1024
MAX_TAIL = 4 << 20


def tail_size(size: int) -> int:
    """Return the bytes :meth:`RangeFile.prime` keeps from the end of a ``size``-byte object.

    The whole object when what is left before the tail is no more than the head.
    """
    tail = max(MIN_TAIL, min(MAX_TAIL, size // TAIL_FRACTION))
    return size if size - tail <= HEAD_BYTES else tail


class _ArrowSource:
    """Byte ranges of an object of any other remote store, through pyarrow over fsspec."""

    def __init__(self, path: UPath) -> None:
        from lamin_io.storage._engines import pyarrow_filesystem

        self._reader = pyarrow_filesystem(path, use_fsspec=True).open_input_file(path.path)
        self.size = int(self._reader.size())

    def read_at(self, n: int, start: int) -> bytes:
        # (``read_at`` is safe from several threads: it moves the file's one position under
        # a lock where the file system has only one)
        return bytes(self._reader.read_at(n, start))

    def read_into(self, start: int, view: memoryview) -> int:
        data = self.read_at(len(view), start)
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._reader.close()


class RangeFile(io.RawIOBase):
    """Seekable binary reader of ``path`` with an explicit prefetch of byte ranges.

    Parameters
    ----------
    path
        A remote path (normalized, with its storage options).
    etag
        On S3: the ETag the object must have (the one recorded at save); every read is
        pinned to it. ``None`` pins the reads to the version found at open.
    """

    def __init__(self, path: UPath, *, etag: str | None = None,
                 block_size: int = METADATA_BLOCK) -> None:
        from lamin_io.storage._engines import S3_PROTOCOLS
        from lamin_io.storage._pinned import PinnedObject

        super().__init__()
        self._path = path.path
        self._source: Any = (PinnedObject(path, etag=etag) if path.protocol in S3_PROTOCOLS
                             else _ArrowSource(path))
        self.size = int(self._source.size)
        self._block = block_size
        self._blocks: dict[int, bytes] = {}
        self._next_block, self._ahead = -1, 1  # read-ahead of in-order misses
        self._pos = 0
        self._starts: list[int] = []
        self._parts: list[tuple[int, memoryview]] = []
        # where the tail read by ``prime`` starts, and its bytes (one attribute, so that a
        # reader in another thread never sees the start of one tail with another's bytes)
        self._tail: tuple[int, memoryview] = (self.size, memoryview(b""))

    @property
    def etag(self) -> str | None:
        """The ETag every read is pinned to (S3; ``None`` elsewhere)."""
        return getattr(self._source, "etag", None)

    def prime(self) -> None:
        """Read the first blocks and the tail of the object in one round of requests.

        The first :data:`HEAD_BYTES` go to the block cache; the last ``size //
        TAIL_FRACTION`` bytes (:data:`MIN_TAIL` to :data:`MAX_TAIL`) are kept until
        :meth:`release_tail` or ``close``, and every read inside them is served from
        memory. A small object is read whole (:func:`tail_size`).
        """
        from lamin_io.storage._localread import executor, results

        tail = tail_size(self.size)
        head = HEAD_BYTES if tail < self.size else 0
        at = self.size - tail
        view = memoryview(bytearray(tail))
        tail_read = executor().submit(self._read_piece, at, view)
        head_read = executor().submit(self._source.read_at, head, 0) if head else None
        results([tail_read] if head_read is None else [tail_read, head_read])
        if head_read is not None:
            first = memoryview(head_read.result())
            for b in range(head // self._block):
                self._blocks[b] = bytes(first[b * self._block:(b + 1) * self._block])
        self._tail = (at, view)

    def _tail_into(self, start: int, view: memoryview) -> bool:
        """Fill ``view`` with the bytes at ``start`` if the tail holds them; return whether."""
        at, tail = self._tail
        if start < at or start + len(view) > at + len(tail):
            return False
        view[:] = tail[start - at:start - at + len(view)]
        return True

    def _read_piece(self, start: int, view: memoryview) -> None:
        """Read ``len(view)`` bytes at ``start`` into ``view`` (from any thread)."""
        got = self._source.read_into(start, view)
        if got != len(view):
            self._short(start, got, len(view))

    def _short(self, start: int, got: int, wanted: int) -> None:
        msg = (f"{self._path}: read {got} of {wanted} bytes at offset {start}: the object "
               "is shorter than its metadata says (truncated?)")
        raise OSError(msg)

    def start_read(self, ranges: list[tuple[int, int]]) -> Callable[[], memoryview]:
        """Start reading ``ranges`` concurrently; return the function that waits for them.

        That function returns the ranges' bytes one after another in list order (and
        raises what a request raised); call it outside HDF5 calls. A range that touches
        the one before shares its request; so does one less than :data:`BRIDGE` bytes
        after it and no farther than that one is long: a request costs far more than a
        few kilobytes, and the bytes read stay within twice the bytes asked for. Requests
        land in one buffer, the bytes between ranges are squeezed out in place at the
        end, so a batch needs no second buffer.
        """
        from lamin_io.storage._localread import executor, results

        groups: list[list[Any]] = []  # [file start, file stop, [(start, stop, at), ...]]
        offset, previous = 0, 0
        for start, stop in ranges:
            gap = start - groups[-1][1] if groups else -1
            if groups and 0 <= gap <= min(BRIDGE, previous):
                groups[-1][1] = stop
                groups[-1][2].append((start, stop, offset))
            else:
                groups.append([start, stop, [(start, stop, offset)]])
            offset, previous = offset + stop - start, stop - start
        buffer = bytearray(sum(last - first for first, last, _ in groups))
        view = memoryview(buffer)
        futures, landed = [], 0
        for group in groups:
            first, last, _ = group
            into = view[landed:landed + last - first]
            if not self._tail_into(first, into):
                futures.append(executor().submit(self._read_piece, first, into))
            group.append(landed)
            landed += last - first

        squeezed: list[bool] = []

        def wait() -> memoryview:
            results(futures)
            if landed != offset and not squeezed:  # squeeze the gaps out, left to right
                squeezed.append(True)
                import numpy as np

                values = np.frombuffer(buffer, dtype=np.uint8)
                for first, _, parts, at in groups:
                    for start, stop, final in parts:
                        source = at + start - first
                        if source != final:
                            values[final:final + stop - start] = values[source:source
                                                                        + stop - start]
            return view[:offset]

        return wait

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
        buffer = self.start_read([(a, b) for a, b in merged])()
        offset = 0
        for start, stop in merged:
            self._starts.append(start)
            self._parts.append((start, buffer[offset:offset + stop - start]))
            offset += stop - start
        return offset

    def release(self) -> None:
        """Drop prefetched bytes."""
        self._starts, self._parts = [], []

    def release_tail(self) -> None:
        """Drop the tail read by :meth:`prime`; later reads there are made as before."""
        self._tail = (self.size, memoryview(b""))

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
        if self._tail_into(self._pos, view[:n]):
            self._pos += n
            return n
        data: bytes | memoryview | None = self._from_prefetch(self._pos, n)
        if data is None and n >= DIRECT_READ:
            data = self._source.read_at(n, self._pos)
        elif data is None:
            data = self._from_blocks(self._pos, n)
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _from_blocks(self, start: int, n: int) -> bytes:
        first, last = start // self._block, (start + n - 1) // self._block
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:  # one read for the missing span, longer while misses run in order
            self._ahead = (min(2 * self._ahead, READ_AHEAD // self._block)
                           if missing[0] == self._next_block else 1)
            stop = max(missing[-1] + 1, missing[0] + self._ahead)
            lo, hi = missing[0] * self._block, min(self.size, stop * self._block)
            self._next_block = stop
            blob = self._source.read_at(hi - lo, lo)
            for b in range(missing[0], -(-hi // self._block)):
                self._blocks[b] = blob[(b - missing[0]) * self._block:
                                       (b - missing[0] + 1) * self._block]
        data = b"".join(self._blocks[b] for b in range(first, last + 1))
        while len(self._blocks) > MAX_BLOCKS:  # the oldest go first
            self._blocks.pop(next(iter(self._blocks)))
        offset = start - first * self._block
        return data[offset:offset + n]

    def close(self) -> None:  # noqa: D102
        if not self.closed:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
            self._blocks.clear()
            self.release_tail()
            self.release()
        super().close()
