"""Filesystem instances and clients, their reset, and storage error translation.

:func:`reset_clients` is the one place that forgets every filesystem and client this
process keeps (fsspec's instance caches, pyarrow's S3 clients, botocore clients and
sessions): :func:`lamin_io.connect` and :func:`lamin_io.disconnect` call it, so switching
credentials or registries never reuses a client made for the previous ones.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

from fsspec import get_filesystem_class

from lamin_io.errors import (
    BucketNotFoundError,
    CredentialsError,
    LaminIOError,
    PathNotFoundError,
    StoragePermissionError,
    StorageServiceError,
    StorageTimeoutError,
    StorageUnreachableError,
)
from lamin_io.storage._options import S3FS_TRIES, credential_fingerprint

if TYPE_CHECKING:
    from collections.abc import Iterator

    from upath import UPath

__all__ = [
    "bound_retries",
    "broken_answer",
    "credentials_error",
    "engine_codes",
    "error_codes",
    "missing_path",
    "refresh_if_credentials_changed",
    "reset_clients",
    "storage_error",
    "storage_errors",
]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_seen: dict[str, str] = {}


def refresh_if_credentials_changed(protocol: str) -> None:
    """Drop cached filesystem instances of ``protocol`` when AWS credentials changed.

    fsspec keeps one filesystem per (class, options); credentials taken from the environment
    or ``~/.aws`` are not part of that key, so a change there must clear the cache by hand.
    """
    fp = credential_fingerprint()
    with _lock:
        previous = _seen.get(protocol)
        _seen[protocol] = fp
    if previous is not None and previous != fp:
        get_filesystem_class(protocol).clear_instance_cache()


def reset_clients() -> None:
    """Forget every cached filesystem and client of this process.

    fsspec's instance caches (every filesystem class imported: s3fs with its listings and
    aiobotocore clients, ...), pyarrow's S3 clients, the botocore clients and sessions of
    pinned reads: the next access builds new ones from the settings and credentials given
    then. Objects opened before keep the clients they hold. Local cached copies of
    artifacts are content, checked against their records, and stay.
    """
    from fsspec.registry import registry

    from lamin_io.storage import _engines, _pinned

    for cls in set(registry.values()):
        cls.clear_instance_cache()
    _engines.forget_clients()
    _pinned.forget_clients()
    with _lock:
        _seen.clear()


def bound_retries(fs: Any) -> None:
    """Make an s3fs filesystem leave retries to botocore (:data:`S3FS_TRIES` tries a call).

    s3fs retries a call 5 times (its attribute ``retries``, which its maintainers point
    users at) on top of botocore's retries, for timeouts and broken connections: an
    endpoint that stops answering took 5 x 4 attempts x the read timeout. Set on the
    instances lamin-io uses (fsspec keeps one per set of options); other filesystems are
    left alone.
    """
    if getattr(fs, "retries", S3FS_TRIES) != S3FS_TRIES and "s3" in getattr(
            fs, "protocol", ()):
        fs.retries = S3FS_TRIES


#: Errors of a connection that failed (refused, reset, closed early) or timed out, by name:
#: botocore's, aiohttp's (s3fs), urllib3's (pinned reads), fsspec's.
_UNREACHABLE_NAMES = frozenset({
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientOSError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ReadTimeoutError",
    "NewConnectionError",
    "ProtocolError",
    "IncompleteRead",
    "IncompleteReadError",
    "ResponseStreamingError",
    "FSTimeoutError",
})

#: What the AWS C++ SDK (in pyarrow and TileDB) and object_store (in polars) write in their
#: messages when the network failed: no other way to tell, they raise ``OSError`` and
#: their own exception classes with a message.
_UNREACHABLE_TEXT = re.compile(
    r"AWS Error NETWORK_CONNECTION|AWS Error REQUEST_TIMEOUT|\[Error Type: 99\]|curlCode: \d+"
    r"|error sending request|connection (?:reset|refused|closed)|operation timed out"
    r"|Timeout was reached|timed out", re.IGNORECASE)
_TIMEOUT_TEXT = re.compile(r"curlCode: 28\b|Timeout was reached|timed out|REQUEST_TIMEOUT",
                           re.IGNORECASE)

#: How TileDB's S3 layer starts the messages of the ``RuntimeError`` s it raises.
_TILEDB_S3_TEXT = re.compile(r"\[TileDB::S3\]|S3: ")

#: The HTTP status and S3 error code as those messages spell them: pyarrow's ``AWS Error
#: SLOW_DOWN ... (HTTP status 503)``, TileDB's ``[HTTP Response Code: 503] [Exception:
#: SlowDown]``, polars' ``status code: 503 ... <Code>SlowDown</Code>``.
_STATUS_TEXT = re.compile(r"(?:HTTP status|HTTP Response Code:|status code:)\s*(\d{3})")
_CODE_TEXT = re.compile(r"<Code>(\w+)</Code>|\[Exception: (\w+)\]|AWS Error ([A-Z_]+)")
#: The AWS C++ SDK's names of S3 error codes (``Aws::Client::CoreErrors``).
_SDK_CODES = {"SLOW_DOWN": "SlowDown", "SERVICE_UNAVAILABLE": "ServiceUnavailable",
              "INTERNAL_FAILURE": "InternalError", "ACCESS_DENIED": "AccessDenied",
              "THROTTLING": "SlowDown"}

#: S3 error codes of a refused request: credentials not valid, or lacking a permission (a
#: ``HEAD`` answers ``403`` alone, without a body to tell which).
_DENIED_CODES = frozenset({
    "403",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
})

#: S3's error codes for a failing service (beside the HTTP 5xx statuses).
_SERVICE_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown",
                            "ServiceException"})
#: The status S3 sends each with (for messages that name the code alone: pyarrow's).
_SERVICE_STATUS = {"InternalError": "500", "ServiceUnavailable": "503", "SlowDown": "503"}

#: botocore's "no usable credentials" errors (by name: botocore is imported by s3fs only).
_NO_CREDENTIALS_NAMES = frozenset({
    "NoCredentialsError",
    "PartialCredentialsError",
    "ProfileNotFound",
})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and the exceptions it was raised from or while handling, once each."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_unreachable(exc: BaseException) -> bool:
    return any(type(e).__name__ in _UNREACHABLE_NAMES or _is_network_builtin(e)
               for e in _chain(exc)) or any(
        _UNREACHABLE_TEXT.search(str(e)) for e in _chain(exc) if _engine_error(e))


#: Errors of a connection broken while an answer's body was read (urllib3's, botocore's,
#: aiohttp's, the socket's), by name.
_BROKEN_NAMES = frozenset({"ProtocolError", "IncompleteRead", "IncompleteReadError",
                           "ResponseStreamingError", "ClientPayloadError",
                           "ConnectionResetError", "ConnectionAbortedError",
                           "BrokenPipeError", "ServerDisconnectedError"})


def broken_answer(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection broken mid-answer: worth asking again.

    Not a timeout (its request's retries were spent waiting) and not an answer of the
    server. The clients retry a request up to its answer's headers; a body cut short after
    them is for the reader to ask again, for the bytes it still lacks.
    """
    names = {type(e).__name__ for e in _chain(exc)}
    return (bool(names & _BROKEN_NAMES) and not any("Timeout" in n for n in names)
            and not set(error_codes(exc)))


def _is_network_builtin(e: BaseException) -> bool:
    """Tell a socket's own failure (refused, reset, timed out) from lamin-io's errors."""
    return isinstance(e, ConnectionError | TimeoutError) and not isinstance(e, LaminIOError)


def _is_timeout(exc: BaseException) -> bool:
    return any("Timeout" in type(e).__name__ or (isinstance(e, TimeoutError))
               or (_engine_error(e) and _TIMEOUT_TEXT.search(str(e)))
               for e in _chain(exc))


def _engine_error(e: BaseException) -> bool:
    """Whether ``e`` is an error of pyarrow, polars or TileDB (told by message only)."""
    module = type(e).__module__.split(".", 1)[0]
    return module in ("pyarrow", "polars", "tiledb", "tiledbsoma") or (
        type(e) is OSError and not e.args[1:]) or (  # (pyarrow's: an OSError with a message)
        type(e) is RuntimeError and _TILEDB_S3_TEXT.match(str(e)) is not None)  # (TileDB's)


def engine_codes(exc: BaseException) -> Iterator[str]:
    """Yield the HTTP statuses and S3 error codes that engines' messages in ``exc`` name.

    pyarrow and TileDB (the AWS C++ SDK) and polars (object_store) raise errors whose
    message is all there is: ``503``, ``SlowDown``, ...
    """
    for e in _chain(exc):
        if not _engine_error(e):
            continue
        text = str(e)
        yield from _STATUS_TEXT.findall(text)
        for s3_code, tiledb_code, sdk_name in _CODE_TEXT.findall(text):
            if s3_code or tiledb_code:
                yield s3_code or tiledb_code
            elif sdk_name in _SDK_CODES:  # (not NETWORK_CONNECTION, REQUEST_TIMEOUT, ...)
                yield _SDK_CODES[sdk_name]


def error_codes(exc: BaseException) -> Iterator[str]:
    """Yield the S3 error code and HTTP status of every botocore error in ``exc``'s chain.

    (``"NoSuchBucket"``, ``"404"``; ``"PreconditionFailed"``, ``"412"``): what the server
    answered, as opposed to what a message says.
    """
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if not isinstance(response, dict):
            continue
        code = (response.get("Error") or {}).get("Code")
        if code:
            yield str(code)
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status:
            yield str(status)


def _bucket_of(where: str) -> str | None:
    """Return the bucket of an ``s3://bucket/key`` URL, ``None`` for anything else."""
    if "://" not in where or where.split("://", 1)[0].lower() not in ("s3", "s3a"):
        return None
    return where.split("://", 1)[1].split("/", 1)[0] or None


def _endpoint_text(endpoint: str | None) -> str:
    return f"endpoint {endpoint}" if endpoint else "the default AWS endpoint"


def bucket_error(bucket: str, where: str, endpoint: str | None) -> BucketNotFoundError:
    """Return the error for a missing bucket, naming it, the endpoint and what to do."""
    msg = (f"bucket {bucket!r} does not exist at {_endpoint_text(endpoint)} (while "
           f"accessing {where}): create it (e.g. `aws s3 mb s3://{bucket}`), or fix the "
           f"bucket name in the path or storage root")
    return BucketNotFoundError(msg)


def permission_error(where: str, endpoint: str | None,
                     codes: set[str]) -> StoragePermissionError:
    """Return the error for a request the object store refused (S3's 403)."""
    named = ", ".join(sorted(c for c in codes if not c.isdigit())) or "403 Forbidden"
    msg = (f"{_endpoint_text(endpoint)} refused access to {where} ({named}): the "
           f"credentials are not valid (a wrong, expired or rotated key) or lack the "
           f"permission this needs; check the key given (storage_options, AWS_PROFILE, "
           f"AWS_ACCESS_KEY_ID) and the bucket policy ('For a team' in the README lists "
           f"what each role needs)")
    return StoragePermissionError(msg)


def credentials_error(where: str, endpoint: str | None,
                      detail: str | None = None) -> CredentialsError:
    """Return the error for S3 access without credentials, with the ways to provide them.

    Anonymous access is never a fallback: the hint says how to ask for it.
    """
    found = f" ({detail})" if detail else ""
    msg = (f"no AWS credentials found to access {where} at {_endpoint_text(endpoint)}"
           f"{found}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a "
           f"profile in ~/.aws/credentials), or pass key=/secret= in storage_options; for a "
           f"public bucket, ask for anonymous access with anon=True (connect(..., anon=True) "
           f"or storage_options={{'anon': True}})")
    return CredentialsError(msg)


def missing_path(path: UPath, hint: str | None = None) -> PathNotFoundError | BucketNotFoundError:
    """Return the error for a path that does not exist, telling a missing bucket apart.

    On S3 a missing object and a missing bucket both read as "does not exist"; one more
    request (a bucket probe, made only on this failure path) tells which, so the message
    can say to create the bucket rather than to check the key.

    Parameters
    ----------
    path
        The normalized path that was found missing.
    hint
        What to do, appended to the message of a missing path.
    """
    endpoint = dict(path.storage_options).get("endpoint_url")
    bucket = _bucket_of(str(path))
    if bucket is not None and _bucket_is_missing(path.fs, bucket):
        return bucket_error(bucket, str(path), endpoint)
    msg = f"path {path} does not exist: check the path, or the bucket and prefix"
    if hint:
        msg += f"; {hint}"
    return PathNotFoundError(msg)


def _bucket_is_missing(fs: Any, bucket: str) -> bool:
    """Whether the server answers that ``bucket`` does not exist (``HeadBucket``: 404).

    Any other answer (access denied, a timeout, an endpoint without the call) says nothing
    about the bucket: the path is reported missing instead.
    """
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 (only the server's own answer counts)
        codes = set(error_codes(exc))
        logger.debug("bucket probe of %s: %s", bucket, codes or exc)
        return bool(codes & {"404", "NoSuchBucket"})
    return False


def storage_error(exc: BaseException, where: str,
                  endpoint: str | None = None) -> LaminIOError | None:
    """Return the typed error for a storage failure, ``None`` for any other exception.

    ``where`` names the path or key in the message; ``endpoint`` names the server. The
    failures of every client lamin-io uses (botocore and s3fs, urllib3, pyarrow, polars,
    TileDB) are told apart by exception class, the S3 error code and HTTP status the server
    answered, or, for engines that only have a message, the status and code it names:

    - no connection or no answer within the timeouts, on every attempt the retry budget
      allows: :class:`StorageTimeoutError`; refused or reset: :class:`StorageUnreachableError`;
    - botocore's missing credentials: :class:`CredentialsError`;
    - S3's ``NoSuchBucket``: :class:`BucketNotFoundError`;
    - a refused request (``403``): :class:`StoragePermissionError`;
    - a 5xx answered to every attempt: :class:`StorageServiceError` naming the status
      and S3 error code (``503 SlowDown``).

    Each message says what to do.
    """
    if isinstance(exc, LaminIOError):
        return None
    codes = set(error_codes(exc)) | set(engine_codes(exc))
    if _is_unreachable(exc) and not codes:
        target = endpoint or "the default AWS endpoint"
        if _is_timeout(exc):
            msg = (f"storage endpoint {target} did not answer in time while accessing "
                   f"{where} (timed out on every attempt of a bounded retry budget): check "
                   f"the endpoint URL, the network, and that the server is running")
            return StorageTimeoutError(msg)
        msg = (f"storage endpoint {target} did not answer while accessing {where} "
               f"(connection refused, reset or closed, after bounded retries): check the "
               f"endpoint URL, the network, and that the server is running")
        return StorageUnreachableError(msg)
    botocore = next((e for e in _chain(exc) if type(e).__name__ in _NO_CREDENTIALS_NAMES),
                    None)
    if botocore is not None:
        return credentials_error(where, endpoint, str(botocore))
    if "NoSuchBucket" in codes:
        return bucket_error(_bucket_of(where) or where, where, endpoint)
    if codes & _DENIED_CODES:
        return permission_error(where, endpoint, codes & _DENIED_CODES)
    named = sorted(c for c in codes if c in _SERVICE_CODES)
    statuses = sorted({c for c in codes if c.isdigit() and c >= "500"}
                      or {_SERVICE_STATUS[c] for c in named if c in _SERVICE_STATUS})
    if statuses or named:
        msg = (f"{_endpoint_text(endpoint)} kept failing while accessing {where} (S3 error "
               f"{' '.join(statuses + named)}, on every attempt of a bounded retry budget): "
               f"the storage service is in trouble; retry later")
        return StorageServiceError(msg)
    return None


@contextlib.contextmanager
def storage_errors(where: str, endpoint: str | None = None) -> Iterator[None]:
    """Translate low-level storage failures into :mod:`lamin_io.errors` types.

    See :func:`storage_error`: what it does not recognize is raised unchanged, as are
    lamin-io's own errors.
    """
    try:
        yield
    except LaminIOError:
        raise
    except Exception as exc:
        typed = storage_error(exc, where, endpoint)
        if typed is None:
            raise
        raise typed from exc
