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
    from collections.abc import Callable, Sequence

__all__ = ["IndexReader", "chunk_table"]


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


def _layout(ds: Any, read: Callable[[list[tuple[int, int]]], Sequence[Any]],
            size: int) -> tuple[int, int] | None:
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
    head = read([(address, min(size, address + _HEADER_READ))])[0]
    if len(head) < 16 or head[0] != 1:  # version 2 headers start with "OHDR"
        return None
    blocks = [(head, 16, 16 + _u(head, 8, 4))]
    if 16 + _u(head, 8, 4) > len(head):  # a long header: read it whole
        whole = read([(address, min(size, address + 16 + _u(head, 8, 4)))])[0]
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
                blocks.append((read([(start, min(size, start + n))])[0], 0, n))
            at += 8 + length
    return None


def chunk_table(ds: Any, read: Callable[[list[tuple[int, int]]], Sequence[Any]],
                size: int) -> np.ndarray | None:
    """File offsets of every chunk of a 1-D chunked dataset (``-1``: not allocated).

    ``read`` reads byte ranges of the file (all of one call concurrently), ``size`` is the
    file's size. Returns ``None`` when the dataset's layout is not the one read here, or
    when the index looks inconsistent; HDF5 is then asked instead.
    """
    plist = ds.file.id.get_create_plist()
    if ds.ndim != 1 or not ds.chunks or plist.get_sizes() != (8, 8) or plist.get_userblock():
        return None  # (addresses count from the end of a userblock: none here)
    found = _layout(ds, read, size)
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
        buffers = list(read([(a, min(size, a + guess)) for a in level_nodes]))
        children = []
        for i, buf in enumerate(buffers):
            if len(buf) < _NODE_HEADER or bytes(buf[:4]) != b"TREE" or buf[4] != 1:
                return None
            n, node_level = _u(buf, 6, 2), int(buf[5])
            if level is not None and node_level != level:
                return None
            need = _NODE_HEADER + n * entry.itemsize + key
            if need > len(buf):  # more entries than the default node holds
                buf = buffers[i] = read([(level_nodes[i],
                                          min(size, level_nodes[i] + need))])[0]
                if len(buf) < need:
                    return None
            entries = np.frombuffer(buf, dtype=entry, count=n, offset=_NODE_HEADER)
            if node_level > 0:
                children.extend(entries["child"].tolist())
                continue
            rows = entries["offset"][:, 0].astype(np.int64)
            which = rows // rows_per_chunk
            if (np.any(rows % rows_per_chunk) or np.any(which >= n_chunks)
                    or np.any(which < 0) or np.any(entries["offset"][:, 1])):
                return None
            table[which] = entries["child"].astype(np.int64)
            filled += n
        if not children:
            return table if filled <= n_chunks else None
        level = int(buffers[0][5]) - 1
        level_nodes = children
    return None
