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

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = ["FaultProxy", "ProxyRequest", "ProxyStats", "S3Server", "S3Stats", "s3_error_body"]


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


# -- a fault-injecting proxy --------------------------------------------------------------------

#: Headers that belong to one connection, never forwarded (RFC 9110, 7.6.1), and ``Expect``
#: (the proxy answers ``100-continue`` itself).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "expect",
                         "proxy-connection"})

#: What each S3 error code is sent with, when a fault names only the code.
_S3_ERRORS = {
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
    "SlowDown": (503, "Please reduce your request rate."),
    "AccessDenied": (403, "Access Denied"),
}


def s3_error_body(code: str, message: str, resource: str = "") -> bytes:
    """Return S3's XML error document for ``code`` (what a real endpoint sends with a 4xx/5xx)."""
    from xml.sax.saxutils import escape

    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message><Resource>{escape(resource)}</Resource>"
            f"<RequestId>lamin-io-fault-proxy</RequestId></Error>").encode()


@dataclass(frozen=True)
class ProxyRequest:
    """A request the proxy read: what a fault's ``when`` is asked about."""

    method: str
    path: str
    #: The request's headers, by lower-case name (``user-agent`` tells the clients apart).
    headers: Mapping[str, str]

    @property
    def user_agent(self) -> str:
        """The ``User-Agent`` header, ``""`` without one."""
        return self.headers.get("user-agent", "")

    @property
    def range(self) -> str:
        """The ``Range`` header, ``""`` without one (tells a request's retries apart)."""
        return self.headers.get("range", "")


@dataclass
class Fault:
    """One fault the proxy injects (see :class:`FaultProxy`'s methods that make them).

    ``kind``: ``"status"`` (answer ``status`` with S3's error document for ``code``),
    ``"reset"`` (read the request, then reset the connection: a TCP RST, no answer),
    ``"cut"`` (forward the request, send the answer's headers and half its body, then reset),
    ``"hang"`` (read the request, never answer). ``remaining``: how many more requests get
    it (``None``: every one until the fault is cleared). ``when``: which requests (a
    :class:`ProxyRequest` in, ``True`` out; ``None``: all).
    """

    kind: str
    remaining: int | None = None
    status: int = 503
    code: str = "SlowDown"
    when: Callable[[ProxyRequest], bool] | None = None


@dataclass
class ProxyStats:
    """What the proxy saw since its last reset."""

    #: Requests read (answered, failed or held).
    requests: int = 0
    #: Requests that got a fault (an error answer, a reset, a cut, no answer).
    faults: int = 0
    #: Connections accepted.
    connections: int = 0
    #: ``(method, path, outcome, range)`` of each request: ``"forwarded"``, or the fault's
    #: kind (``"status 503"``, ``"reset"``, ``"cut"``, ``"hang"``, ``"denied"``), and its
    #: ``Range`` header (``""``: none).
    log: list[tuple[str, str, str, str]] = field(default_factory=list)

    def count(self, outcome: str | None = None, method: str | None = None) -> int:
        """Return how many logged requests had ``outcome`` (and ``method``), ``None``: any."""
        return sum(1 for m, _, o, _ in self.log
                   if (outcome is None or o == outcome) and (method is None or m == method))


class FaultProxy:
    """An HTTP proxy on ``127.0.0.1`` in front of an S3 endpoint, injecting network faults.

    Point a client at :attr:`endpoint` instead of the server's; requests pass through
    unchanged until a fault is set, from the test, while the client runs:

    - :meth:`fail` answers the next ``n`` requests (or every one) with an S3 error (``500
      InternalError``, ``503 SlowDown``, ...);
    - :meth:`reset` resets the connection after reading the request (a TCP RST, no
      answer); :meth:`cut` resets it halfway through the answer's body;
    - :meth:`black_hole` reads requests and never answers them; with ``connections=True``
      it also stops accepting connections (their SYNs are dropped: connects time out);
    - :meth:`deny_unsigned` answers ``403 AccessDenied`` to requests without a signature
      (no ``Authorization`` header, no ``X-Amz-Signature`` parameter), as a bucket that
      only lets anonymous users read does;
    - :meth:`clear` goes back to passing everything through.

    Each fault takes ``when=lambda request: ...`` to pick the requests it hits (a
    :class:`ProxyRequest`: method, path, headers).
    :attr:`stats` counts what the proxy saw, so a test can assert that retries happened.
    Standard library only: requests are read with :mod:`http.server`'s parser and sent on
    with :mod:`http.client`, one upstream connection per client connection.

    Parameters
    ----------
    upstream
        The server's endpoint, ``http://host:port``.

    Examples
    --------
    >>> with S3Server() as server, FaultProxy(server.endpoint) as proxy:  # doctest: +SKIP
    ...     proxy.fail(3, status=503, code="SlowDown")   # then pass through again
    ...     ln.open(url, storage_options={"endpoint_url": proxy.endpoint})
    ...     assert proxy.stats.faults == 3
    """

    def __init__(self, upstream: str) -> None:
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        self.upstream = (host, int(port))
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        self._deny: Callable[[ProxyRequest], bool] | None = None
        self._released = threading.Event()
        self._dropping = False
        self._fillers: list[socket.socket] = []
        self._sock: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._stopping = False

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: the endpoint to give clients."""
        assert self._sock is not None  # noqa: S101 (started)
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    # -- faults -------------------------------------------------------------------------------

    def fail(self, n: int | None = None, *, status: int | None = None,
             code: str = "SlowDown",
             when: Callable[[ProxyRequest], bool] | None = None) -> None:
        """Answer the next ``n`` requests (``None``: every one) with S3 error ``code``.

        ``status`` defaults to the code's (``InternalError``: 500, ``SlowDown`` and
        ``ServiceUnavailable``: 503).
        """
        self._set(Fault("status", n, status or _S3_ERRORS.get(code, (503, ""))[0], code,
                        when))

    def reset(self, n: int | None = None, *,
              when: Callable[[ProxyRequest], bool] | None = None) -> None:
        """Reset the connection of the next ``n`` requests (``None``: every one), unanswered."""
        self._set(Fault("reset", n, when=when))

    def cut(self, n: int | None = None, *,
            when: Callable[[ProxyRequest], bool] | None = None) -> None:
        """Reset the next ``n`` requests' connections halfway through their answers' bodies.

        An answer without a body (``HEAD``) is reset before it is sent.
        """
        self._set(Fault("cut", n, when=when))

    def black_hole(self, *, connections: bool = False,
                   when: Callable[[ProxyRequest], bool] | None = None) -> None:
        """Read requests and never answer them, until :meth:`clear`.

        ``connections=True``: also stop accepting connections, so that connecting times out
        (the listening socket's queue is kept full: the kernel drops new SYNs).
        """
        self._set(Fault("hang", None, when=when))
        if connections:
            self._drop_connections()

    def deny_unsigned(self, *, when: Callable[[ProxyRequest], bool] | None = None) -> None:
        """Answer ``403 AccessDenied`` to unsigned requests (those ``when`` picks: all).

        Kept until :meth:`clear`, beside any other fault.
        """
        with self._lock:
            self._deny = when or (lambda request: True)

    def clear(self) -> None:
        """Pass every request through again; connections held by a black hole are closed."""
        with self._lock:
            self._fault = None
            self._deny = None
            self._released.set()
            self._released = threading.Event()
        self._accept_connections()

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._lock:
            self.stats = ProxyStats()

    def _set(self, fault: Fault) -> None:
        with self._lock:
            self._fault = fault

    def _take(self, request: ProxyRequest) -> tuple[str, Fault | None]:
        """Count a request; return the fault it gets (``None``: none)."""
        method, path = request.method, request.path
        with self._lock:
            self.stats.requests += 1
            fault = self._fault
            if fault is not None and (fault.when is None or fault.when(request)) and (
                    fault.remaining is None or fault.remaining > 0):
                if fault.remaining is not None:
                    fault.remaining -= 1
                self.stats.faults += 1
                outcome = (f"status {fault.status}" if fault.kind == "status" else fault.kind)
                self.stats.log.append((method, path, outcome, request.range))
                return outcome, fault
            return "", None

    def _denied(self, request: ProxyRequest) -> bool:
        method, path = request.method, request.path
        with self._lock:
            deny = self._deny
        if deny is None or not deny(request):
            return False
        signed = "authorization" in request.headers or "x-amz-signature=" in path.lower()
        if signed:
            return False
        with self._lock:
            self.stats.faults += 1
            self.stats.log.append((method, path, "denied", request.range))
        return True

    def _log(self, request: ProxyRequest, outcome: str) -> None:
        with self._lock:
            self.stats.log.append((request.method, request.path, outcome, request.range))

    # -- connections --------------------------------------------------------------------------

    def _drop_connections(self) -> None:
        """Keep the listening socket's accept queue full, so that the kernel drops SYNs."""
        assert self._sock is not None  # noqa: S101
        with self._lock:
            if self._dropping:
                return
            self._dropping = True
        self._sock.listen(0)  # (Linux: a listening socket's backlog can be changed)
        address = self._sock.getsockname()
        for _ in range(2):  # one fills a queue of backlog 0; the second makes sure
            filler = socket.socket()
            filler.setblocking(False)  # noqa: FBT003
            with contextlib.suppress(BlockingIOError):
                filler.connect(address)
            self._fillers.append(filler)
        time.sleep(0.05)

    def _accept_connections(self) -> None:
        with self._lock:
            if not self._dropping:
                return
            self._dropping = False
            fillers, self._fillers = self._fillers, []
        if self._sock is not None:
            self._sock.listen(128)
        for filler in fillers:
            filler.close()

    def start(self) -> FaultProxy:
        """Listen on a free port of ``127.0.0.1`` and serve in daemon threads."""
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True,
                                           name="lamin-io-fault-proxy")
        self._accepting.start()
        return self

    def _accept_loop(self) -> None:
        import select

        sock = self._sock
        assert sock is not None  # noqa: S101
        while not self._stopping:
            if self._dropping:
                time.sleep(0.02)
                continue
            try:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if not ready or self._dropping:
                    continue
                conn, address = sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            with self._lock:
                self.stats.connections += 1
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn, address), daemon=True).start()

    def _serve(self, conn: socket.socket, address: Any) -> None:
        try:
            _ProxyHandler(conn, address, self)  # type: ignore[arg-type]
        except OSError:
            pass  # the client went away, or the connection was reset on purpose
        finally:
            with self._lock:
                self._open.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def stop(self) -> None:
        """Stop serving; close every connection."""
        self._stopping = True
        self._accept_connections()
        with self._lock:
            self._released.set()
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._sock is not None:
            self._sock.close()
        if self._accepting is not None:
            self._accepting.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reset(conn: socket.socket) -> None:
    """Close ``conn`` with a TCP RST (``SO_LINGER`` of 0), as a failing network does."""
    import struct

    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    """One client connection of a :class:`FaultProxy` (HTTP/1.1, kept alive)."""

    protocol_version = "HTTP/1.1"
    server: FaultProxy  # type: ignore[assignment]
    _upstream: Any = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # no line per request

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # (trailers)
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes,
                *, head: bool) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.wfile.flush()

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        import http.client

        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):  # a kept-alive upstream connection may have been closed
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.server.upstream,
                                                            timeout=120)
            try:
                self._upstream.request(self.command, self.path, body=body or None,
                                       headers=headers)
                response = self._upstream.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        out = [(k, v) for k, v in response.getheaders()
               if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        out.append(("Content-Length", length if length is not None else str(len(data))))
        return response.status, out, data

    def _handle(self) -> None:
        method, path, proxy = self.command, self.path, self.server
        body = self._body()
        request = ProxyRequest(method, path, {k.lower(): v for k, v in self.headers.items()})
        if proxy._denied(request):  # noqa: SLF001
            error = s3_error_body("AccessDenied", "Access Denied", path)
            self._answer(403, [("Content-Type", "application/xml"),
                               ("Content-Length", str(len(error)))], error,
                         head=method == "HEAD")
            return
        released = proxy._released  # noqa: SLF001
        outcome, fault = proxy._take(request)  # noqa: SLF001
        if fault is None:
            status, headers, data = self._forward(body)
            proxy._log(request, "forwarded")  # noqa: SLF001
            self._answer(status, headers, data, head=method == "HEAD")
            return
        if fault.kind == "status":
            error = s3_error_body(fault.code, _S3_ERRORS.get(fault.code, (0, fault.code))[1],
                                  path)
            self._answer(fault.status, [("Content-Type", "application/xml"),
                                        ("Content-Length", str(len(error)))], error,
                         head=method == "HEAD")
            return
        if fault.kind == "hang":
            while not released.wait(0.2) and not proxy._stopping:  # noqa: SLF001
                pass
            self.close_connection = True
            _reset(self.connection)
            return
        if fault.kind == "cut" and method != "HEAD":
            status, headers, data = self._forward(body)
            if len(data) >= 2:
                self.send_response_only(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
        self.close_connection = True
        _reset(self.connection)

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()
