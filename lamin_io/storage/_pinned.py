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

The ranged ``GET`` s, many per read, skip the client's request pipeline (hooks, parameter
checks, response parsing: about 1 ms of CPU a request, which made a 50k-cell subset on
loopback S3 0.46 s of client CPU against pyarrow's 0.32 s): botocore signs each request
(SigV4, with the same refreshing credentials) and urllib3, which botocore sends through
too, sends it; any answer but the data, a ``412`` or a ``404`` is asked again through the
client, whose errors say what went wrong. With a proxy configured in the environment every
request goes through the client.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

from lamin_io.errors import StorageModifiedError, StorageObjectMissingError
from lamin_io.storage._filesystem import broken_answer, error_codes
from lamin_io.storage._options import credential_fingerprint
from lamin_io.storage._redact import protect_logs

if TYPE_CHECKING:
    from upath import UPath

    from lamin_io.storage._engines import S3Access

__all__ = ["PinnedObject"]

#: Connections kept per client: the I/O pool's threads, and the callers' own reads.
_POOL = 32
_lock = threading.Lock()
#: Bytes of a response read into place at a time: the response's own copy of them stays
#: below glibc's threshold for memory of its own (a whole range at once, from 16 threads,
#: grew the heap by ~30 MB the first time).
_STEP = 64 * 1024


def forget_clients() -> None:
    """Drop the cached botocore clients and direct senders (see ``reset_clients``)."""
    _client.cache_clear()
    _signed_gets.cache_clear()


def _forget_clients_after_fork() -> None:
    global _lock
    forget_clients()  # a client's connections are not the child's
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


@functools.lru_cache(maxsize=16)
def _client(access: S3Access, profile: str | None, sources: str) -> Any:
    """Return botocore's S3 client for ``access``, one per process and settings.

    ``sources`` (:func:`credential_fingerprint`) is part of the cache key only: changed AWS
    variables or credential files make a new client, which reads them again.
    """
    from botocore import UNSIGNED
    from botocore.config import Config

    from lamin_io.storage._engines import _aws_session

    config = Config(max_pool_connections=_POOL, connect_timeout=access.connect_timeout,
                    read_timeout=access.read_timeout,
                    retries={"max_attempts": access.retries, "mode": "standard"},
                    s3={"addressing_style": "path"} if access.endpoint_url else {},
                    signature_version=UNSIGNED if access.anon else None)
    session = _aws_session(profile, sources)
    explicit = {} if access.anon else access.aws_credentials()
    protect_logs(explicit.values())
    with _lock:  # (sessions are not safe to use from several threads at once)
        return session.create_client("s3", endpoint_url=access.endpoint_url,
                                     region_name=access.region, config=config, **explicit)


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                    "all_proxy")


class _SignedGets:
    """Ranged ``GET`` s signed by botocore and sent by urllib3 (see the module's docstring)."""

    def __init__(self, access: S3Access, credentials: Any) -> None:
        import urllib3
        from botocore.httpsession import get_cert_path

        self._credentials = credentials  # None: anonymous, unsigned
        self._region = access.region or "us-east-1"
        self._aws = access.endpoint_url is None
        self._endpoint = (access.endpoint_url or
                          f"https://s3.{self._region}.amazonaws.com").rstrip("/")
        # connections that fail or time out are retried here; an error answer (a 5xx) is
        # asked again through the client, whose retries (with their backoff) say what failed
        self._pool = urllib3.PoolManager(
            maxsize=_POOL, block=False,
            timeout=urllib3.Timeout(connect=access.connect_timeout, read=access.read_timeout),
            retries=urllib3.Retry(total=access.retries, status=0,
                                  allowed_methods=frozenset({"GET"}), backoff_factor=0.1,
                                  raise_on_status=False, redirect=False),
            ca_certs=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(verify=True))

    def url(self, bucket: str, key: str, version_id: str | None) -> str:
        from urllib.parse import quote

        path = quote(key, safe="/~")
        query = f"?versionId={quote(version_id, safe='')}" if version_id else ""
        if self._aws and "." not in bucket and bucket.islower():  # virtual-hosted, as AWS wants
            return f"https://{bucket}.s3.{self._region}.amazonaws.com/{path}{query}"
        return f"{self._endpoint}/{bucket}/{path}{query}"

    def get(self, url: str, headers: dict[str, str]) -> Any:
        """Send a signed ``GET``; return urllib3's response, its body not read yet."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="GET", url=url, headers=headers)
        if self._credentials is not None:
            S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3",
                        self._region).add_auth(request)
        return self._pool.request("GET", url, headers=dict(request.headers.items()),
                                  preload_content=False)


@functools.lru_cache(maxsize=16)
def _signed_gets(access: S3Access, profile: str | None, sources: str) -> _SignedGets | None:
    """Return the direct sender for ``access``; ``None`` where a proxy is configured.

    ``sources``: as for :func:`_client`.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    from botocore.credentials import Credentials

    from lamin_io.storage._engines import _aws_session, _session_lock

    given = access.aws_credentials()
    if access.anon:
        credentials = None
    elif given:
        credentials = Credentials(given["aws_access_key_id"], given["aws_secret_access_key"],
                                  given.get("aws_session_token"))
    else:  # the chain's, refreshing themselves where they are temporary
        session = _aws_session(profile, sources)
        with _session_lock:
            credentials = session.get_credentials()
    return _SignedGets(access, credentials)


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
        access, profile = s3_access(path), dict(path.storage_options).get("profile")
        self._retries = access.retries
        sources = credential_fingerprint()
        self._client = _client(access, profile, sources)
        self._direct = _signed_gets(access, profile, sources)
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
        """Return the body of the ``GET`` of ``n`` bytes at ``start`` (a file object)."""
        span = f"bytes={start}-{start + n - 1}"
        if self._direct is not None:
            headers = {"Range": span}
            if "IfMatch" in self._pin:
                headers["If-Match"] = self._pin["IfMatch"]
            response = self._direct.get(
                self._direct.url(self._bucket, self._key, self._pin.get("VersionId")), headers)
            if response.status in (200, 206):
                return response
            response.drain_conn()
            response.release_conn()
            # anything else is asked again through the client: its error says what failed
        return self._call("get_object", {"Range": span, **self._pin})["Body"]

    def read_at(self, n: int, start: int) -> bytes:
        """Return ``n`` bytes at ``start`` (fewer only at the end of the object)."""
        if n <= 0:
            return b""
        buffer = bytearray(n)
        del buffer[self.read_into(start, memoryview(buffer)):]
        return bytes(buffer)

    def read_into(self, start: int, view: memoryview) -> int:
        """Fill ``view`` with the bytes at ``start``; return how many there were.

        The response is read into place as it arrives: no second buffer of the range. A
        connection broken mid-answer (a reset, a short body) asks for the rest again, up to
        the retries of the storage settings; a read that times out is not asked again (its
        request's own retries were spent before the answer started).
        """
        done, broken = 0, 0
        while done < len(view):
            body = self._get(len(view) - done, start + done)
            try:
                while done < len(view):
                    n = body.readinto(view[done:done + _STEP])
                    if not n:
                        break
                    done += n
            except Exception as exc:
                _close(body)
                if broken >= self._retries or not broken_answer(exc):
                    raise
                broken += 1
                continue
            _done(body)
            break  # (fewer bytes only at the end of the object)
        return done


def _done(body: Any) -> None:
    """Give a fully read response's connection back to its pool (urllib3's), or close it."""
    release = getattr(body, "release_conn", None)
    if release is not None:
        release()
    else:
        body.close()


def _close(body: Any) -> None:
    """Drop a response read in part: its connection holds unread bytes, so it is closed."""
    body.close()


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'
