"""Byte ranges of one stored object, every request pinned to the version first seen.

An object overwritten while it is read must never give bytes of two versions (HDF5
metadata from one, chunks from the other). :class:`PinnedObject` asks for the object's
state once (``HEAD``: size, ETag, version id) and then sends every ranged ``GET`` with that
version: by ``VersionId`` where the bucket keeps versions (the reads go on returning the
version opened, whatever is written meanwhile), else with ``If-Match: <ETag>``, which S3
answers with ``412`` once the object changed: :class:`StorageModifiedError`, re-open to
read the new version. A caller that verified the object against a record passes the
recorded ETag, so even the ``HEAD`` is conditional.

pyarrow's S3 client and fsspec's ``cat_ranges`` cannot send ``If-Match``; botocore (which
s3fs wraps) can, and its client is thread-safe: a read runs in the calling thread (HDF5
reads must never wait on another Python thread, see :mod:`lamin_io.storage._rangefile`),
concurrent reads from the I/O pool share its connection pool. Credentials come from
explicit options or the standard AWS chain, whose temporary credentials botocore refreshes.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

from lamin_io.errors import StorageModifiedError, StorageObjectMissingError
from lamin_io.storage._filesystem import error_codes

if TYPE_CHECKING:
    from upath import UPath

    from lamin_io.storage._engines import S3Access

__all__ = ["PinnedObject"]

#: Connections kept per client: the I/O pool's threads, and the callers' own reads.
_POOL = 32
#: Bytes of a response copied into place at a time.
_BLOCK = 256 * 1024
_lock = threading.Lock()


def _forget_clients_after_fork() -> None:
    global _lock
    _client.cache_clear()  # a client's connections are not the child's
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


@functools.lru_cache(maxsize=16)
def _client(access: S3Access, profile: str | None) -> Any:
    """Return botocore's S3 client for ``access``, one per process and settings."""
    from botocore import UNSIGNED
    from botocore.config import Config

    from lamin_io.storage._engines import _aws_session
    from lamin_io.storage._options import credential_fingerprint

    retries = {"max_attempts": access.max_attempts, "mode": "standard"} \
        if access.max_attempts is not None else {"mode": "standard"}
    config = Config(max_pool_connections=_POOL, connect_timeout=access.connect_timeout or 60,
                    read_timeout=access.read_timeout or 60, retries=retries,
                    s3={"addressing_style": "path"} if access.endpoint_url else {},
                    signature_version=UNSIGNED if access.anon else None)
    session = _aws_session(profile, credential_fingerprint())
    explicit = {} if access.anon else access.aws_credentials()
    with _lock:  # (sessions are not safe to use from several threads at once)
        return session.create_client("s3", endpoint_url=access.endpoint_url,
                                     region_name=access.region, config=config, **explicit)


class PinnedObject:
    """Ranged reads of one S3 object, all of the version its ``HEAD`` found.

    Parameters
    ----------
    path
        An ``s3://`` path (normalized, with its storage options).
    etag
        The ETag the object must have (recorded at save); ``None`` takes the one found.

    Raises
    ------
    StorageModifiedError
        ``etag`` was given and the object no longer has it (at open), or the object changed
        while it was read (a read after).
    StorageObjectMissingError
        The object is gone.
    """

    def __init__(self, path: UPath, *, etag: str | None = None) -> None:
        from lamin_io.storage._engines import s3_access

        self._where = str(path)
        self._client = _client(s3_access(path), dict(path.storage_options).get("profile"))
        self._bucket, _, self._key = path.path.partition("/")
        head = self._call("head_object", {"IfMatch": _quoted(etag)} if etag else {})
        self.size = int(head["ContentLength"])
        self.etag = str(head.get("ETag", "")).strip('"') or None
        version = head.get("VersionId")
        self.version_id = version if version not in (None, "null") else None
        if self.version_id is not None:
            self._pin: dict[str, str] = {"VersionId": self.version_id}
        elif self.etag is not None:
            self._pin = {"IfMatch": _quoted(self.etag)}
        else:  # a store that names no version: nothing to pin reads to
            self._pin = {}

    def _call(self, method: str, extra: dict[str, str]) -> Any:
        from botocore.exceptions import ClientError

        try:
            return getattr(self._client, method)(Bucket=self._bucket, Key=self._key, **extra)
        except ClientError as exc:
            codes = set(error_codes(exc))
            if codes & {"412", "PreconditionFailed"}:
                msg = (f"{self._where} was overwritten after it was opened (or verified): "
                       f"its bytes are no longer the version being read; open it again "
                       f"to read the new version")
                raise StorageModifiedError(msg) from exc
            if codes & {"404", "NoSuchKey", "NoSuchVersion"}:
                msg = f"{self._where} is gone (deleted while it was open)"
                raise StorageObjectMissingError(msg) from exc
            raise

    def _get(self, n: int, start: int) -> Any:
        return self._call("get_object", {"Range": f"bytes={start}-{start + n - 1}", **self._pin})

    def read_at(self, n: int, start: int) -> bytes:
        """Return ``n`` bytes at ``start`` (fewer only at the end of the object)."""
        if n <= 0:
            return b""
        body = self._get(n, start)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def read_into(self, start: int, view: memoryview) -> int:
        """Fill ``view`` with the bytes at ``start``; return how many there were.

        The response is copied in as it arrives, a block at a time: no second buffer of
        the whole range.
        """
        if not len(view):
            return 0
        body = self._get(len(view), start)["Body"]
        done = 0
        try:
            for block in body.iter_chunks(_BLOCK):
                view[done:done + len(block)] = block
                done += len(block)
        finally:
            body.close()
        return done


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'
