"""Opening zarr groups (formats 2 and 3, consolidated or not), locally and remotely.

A store read through fsspec without consolidated metadata answers every ``group[key]`` with
fresh requests for the node's metadata documents, and AnnData's readers ask for the same
node many times: reading a small unconsolidated store from S3 took over a thousand
requests. :class:`MetadataCacheStore` keeps, for one open read-only group, the metadata
documents and directory listings it has seen; chunks are never cached (except those fetched
ahead for one read: a dataframe's arrays, all requested at once, see
:func:`fetch_arrays_ahead`). Reading an opened AnnData zarr on S3: 10 requests to open
(was 14 to 19, depending on the s3fs version), and obs in one round trip instead of one
per array (with 20 ms per request: open 372 -> 238 ms, obs 171 -> 62 ms).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from zarr.storage import WrapperStore

from lamin_io.errors import CorruptArtifactError, StorageModifiedError
from lamin_io.storage import (
    RETRIES,
    bound_retries,
    broken_answer,
    error_codes,
    is_local,
    retries_in,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping

    from upath import UPath
    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["MetadataCacheStore", "fetch_arrays_ahead", "open_zarr_group", "zarr_root_attrs"]

#: Objects of a group fetched ahead at most (a larger one is read as its readers ask).
_MAX_AHEAD = 4096
#: Names of the documents that describe nodes (never chunks) in zarr formats 2 and 3.
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


class MetadataCacheStore(WrapperStore["Store"]):
    """A read-only zarr store that remembers metadata documents and listings it has read.

    Chunks are never kept, except those fetched ahead with :meth:`fetch_ahead`, until
    their one read.
    """

    def __init__(self, store: Store, *, versions: Mapping[str, str] | None = None,
                 retries: int = RETRIES) -> None:
        super().__init__(store)
        self._retries = retries
        self._documents: dict[str, Buffer | None] = {}
        self._listings: dict[str, list[str]] = {}
        self._ahead: dict[str, Buffer | None] = {}
        self._versions = dict(versions or {})

    def _with_store(self, store: Store) -> MetadataCacheStore:
        # zarr re-wraps stores (e.g. ``with_read_only``): the copy shares what was read
        copy = type(self)(store, versions=self._versions, retries=self._retries)
        copy._documents, copy._listings, copy._ahead = (self._documents, self._listings,
                                                        self._ahead)
        return copy

    async def _read(self, key: str, prototype: BufferPrototype,
                    byte_range: ByteRequest | None = None) -> Buffer | None:
        """Read an object; one whose answer was cut short is asked for again.

        s3fs retries a request until its answer starts (botocore's retries), not a body
        cut short after it: that is asked again here, up to the retries of the storage
        settings (:func:`lamin_io.storage.retries_in`). A timeout is not asked again.
        """
        attempt = 0
        while True:
            try:
                return await self._read_once(key, prototype, byte_range)
            except Exception as exc:
                if attempt >= self._retries or not broken_answer(exc):
                    raise
                attempt += 1

    async def _read_once(self, key: str, prototype: BufferPrototype,
                         byte_range: ByteRequest | None = None) -> Buffer | None:
        """Read an object, pinned to its recorded version where the store has one for it.

        A pinned object is asked for with ``If-Match`` on its recorded ETag: one changed
        since raises :class:`StorageModifiedError`, one gone :class:`CorruptArtifactError`
        (the record lists it: never read as fill values).
        """
        etag = self._versions.get(key)
        if etag is None:
            return await self._store.get(key, prototype, byte_range)
        from botocore.exceptions import ClientError

        fs: Any = getattr(self._store, "fs", None)
        root: str = getattr(self._store, "path", "")
        bucket, _, prefix = root.strip("/").partition("/")
        request = {"Bucket": bucket, "Key": f"{prefix}/{key}" if prefix else key,
                   "IfMatch": etag if etag.startswith('"') else f'"{etag}"'}
        if byte_range is not None:
            request["Range"] = _range_header(byte_range)
        client = await fs.set_session()
        try:
            response = await client.get_object(**request)
        except ClientError as exc:
            codes = set(error_codes(exc))
            if codes & {"412", "PreconditionFailed"}:
                msg = (f"{root}/{key} changed after the store was verified: its bytes are no "
                       f"longer the version recorded; open it again for the new version")
                raise StorageModifiedError(msg) from exc
            if codes & {"404", "NoSuchKey"}:
                msg = (f"{root}/{key} is listed in the store's record but gone from "
                       f"storage: the store is incomplete and is not read as fill values")
                raise CorruptArtifactError(msg) from exc
            raise
        body = response["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return prototype.buffer.from_bytes(data)

    async def fetch_ahead(self, keys: list[str]) -> None:
        """Fetch whole objects concurrently; each is served once, to the next read of it.

        Readers that take arrays one after another (anndata's, column by column) then
        wait for one round trip instead of one per object.
        """
        import asyncio

        from zarr.core.buffer import default_buffer_prototype

        prototype = default_buffer_prototype()
        got = await asyncio.gather(*(self._read(k, prototype) for k in keys),
                                   return_exceptions=True)
        for key, value in zip(keys, got, strict=True):
            if not isinstance(value, BaseException):  # a failed one is asked for again
                self._ahead[key] = value

    def drop_ahead(self) -> None:
        """Forget objects fetched ahead and not read."""
        self._ahead.clear()

    @staticmethod
    def _is_metadata(key: str) -> bool:
        return key.rsplit("/", 1)[-1] in METADATA_NAMES

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        """Read ``key``; metadata documents come from memory after their first read."""
        if byte_range is None and key in self._ahead:
            return self._ahead.pop(key)
        if byte_range is not None or not self._is_metadata(key):
            return await self._read(key, prototype, byte_range)
        if key not in self._documents:
            self._documents[key] = await self._read(key, prototype)
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


def _range_header(byte_range: ByteRequest) -> str:
    """Return the HTTP ``Range`` of one of zarr's byte requests."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, RangeByteRequest):
        return f"bytes={byte_range.start}-{byte_range.end - 1}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"bytes={byte_range.offset}-"
    if isinstance(byte_range, SuffixByteRequest):
        return f"bytes=-{byte_range.suffix}"
    msg = f"unknown byte request {byte_range!r}"
    raise TypeError(msg)


def fetch_arrays_ahead(group: Any, *, skip_index: bool = False) -> Callable[[], None]:
    """Fetch every stored object of the arrays under a remote zarr group, concurrently.

    For a group read whole (a dataframe: its index, columns, categories), so its arrays
    cost one round trip, not one each; ``skip_index`` leaves out the array the group's
    ``_index`` attribute names (read already). Returns the function that forgets what
    was not read. Does nothing for other stores (local, HDF5) or nodes (an array), or
    past :data:`_MAX_AHEAD` objects; sharded arrays are left to zarr (it may read a
    shard in parts).
    """
    import itertools

    import zarr
    from zarr.core.sync import sync

    store = getattr(group, "store", None)
    if not isinstance(group, zarr.Group) or not isinstance(store, MetadataCacheStore):
        return lambda: None
    index = group.attrs.get("_index") if skip_index else None
    keys: list[str] = []
    for name, node in group.members(max_depth=None):
        if not isinstance(node, zarr.Array) or node.shards is not None or name == index:
            continue
        counts = [-(-int(n) // int(c)) for n, c in zip(node.shape, node.chunks, strict=True)]
        if len(keys) + int(np.prod(counts, dtype=np.int64)) > _MAX_AHEAD:
            return lambda: None
        keys += [f"{node.path}/{node.metadata.encode_chunk_key(coords)}"
                 for coords in itertools.product(*(range(n) for n in counts))]
    if keys:
        sync(store.fetch_ahead(keys))
    return store.drop_ahead


def open_zarr_group(path: UPath, mode: Literal["r", "r+"], *,
                    versions: Mapping[str, str] | None = None) -> Any:
    """Open a zarr group (format 2 or 3, consolidated or not), locally or remotely.

    Writers bypass consolidated metadata (the accessor rewrites it on close); readers use
    it where there is some. Remote read-only groups go through a
    :class:`MetadataCacheStore`; ``versions`` (each object's recorded ETag, by relative
    path) pins the reads of an S3 store to what the registry recorded.
    """
    import zarr

    consolidated = False if mode != "r" else None
    try:
        if is_local(path):
            return zarr.open_group(path.path, mode=mode, use_consolidated=consolidated)
        from zarr.storage import FsspecStore

        options = dict(path.storage_options)
        if path.protocol in ("s3", "s3a") and mode == "r":
            # s3fs would ask each object's size first (a HEAD before every chunk's GET), to
            # split large objects into concurrent parts; chunks are small, and zarr already
            # fetches many at once
            options.setdefault("max_concurrency", 1)
        store: Any = FsspecStore.from_url(str(path), storage_options=options,
                                          read_only=mode == "r")
        bound_retries(store.fs)  # (an asynchronous instance of its own)
        if mode == "r":
            store = MetadataCacheStore(
                store, versions=versions if path.protocol in ("s3", "s3a") else None,
                retries=retries_in(options))
        return zarr.open_group(store, mode=mode, use_consolidated=consolidated)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        msg = f"{path} is not a readable zarr group (corrupt or missing metadata?): {exc}"
        raise CorruptArtifactError(msg) from exc


def zarr_root_attrs(path: UPath) -> dict[str, Any] | None:
    """Return a zarr store's root attributes from one small read, ``None`` if unreadable.

    Probes use this instead of opening the group, which parses all (consolidated)
    metadata: a store opened through :func:`lamin_io.open` is probed by several formats.
    The documents of both formats are asked for at once, each with a single request (a
    remote read that first asks for the object's size costs two).
    """
    root = path.path.rstrip("/")
    names = {f"{root}/zarr.json": "attributes", f"{root}/.zattrs": None}
    try:
        # in order, without globbing; from offset 0: a plain GET, where s3fs would first
        # ask the object's size
        found = path.fs.cat_ranges(list(names), [0] * len(names), [None] * len(names),
                                   on_error="return")
    except (OSError, ValueError):
        return None
    for (_, key), data in zip(names.items(), found, strict=True):
        if isinstance(data, BaseException):
            continue
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        attrs = doc.get(key, {}) if key else doc
        return attrs if isinstance(attrs, dict) else None
    return None
