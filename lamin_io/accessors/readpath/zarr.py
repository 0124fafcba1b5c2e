"""The zarr backend: chunks decoded by lamin-io, once each, on every core.

Arrays whose codecs numcodecs covers (:func:`chunk_decoder`; anndata's defaults among
them) are *gathered*: every chunk holding a selected value is fetched once (remote ones
all requested at once, right away, so a batch's requests are in flight while the one
before decodes; local chunk files read by the decoding threads), decoded once into a
reused buffer, and only the selected values are copied out, so memory follows the
selection, not the chunks. Other arrays (sharded, filtered, other byte orders) are read
through zarr, every run of every array requested in one round trip to its event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lamin_io.accessors.readpath.backend import Backend, Runs, read_runs
from lamin_io.accessors.readpath.pipeline import Pending
from lamin_io.accessors.readpath.plan import expand
from lamin_io.errors import CorruptArtifactError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ZarrBackend", "chunk_decoder"]

#: Batches a remote store has in flight while one is decoded.
REMOTE_AHEAD = 2


class ZarrBackend(Backend):
    """Reads the arrays of one open zarr group (local or remote)."""

    def __init__(self, *, remote: bool = False) -> None:
        self.remote = remote
        self.ahead = REMOTE_AHEAD if remote else 1

    def gathers(self, arr: Any) -> bool:
        """Whether ``arr`` is read chunk by chunk here, each chunk decoded once.

        1-D arrays through :meth:`start_runs` (any ranges), 2-D ones through
        :meth:`start_block` (any rows and columns).
        """
        return arr.ndim in (1, 2) and chunk_decoder(arr) is not None

    def start_runs(self, items: list[Runs], *, advised: bool = False
                   ) -> Pending[list[np.ndarray]]:
        """Start reading runs of several arrays; see :func:`_start_runs`."""
        return _start_runs(items)

    def start_block(self, arr: Any, rows: np.ndarray, cols: np.ndarray | None,
                    out: np.ndarray) -> Pending[None]:
        """Start reading ``arr[rows][:, cols]`` into ``out``; see :func:`_start_block`."""
        return _start_block(arr, rows, cols, out)

def _numcodecs_decoder(codec: Any) -> Any:
    """Return the numcodecs codec that decodes what a zarr v3 bytes-to-bytes codec wrote."""
    import numcodecs

    return {"BloscCodec": numcodecs.Blosc, "ZstdCodec": numcodecs.Zstd,
            "GzipCodec": numcodecs.GZip}.get(type(codec).__name__, lambda: None)()


def chunk_decoder(arr: Any) -> Callable[[Any, np.ndarray], None] | None:
    """How to decode one stored chunk of a zarr array ourselves, ``None`` if we can't.

    The returned function decodes a chunk's stored bytes into ``out`` (a C-ordered buffer
    of one chunk's shape), raising :class:`CorruptArtifactError` when they do not decode
    to exactly a chunk. Covered: numeric arrays with at most one compressor and no filters
    (zarr format 2 in C order with any numcodecs compressor; format 3 with the ``bytes``
    serializer in native order and blosc, zstd or gzip), which include anndata's defaults;
    anything else (sharding, filters, transposes, checksums, other byte orders) is left to
    zarr.
    """
    import sys

    meta = getattr(arr, "metadata", None)
    if (meta is None or not hasattr(arr, "async_array") or arr.ndim < 1
            or arr.dtype.kind not in "biuf" or arr.filters or len(arr.compressors) > 1
            or getattr(arr, "shards", None) is not None):
        return None
    if meta.zarr_format == 2:
        codec = arr.compressors[0] if arr.compressors else None
        if (codec is not None and not hasattr(codec, "decode")) or meta.order != "C":
            return None
    else:
        serializer = arr.serializer
        endian = getattr(getattr(serializer, "endian", None), "value", None)
        if type(serializer).__name__ != "BytesCodec" or endian not in (None, sys.byteorder):
            return None
        codec = _numcodecs_decoder(arr.compressors[0]) if arr.compressors else None
        if arr.compressors and codec is None:
            return None
    nbytes = int(np.prod(arr.chunks, dtype=np.int64)) * arr.dtype.itemsize

    def decode(raw: Any, out: np.ndarray) -> None:
        target = out.reshape(-1).view(np.uint8)
        try:
            if codec is None:
                data = raw
            elif type(codec).__name__ == "Blosc":
                # a blosc frame's 16-byte header holds its decoded size at bytes 4-8
                if len(raw) >= 16 and int(raw[4:8].view("<u4")[0]) == nbytes:
                    codec.decode(raw, out=target)
                    return
                data = raw[:0]  # reported below
            else:
                data = np.frombuffer(codec.decode(raw), dtype=np.uint8)
        except Exception as exc:  # any codec's failure on stored bytes means damage
            msg = f"a chunk of {arr.name} does not decode ({exc!r}): the store is damaged"
            raise CorruptArtifactError(msg) from exc
        if data.size != nbytes:
            msg = (f"a chunk of {arr.name} holds {data.size} bytes, not {nbytes}: "
                   "the store is damaged; restore it from its source")
            raise CorruptArtifactError(msg)
        target[:] = data

    return decode


class _Plan(Protocol):
    """The chunks of one array a read needs, and where their pieces go in ``out``."""

    @property
    def arr(self) -> Any:
        """The zarr array read."""

    @property
    def decode(self) -> Callable[[Any, np.ndarray], None]:
        """Its :func:`chunk_decoder`."""

    @property
    def out(self) -> np.ndarray:
        """The values read."""

    def coords(self) -> list[tuple[int, ...]]:
        """Return the chunks' grid coordinates, in the order :meth:`copier` takes them."""

    def copier(self) -> Callable[[int, np.ndarray], None]:
        """Return what copies the pieces of the ``i``-th chunk, decoded, into ``out``."""


@dataclass
class _RunsPlan:
    """Where the pieces of one 1-D array's runs lie: chunk by chunk, and in the output."""

    arr: Any
    decode: Callable[[Any, np.ndarray], None]
    chunks: np.ndarray  # the chunks to read, ascending
    bounds: np.ndarray  # pieces of chunks[i] are pieces[bounds[i]:bounds[i + 1]]
    piece_start: np.ndarray  # in the chunk
    piece_stop: np.ndarray
    piece_out: np.ndarray  # in the output
    out: np.ndarray

    def coords(self) -> list[tuple[int, ...]]:
        return [(k,) for k in self.chunks.tolist()]

    def copier(self) -> Callable[[int, np.ndarray], None]:
        starts, stops, outs = (self.piece_start.tolist(), self.piece_stop.tolist(),
                               self.piece_out.tolist())
        bounds, out = self.bounds.tolist(), self.out

        def copy(i: int, chunk: np.ndarray) -> None:
            for p in range(bounds[i], bounds[i + 1]):
                s, e, o = starts[p], stops[p], outs[p]
                out[o:o + e - s] = chunk[s:e]

        return copy


def _plan(arr: Any, decode: Callable[[Any, np.ndarray], None], starts: np.ndarray,
          stops: np.ndarray) -> _RunsPlan:
    size = int(arr.chunks[0])
    starts, stops = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
    first = starts // size
    n_pieces = (stops - 1) // size - first + 1
    run = np.repeat(np.arange(len(starts)), n_pieces)
    chunk = expand(first, n_pieces)
    begin = np.maximum(starts[run], chunk * size)
    end = np.minimum(stops[run], (chunk + 1) * size)
    out = (np.cumsum(stops - starts) - (stops - starts))[run] + begin - starts[run]
    order = np.argsort(chunk, kind="stable")  # pieces of a chunk together, in any run order
    chunk, begin, end, out = chunk[order], begin[order], end[order], out[order]
    chunks, first_piece = np.unique(chunk, return_index=True)
    return _RunsPlan(arr, decode, chunks, np.append(first_piece, len(chunk)),
                     begin - chunk * size, end - chunk * size, out,
                     np.empty(int((stops - starts).sum()), dtype=arr.dtype))


#: Where one chunk's share of an axis goes: (positions in the output, positions in the
#: chunk), each a slice where they are consecutive.
_Part = tuple[slice | np.ndarray, slice | np.ndarray]


def _axis_parts(positions: np.ndarray, size: int) -> tuple[list[int], list[_Part]]:
    """Split sorted, unique positions along an axis of chunks of ``size``, chunk by chunk.

    Returns the chunks holding any position and, for each, where its positions go in the
    output and where they lie in the chunk.
    """
    chunk = positions // size
    chunks, first = np.unique(chunk, return_index=True)
    bounds = [*first.tolist(), len(positions)]
    parts: list[_Part] = []
    for k, a, b in zip(chunks.tolist(), bounds[:-1], bounds[1:], strict=True):
        inside = positions[a:b] - k * size
        consecutive = int(inside[-1]) - int(inside[0]) == b - a - 1
        parts.append((slice(a, b), slice(int(inside[0]), int(inside[-1]) + 1)
                      if consecutive else inside))
    return chunks.tolist(), parts


@dataclass
class _BlockPlan:
    """The chunks of a 2-D array holding selected rows x columns, and where they go."""

    arr: Any
    decode: Callable[[Any, np.ndarray], None]
    row_chunks: list[int]
    row_parts: list[_Part]
    col_chunks: list[int]
    col_parts: list[_Part]
    out: np.ndarray  # selected rows x selected columns

    def coords(self) -> list[tuple[int, ...]]:
        return [(r, c) for r in self.row_chunks for c in self.col_chunks]

    def copier(self) -> Callable[[int, np.ndarray], None]:
        n_cols, out = len(self.col_chunks), self.out
        rows, cols = self.row_parts, self.col_parts

        def copy(i: int, chunk: np.ndarray) -> None:
            (out_rows, in_rows), (out_cols, in_cols) = rows[i // n_cols], cols[i % n_cols]
            if isinstance(in_rows, np.ndarray) and isinstance(in_cols, np.ndarray):
                out[out_rows, out_cols] = chunk[np.ix_(in_rows, in_cols)]
            else:  # one slice and at most one array: numpy indexes them orthogonally
                out[out_rows, out_cols] = chunk[in_rows, in_cols]

        return copy


def _start_block(arr: Any, rows: np.ndarray, cols: np.ndarray | None, out: np.ndarray
                ) -> Pending[None]:
    """Start reading ``arr[rows][:, cols]`` of a 2-D zarr array into ``out``.

    ``rows`` and ``cols`` are sorted, unique positions (``cols=None``: every column);
    ``out`` has their shape. Every chunk holding a selected row and column is read once
    (remote ones requested at once, right away) and decoded once, in the threads that
    copy its selected values out (a local store's chunk files are read there too), so
    memory follows the selection plus a chunk per thread. Returns the read started (a
    :class:`~lamin_io.accessors.readpath.pipeline.Pending`). Only for arrays
    :meth:`ZarrBackend.gathers` accepts (others raise ``ValueError``).
    """
    decode = chunk_decoder(arr) if arr.ndim == 2 else None
    if decode is None:
        msg = f"{arr.name} is not a 2-D array whose chunks we decode: read it through zarr"
        raise ValueError(msg)
    n_rows, n_cols = (int(n) for n in arr.shape)
    size_rows, size_cols = (int(n) for n in arr.chunks)
    if cols is None:
        col_chunks = list(range(-(-n_cols // size_cols)))
        col_parts: list[_Part] = [
            (slice(k * size_cols, min(n_cols, (k + 1) * size_cols)),
             slice(0, min(size_cols, n_cols - k * size_cols))) for k in col_chunks]
    else:
        col_chunks, col_parts = _axis_parts(np.asarray(cols, dtype=np.int64), size_cols)
    row_chunks, row_parts = _axis_parts(np.asarray(rows, dtype=np.int64), size_rows)
    if not row_chunks or not col_chunks:
        return _start_gather([])
    return _start_gather([_BlockPlan(arr, decode, row_chunks, row_parts, col_chunks,
                                     col_parts, out)])


def _local_folder(arr: Any) -> str | None:
    """Return the folder of a zarr array in a local store (its chunks are plain files)."""
    from zarr.storage import LocalStore

    where = arr.async_array.store_path
    if not isinstance(where.store, LocalStore):
        return None
    return str(where.store.root / where.path) if where.path else str(where.store.root)


def _read_file(path: str) -> np.ndarray | None:
    try:
        with open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8)
    except FileNotFoundError:
        return None


def _decode_into(plan: _Plan, raws: list[Any] | str, which: range) -> None:
    """Decode chunks ``which`` of a plan and copy their pieces into the output.

    ``raws`` are the fetched chunks, or the folder to read them from (a local store).
    """
    buffer = np.empty(tuple(int(n) for n in plan.arr.chunks), dtype=plan.arr.dtype)
    fill = plan.arr.fill_value
    copy, coords = plan.copier(), plan.coords()
    for i in which:
        if isinstance(raws, str):
            raw = _read_file(f"{raws}/{plan.arr.metadata.encode_chunk_key(coords[i])}")
        else:
            raw = raws[i].as_numpy_array() if raws[i] is not None else None
        if raw is None:  # never written: zarr reads it as the fill value
            buffer[...] = 0 if fill is None else fill
        else:
            plan.decode(raw, buffer)
        copy(i, buffer)


def _start_gather(plans: list[_Plan]) -> Pending[None]:
    """Start fetching the chunks of every plan; return what decodes them, on every core.

    Remote chunks are all requested at once (one round trip to zarr's event loop, from a
    pool thread) and are on their way when this returns; chunks of a local store are read
    by the threads that decode them, once the returned object is called. Settling it
    waits for the remote fetch only.
    """
    import asyncio
    import os

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from lamin_io.storage._localread import executor, results

    prototype = default_buffer_prototype()
    sources: list[Any] = [_local_folder(plan.arr) for plan in plans]
    remote = [i for i, source in enumerate(sources) if source is None]

    async def fetch() -> list[list[Any]]:
        requests = []
        for i in remote:
            where, meta = plans[i].arr.async_array.store_path, plans[i].arr.metadata
            requests += [(where / meta.encode_chunk_key(k)).get(prototype=prototype)
                         for k in plans[i].coords()]
        # every request ends before an error is raised
        got = await asyncio.gather(*requests, return_exceptions=True)
        failed = [r for r in got if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        bounds = np.cumsum([0, *(len(plans[i].coords()) for i in remote)]).tolist()
        return [got[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    fetched = executor().submit(sync, fetch()) if remote else None

    def decode() -> None:
        if fetched is not None:
            for i, raws in zip(remote, fetched.result(), strict=True):
                sources[i] = raws
        jobs = [(plan, source, range(a, b))
                for plan, source in zip(plans, sources, strict=True)
                for a, b in _split(len(plan.coords()), os.cpu_count() or 1)]
        if len(jobs) <= 1:
            for job in jobs:
                _decode_into(*job)
            return
        results([executor().submit(_decode_into, *job) for job in jobs])

    return Pending(decode, fetched.result if fetched is not None else None)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _start_runs(items: list[Runs]) -> Pending[list[np.ndarray]]:
    """Start reading runs of several zarr arrays; return the reads started (``Pending``).

    ``items`` are ``(array, starts, stops)``; each array's runs come back concatenated.
    Arrays :func:`chunk_decoder` covers are
    read chunk by chunk: every chunk holding a run is fetched once (all at once; remote
    ones right away, so a batch's requests are in flight while the one before decodes),
    decoded once into a reused buffer, and only the runs are copied out, so memory follows
    the runs, not the chunks (measured on a 50k-cell matrix, 5% of cells: 190 -> 60 ms).
    The others go through zarr when waited for, every run of every array requested at
    once, so the chunks of, say, a sparse matrix's data and indices decode together (an
    array that is not zarr's goes through its own library).
    Settling waits for the remote chunk fetches only: it neither decodes nor reads the
    others.
    """
    plans: dict[int, _Plan] = {}
    for i, (arr, starts, stops) in enumerate(items):
        decode = chunk_decoder(arr) if arr.ndim == 1 else None
        if decode is not None and len(starts):
            plans[i] = _plan(arr, decode, starts, stops)
    gather = _start_gather(list(plans.values())) if plans else None

    def finish() -> list[np.ndarray]:
        out: dict[int, np.ndarray] = {}
        if gather is not None:
            gather()
            out = {i: plan.out for i, plan in plans.items()}
        rest = [i for i, (arr, _, _) in enumerate(items)
                if i not in plans and hasattr(arr, "async_array")]
        if rest:
            out.update(zip(rest, _read_through_zarr([items[i] for i in rest]), strict=True))
        return [out[i] if i in out else read_runs(*item) for i, item in enumerate(items)]

    return Pending(finish, gather.settle if gather is not None else None)


def _read_through_zarr(items: list[tuple[Any, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Each array's runs, concatenated, read by zarr in one round trip to its event loop."""
    import asyncio

    from zarr.core.sync import sync

    async def one(arr: Any, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        runs = await asyncio.gather(*(arr.async_array.getitem(slice(int(s), int(e)))
                                      for s, e in zip(starts, stops, strict=True)))
        parts = [np.asarray(r) for r in runs]
        if not parts:
            return np.empty(0, dtype=arr.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def every() -> list[np.ndarray]:
        return list(await asyncio.gather(*(one(*item) for item in items)))

    return sync(every())


