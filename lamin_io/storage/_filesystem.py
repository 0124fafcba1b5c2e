"""Filesystem instances, their reset on credential change, and storage error translation."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

from fsspec import get_filesystem_class

from lamin_io.errors import StorageObjectMissingError, StorageUnreachableError
from lamin_io.storage._options import credential_fingerprint

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["refresh_if_credentials_changed", "storage_errors"]

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


_UNREACHABLE_NAMES = frozenset({
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ReadTimeoutError",
})


def _is_unreachable(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in _UNREACHABLE_NAMES or isinstance(e, ConnectionRefusedError):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def storage_errors(where: str, endpoint: str | None = None) -> Iterator[None]:
    """Translate low-level storage failures into :mod:`lamin_io.errors` types.

    ``where`` names the path or key in the message; ``endpoint`` names the server.
    """
    try:
        yield
    except (StorageUnreachableError, StorageObjectMissingError):
        raise
    except Exception as exc:
        if _is_unreachable(exc):
            target = endpoint or "the default AWS endpoint"
            msg = (f"storage endpoint {target} did not answer while accessing {where} "
                   f"(gave up after bounded retries): check the endpoint URL, the network, "
                   f"and that the server is running")
            raise StorageUnreachableError(msg) from exc
        raise
