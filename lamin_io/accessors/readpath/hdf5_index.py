"""Where every chunk of an HDF5 dataset lies, read from its chunk index in a few requests.

HDF5 finds a chunk by walking the dataset's chunk index (a version-1 B-tree, which h5py
writes by default) one node at a time; on S3 each node is a request, made one after the
other: listing the ~2,000 chunks of a 50k-cell matrix cost ~100 sequential requests.
Here the tree is read level by level, every node of a level in one concurrent batch of
reads, so a whole index costs as many round trips as the tree has levels (two or three).

Only the layout this covers is read here: a version-1 object header, data layout message
version 3 (chunked), 8-byte file offsets. Anything else (files written with newer
``libver`` bounds use other chunk indexes) returns ``None``, and callers ask HDF5.
The format is described in the HDF5 File Format Specification (object headers, data
layout message, version 1 B-trees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Sequence

    # a walk through one dataset's metadata: it yields the byte ranges it needs next, is
    # sent their bytes, and returns its result
    _Walk = Generator[list[tuple[int, int]], list[Any], Any]

__all__ = ["IndexReader", "chunk_table", "chunk_tables"]


@dataclass(frozen=True)
class IndexReader:
    """How to read a file's chunk indexes ourselves."""

    #: Reads ``[(start, stop), ...]`` byte ranges (concurrently); returns each one's bytes.
    read: Callable[[list[tuple[int, int]]], Sequence[Any]]
    #: The file's size in bytes.
    size: int
    #: Read a dataset's whole index even when a request needs few of its chunks (remote
    #: files: HDF5 would look each chunk up with sequential requests).
    whole: bool = False

_UNDEFINED = 0xFFFF_FFFF_FFFF_FFFF
_HEADER_READ = 4096  # first read of an object header (most fit)
_NODE_HEADER = 24  # "TREE", type, level, entries used, left and right siblings
_DEFAULT_K = 32  # entries of a chunk B-tree node: up to 2K children (HDF5's default K)
_LAYOUT, _CONTINUATION = 0x0008, 0x0010


def _u(buf: bytes | memoryview, at: int, n: int) -> int:
    return int.from_bytes(bytes(buf[at:at + n]), "little")


def _read_one(start: int, stop: int) -> _Walk:
    """Read one byte range (within a walk: ``buf = yield from _read_one(a, b)``).

    An address past the end of the file (a damaged one) reads nothing, without a read.
    """
    if start >= stop:
        return b""
    return (yield [(start, stop)])[0]


def _layout(ds: Any, size: int) -> _Walk:
    """Return ``(B-tree address, dimensionality)`` of a chunked dataset, else ``None``."""
    import h5py

    # the object header's address (``h5o.get_info`` would also walk the chunk index, to
    # size it: the very requests this module saves)
    try:
        address, high = h5py.h5g.get_objinfo(ds.id, b".").objno
    except (AttributeError, RuntimeError, ValueError):  # an h5py without the old call
        return None
    if high:
        return None
    head = yield from _read_one(address, min(size, address + _HEADER_READ))
    if len(head) < 16 or head[0] != 1:  # version 2 headers start with "OHDR"
        return None
    blocks = [(head, 16, 16 + _u(head, 8, 4))]
    if 16 + _u(head, 8, 4) > len(head):  # a long header: read it whole
        whole = yield from _read_one(address, min(size, address + 16 + _u(head, 8, 4)))
        blocks = [(whole, 16, 16 + _u(head, 8, 4))]
    seen = 0
    while blocks and seen < 64:
        buf, at, end = blocks.pop()
        seen += 1
        while at + 8 <= min(end, len(buf)):
            kind, length = _u(buf, at, 2), _u(buf, at + 2, 2)
            body = buf[at + 8:at + 8 + length]
            if kind == _LAYOUT:
                if len(body) < 11 or body[0] != 3 or body[1] != 2:
                    return None  # another layout version, or not chunked
                return _u(body, 3, 8), int(body[2])
            if kind == _CONTINUATION and len(body) >= 16:
                start, n = _u(body, 0, 8), _u(body, 8, 8)
                blocks.append(((yield from _read_one(start, min(size, start + n))), 0, n))
            at += 8 + length
    return None


def _table(ds: Any, size: int) -> _Walk:
    """Walk to the chunk table of one dataset (see :func:`chunk_tables`)."""
    plist = ds.file.id.get_create_plist()
    if ds.ndim != 1 or not ds.chunks or plist.get_sizes() != (8, 8) or plist.get_userblock():
        return None  # (addresses count from the end of a userblock: none here)
    found = yield from _layout(ds, size)
    if found is None:
        return None
    root, dims = found
    rows_per_chunk = int(ds.chunks[0])
    n_chunks = -(-int(ds.shape[0]) // rows_per_chunk)
    table = np.full(n_chunks, -1, dtype=np.int64)
    if root == _UNDEFINED or dims != 2:
        return table if root == _UNDEFINED else None
    key = 8 + 8 * dims  # chunk size, filter mask, offset per dimension
    entry = np.dtype([("size", "<u4"), ("mask", "<u4"), ("offset", "<u8", (dims,)),
                      ("child", "<u8")])
    guess = _NODE_HEADER + (2 * _DEFAULT_K + 1) * key + 2 * _DEFAULT_K * 8
    level_nodes, level, filled = [root], None, 0
    for _ in range(64):  # deeper than any real tree: a loop in a damaged file
        if any(a >= size for a in level_nodes):
            return None  # a node past the end of the file: damaged
        buffers = list((yield [(a, min(size, a + guess)) for a in level_nodes]))
        parts = []
        for i, buf in enumerate(buffers):
            if len(buf) < _NODE_HEADER or bytes(buf[:4]) != b"TREE" or buf[4] != 1:
                return None
            n, node_level = _u(buf, 6, 2), int(buf[5])
            if node_level != (level if level is not None else int(buffers[0][5])):
                return None  # the nodes of a level are all on it
            need = _NODE_HEADER + n * entry.itemsize + key
            if need > len(buf):  # more entries than the default node holds
                buf = buffers[i] = yield from _read_one(level_nodes[i],
                                                        min(size, level_nodes[i] + need))
                if len(buf) < need:
                    return None
            parts.append(np.frombuffer(buf, dtype=entry, count=n, offset=_NODE_HEADER))
        entries = np.concatenate(parts)  # the level's entries, checked at once
        if int(buffers[0][5]) > 0:
            level = int(buffers[0][5]) - 1
            level_nodes = entries["child"].tolist()
            if not level_nodes:
                return table if filled <= n_chunks else None
            continue
        rows = entries["offset"][:, 0].astype(np.int64)
        which = rows // rows_per_chunk
        if (np.any(rows % rows_per_chunk) or np.any(which >= n_chunks)
                or np.any(which < 0) or np.any(entries["offset"][:, 1])):
            return None
        table[which] = entries["child"].astype(np.int64)
        filled += len(entries)
        return table if filled <= n_chunks else None
    return None


def chunk_tables(datasets: Sequence[Any], read: Callable[[list[tuple[int, int]]],
                                                           Sequence[Any]],
                 size: int) -> list[np.ndarray | None]:
    """File offsets of every chunk of each 1-D chunked dataset (``-1``: not allocated).

    ``read`` reads byte ranges of the file (all of one call concurrently), ``size`` is the
    file's size. The datasets' indexes are walked side by side, each step's reads of all
    of them in one call, so several tables cost the round trips of the deepest one. A
    dataset's table is ``None`` when its layout is not the one read here, or when its
    index looks inconsistent; HDF5 is then asked instead.
    """
    out: list[np.ndarray | None] = [None] * len(datasets)
    walks = {i: _table(ds, size) for i, ds in enumerate(datasets)}
    wanted: dict[int, list[tuple[int, int]]] = {}
    for i, walk in walks.items():
        try:
            wanted[i] = next(walk)
        except StopIteration as done:
            out[i] = done.value
    while wanted:
        got = iter(read([r for ranges in wanted.values() for r in ranges]))
        step, wanted = wanted, {}
        for i, ranges in step.items():
            try:
                wanted[i] = walks[i].send([next(got) for _ in ranges])
            except StopIteration as done:
                out[i] = done.value
    return out


def chunk_table(ds: Any, read: Callable[[list[tuple[int, int]]], Sequence[Any]],
                size: int) -> np.ndarray | None:
    """:func:`chunk_tables` of one dataset."""
    return chunk_tables([ds], read, size)[0]
