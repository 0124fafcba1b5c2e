"""Test helpers: a real S3-protocol server on loopback that counts what it serves.

Used by lamin-io's own tests and benchmarks, and usable in yours::

    with S3Server() as server:
        ln.connect("r.db", f"s3://{server.bucket}/data", endpoint_url=server.endpoint)
        server.reset()
        ...  # read something
        print(server.stats.requests, server.stats.bytes_sent)

Needs ``moto[server]`` (in the ``test`` extra).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["S3Server", "S3Stats"]


@dataclass
class S3Stats:
    """Requests and response-body bytes served since the last reset."""

    requests: int = 0
    bytes_sent: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    log: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    #: Seconds each GET waits before it is answered (a slower network); kept across resets.
    get_delay: float = 0.0
    #: GETs are held until this many of them are in flight at once (0: never held), for
    #: tests that must see requests overlap: whether they do then depends on what the client
    #: asked for, not on how busy the machine is. The first time the count is reached, or
    #: after :attr:`hold_seconds` without it, the gate opens for every request until the next
    #: reset, so a client that never overlaps waits once. Kept across resets.
    hold_gets: int = 0
    #: Only GETs whose path holds one of these are held and counted (every GET where empty).
    hold_paths: tuple[str, ...] = ()
    hold_seconds: float = 30.0
    #: The GETs :attr:`hold_gets` counts that are in flight now.
    held: int = 0
    #: Whether the gate has opened since the last reset, and whether it opened because
    #: :attr:`hold_gets` GETs were in flight at once (not because the time ran out).
    gate_open: bool = False
    gate_reached: bool = False

    #: The access key id each request was signed with (``None``: unsigned), in order.
    access_keys: list[str | None] = field(default_factory=list)

    def gets(self) -> list[tuple[str, str, str | None, int]]:
        """Return the logged GET requests as ``(method, path, range, bytes)``."""
        return [entry for entry in self.log if entry[0] == "GET"]


def _access_key(environ: dict[str, Any]) -> str | None:
    """Return the access key id a request was signed with (SigV4 header or presigned URL)."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    query = environ.get("QUERY_STRING", "")
    for text, marker in ((auth, "Credential="), (query, "X-Amz-Credential=")):
        if marker in text:
            return text.split(marker, 1)[1].split("/", 1)[0].split("%2F", 1)[0]
    return None


class _Counting:
    """WSGI middleware counting requests and the bytes of every response body."""

    def __init__(self, app: Callable[..., Iterable[bytes]], stats: S3Stats,
                 lock: threading.Lock) -> None:
        self.app, self.stats, self.lock = app, stats, lock
        self.changed = threading.Condition(lock)

    def _hold(self) -> None:
        """Wait (lock held) until ``hold_gets`` GETs are in flight or the gate opens."""
        stats = self.stats
        if not stats.hold_gets or stats.gate_open:
            return
        self.changed.wait_for(lambda: stats.gate_open or stats.held >= stats.hold_gets,
                              timeout=stats.hold_seconds)
        if stats.held >= stats.hold_gets:
            stats.gate_reached = True
        stats.gate_open = True
        self.changed.notify_all()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        held = environ["REQUEST_METHOD"] == "GET" and (
            not self.stats.hold_paths or any(p in path for p in self.stats.hold_paths))
        with self.changed:
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
            if held:
                self.stats.held += 1
                self.changed.notify_all()
                self._hold()
        try:
            if self.stats.get_delay and environ["REQUEST_METHOD"] == "GET":
                time.sleep(self.stats.get_delay)
            body = self.app(environ, start_response)
            chunks = list(body)
            if hasattr(body, "close"):
                body.close()
        finally:
            with self.lock:
                self.stats.in_flight -= 1
                if held:
                    self.stats.held -= 1
        n = sum(len(c) for c in chunks)
        with self.lock:
            self.stats.requests += 1
            self.stats.bytes_sent += n
            self.stats.log.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                   environ.get("HTTP_RANGE"), n))
            self.stats.access_keys.append(_access_key(environ))
        return chunks


class S3Server:
    """moto's S3 server on ``127.0.0.1`` at a free port, with one bucket, counting traffic.

    Parameters
    ----------
    bucket
        Bucket created at start.
    """

    def __init__(self, bucket: str = "lamin-io-test") -> None:
        self.bucket = bucket
        self.stats = S3Stats()
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3Server:
        """Start serving in a daemon thread and create the bucket."""
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"),
                            ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(name, value)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        app = _Counting(DomainDispatcherApplication(create_backend_app), self.stats, self._lock)
        self._server = make_server("127.0.0.1", port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(
            Bucket=self.bucket)
        self.reset()
        return self

    def reset(self) -> None:
        """Zero the counters."""
        with self._lock:
            self.stats.requests = 0
            self.stats.bytes_sent = 0
            self.stats.max_in_flight = self.stats.in_flight
            self.stats.gate_open = self.stats.gate_reached = False
            self.stats.log.clear()
            self.stats.access_keys.clear()

    def unanswered(self, timeout: float = 10.0) -> str | None:
        """Return why the server does not answer a request within ``timeout`` s, else ``None``.

        The answer names the serving thread's stack: the server runs in the caller's
        process, so whatever blocks that thread (a finalizer that the garbage collector ran
        there, calling this same server, say) shows up in it.
        """
        import http.client
        import sys
        import traceback

        host, port = self._server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("HEAD", f"/{self.bucket}")
            conn.getresponse().read()
        except OSError as exc:
            ident = self._thread.ident if self._thread else None
            frame = sys._current_frames().get(ident) if ident is not None else None
            stack = "".join(traceback.format_stack(frame)) if frame else "(not running)"
            return (f"the S3 test server did not answer in {timeout:g} s ({exc!r}); "
                    f"its serving thread is at:\n{stack}")
        finally:
            conn.close()
        return None

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
