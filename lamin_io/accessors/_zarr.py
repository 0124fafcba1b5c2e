"""Opening zarr groups (formats 2 and 3, consolidated or not), locally and remotely.

A store read through fsspec without consolidated metadata answers every ``group[key]`` with
fresh requests for the node's metadata documents, and AnnData's readers ask for the same
node many times: reading a small unconsolidated store from S3 took over a thousand
requests. :class:`MetadataCacheStore` keeps, for one open read-only group, the metadata
documents and directory listings it has seen; chunks are never cached.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from zarr.storage import WrapperStore

from lamin_io.errors import CorruptArtifactError
from lamin_io.storage import is_local

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Iterable

    from upath import UPath
    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["MetadataCacheStore", "open_zarr_group", "read_runs", "zarr_root_attrs"]

#: Names of the documents that describe nodes (never chunks) in zarr formats 2 and 3.
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


class MetadataCacheStore(WrapperStore["Store"]):
    """A read-only zarr store that remembers metadata documents and listings it has read."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._documents: dict[str, Buffer | None] = {}
        self._listings: dict[str, list[str]] = {}

    def _with_store(self, store: Store) -> MetadataCacheStore:
        # zarr re-wraps stores (e.g. ``with_read_only``): the copy shares what was read
        copy = type(self)(store)
        copy._documents, copy._listings = self._documents, self._listings
        return copy

    @staticmethod
    def _is_metadata(key: str) -> bool:
        return key.rsplit("/", 1)[-1] in METADATA_NAMES

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        """Read ``key``; metadata documents come from memory after their first read."""
        if byte_range is not None or not self._is_metadata(key):
            return await self._store.get(key, prototype, byte_range)
        if key not in self._documents:
            self._documents[key] = await self._store.get(key, prototype)
        return self._documents[key]

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype,
                                                     ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        # zarr fetches a group's member documents in bulk through here
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        """Whether ``key`` exists (answered from the metadata read, for documents)."""
        if not self._is_metadata(key):
            return await self._store.exists(key)
        from zarr.core.buffer import default_buffer_prototype

        return await self.get(key, default_buffer_prototype()) is not None

    async def _listed(self, prefix: str) -> AsyncIterator[str]:
        if prefix not in self._listings:
            self._listings[prefix] = [k async for k in self._store.list_dir(prefix)]
        for key in self._listings[prefix]:
            yield key

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        """List the members under ``prefix`` (once per prefix)."""
        return self._listed(prefix)


def read_runs(items: list[tuple[Any, np.ndarray, np.ndarray]]) -> list[np.ndarray | None]:
    """Read runs of several zarr arrays in one round trip to zarr's event loop.

    ``items`` are ``(array, starts, stops)``; each array's runs come back concatenated
    (``None`` for an array that is not zarr's). Every run of every array is requested at
    once, so the chunks of, say, a sparse matrix's data and indices decode together:
    measured 176 -> 150 ms for both arrays of a 50k-cell matrix in 5-chunk windows.
    """
    import asyncio

    from zarr.core.sync import sync

    async def one(arr: Any, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        runs = await asyncio.gather(*(arr.async_array.getitem(slice(int(s), int(e)))
                                      for s, e in zip(starts, stops, strict=True)))
        parts = [np.asarray(r) for r in runs]
        if not parts:
            return np.empty(0, dtype=arr.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    zarr_items = [i for i, (arr, _, _) in enumerate(items) if hasattr(arr, "async_array")]

    async def every() -> list[np.ndarray]:
        return list(await asyncio.gather(*(one(*items[i]) for i in zarr_items)))

    out: list[np.ndarray | None] = [None] * len(items)
    if zarr_items:
        for i, values in zip(zarr_items, sync(every()), strict=True):
            out[i] = values
    return out


def open_zarr_group(path: UPath, mode: Literal["r", "r+"]) -> Any:
    """Open a zarr group (format 2 or 3, consolidated or not), locally or remotely.

    Writers bypass consolidated metadata (the accessor rewrites it on close); readers use
    it where there is some. Remote read-only groups go through a
    :class:`MetadataCacheStore`.
    """
    import zarr

    consolidated = False if mode != "r" else None
    try:
        if is_local(path):
            return zarr.open_group(path.path, mode=mode, use_consolidated=consolidated)
        from zarr.storage import FsspecStore

        store: Any = FsspecStore.from_url(str(path), storage_options=dict(path.storage_options),
                                          read_only=mode == "r")
        if mode == "r":
            store = MetadataCacheStore(store)
        return zarr.open_group(store, mode=mode, use_consolidated=consolidated)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        msg = f"{path} is not a readable zarr group (corrupt or missing metadata?): {exc}"
        raise CorruptArtifactError(msg) from exc


def zarr_root_attrs(path: UPath) -> dict[str, Any] | None:
    """Return a zarr store's root attributes from one small read, ``None`` if unreadable.

    Probes use this instead of opening the group, which parses all (consolidated)
    metadata: a store opened through :func:`lamin_io.open` is probed by several formats.
    """
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            data = json.loads((path / name).read_bytes())
        except (OSError, ValueError):
            continue
        attrs = data.get(key, {}) if key else data
        return attrs if isinstance(attrs, dict) else None
    return None
