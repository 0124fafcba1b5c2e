"""Filesystem instances and clients, their reset, and storage error translation.

:func:`reset_clients` is the one place that forgets every filesystem and client this
process keeps (fsspec's instance caches, pyarrow's S3 clients, botocore clients and
sessions): :func:`lamin_io.connect` and :func:`lamin_io.disconnect` call it, so switching
credentials or registries never reuses a client made for the previous ones.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from fsspec import get_filesystem_class

from lamin_io.errors import (
    BucketNotFoundError,
    CredentialsError,
    PathNotFoundError,
    StorageObjectMissingError,
    StoragePermissionError,
    StorageServiceError,
    StorageUnreachableError,
)
from lamin_io.storage._options import credential_fingerprint

if TYPE_CHECKING:
    from collections.abc import Iterator

    from upath import UPath

__all__ = [
    "credentials_error",
    "error_codes",
    "missing_path",
    "refresh_if_credentials_changed",
    "reset_clients",
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


_UNREACHABLE_NAMES = frozenset({
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ReadTimeoutError",
})

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
    return any(type(e).__name__ in _UNREACHABLE_NAMES or isinstance(e, ConnectionRefusedError)
               for e in _chain(exc))


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


@contextlib.contextmanager
def storage_errors(where: str, endpoint: str | None = None) -> Iterator[None]:
    """Translate low-level storage failures into :mod:`lamin_io.errors` types.

    ``where`` names the path or key in the message; ``endpoint`` names the server.
    Unreachable endpoints become :class:`StorageUnreachableError`, botocore's missing
    credentials :class:`CredentialsError`, S3's ``NoSuchBucket``
    :class:`BucketNotFoundError`, a refused request (``403``: a wrong key, or one without
    the permission) :class:`StoragePermissionError`; each message says what to do.
    """
    try:
        yield
    except (StorageUnreachableError, StorageObjectMissingError, BucketNotFoundError,
            CredentialsError, StoragePermissionError):
        raise
    except Exception as exc:
        if _is_unreachable(exc):
            target = endpoint or "the default AWS endpoint"
            msg = (f"storage endpoint {target} did not answer while accessing {where} "
                   f"(gave up after bounded retries): check the endpoint URL, the network, "
                   f"and that the server is running")
            raise StorageUnreachableError(msg) from exc
        botocore = next((e for e in _chain(exc) if type(e).__name__ in _NO_CREDENTIALS_NAMES),
                        None)
        if botocore is not None:
            raise credentials_error(where, endpoint, str(botocore)) from exc
        codes = set(error_codes(exc))
        if "NoSuchBucket" in codes:
            raise bucket_error(_bucket_of(where) or where, where, endpoint) from exc
        if codes & _DENIED_CODES or "AWS Error ACCESS_DENIED" in str(exc):  # (pyarrow's)
            raise permission_error(where, endpoint, codes & _DENIED_CODES) from exc
        failed = sorted(c for c in codes if c in _SERVICE_CODES or (c.isdigit() and c >= "500"))
        if failed:
            msg = (f"{_endpoint_text(endpoint)} kept failing while accessing {where} "
                   f"(S3 error {', '.join(failed)}, after bounded retries): the storage "
                   f"service is in trouble; retry later")
            raise StorageServiceError(msg) from exc
        raise
