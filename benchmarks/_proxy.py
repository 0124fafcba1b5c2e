"""A counting HTTP/1.1 proxy on loopback, in front of an S3-protocol server.

Benchmarks point their S3 clients at the proxy to learn how many requests a tool made and
how many response bytes it received, whatever server stores the objects; ``delay``
adds a fixed latency to every request (a far-away bucket, on loopback). It speaks just
enough HTTP/1.1 for S3 clients: keep-alive, ``Content-Length`` and chunked bodies, and
``HEAD`` responses without a body.

    with CountingProxy("127.0.0.1", 4599, delay=0.02) as proxy:
        ...  # endpoint_url=proxy.endpoint
        proxy.requests, proxy.bytes_sent
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

__all__ = ["CountingProxy"]


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)
            if k}


async def _copy_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     headers: dict[str, str]) -> int:
    """Forward one message body; return its size."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            writer.write(line)
            size = int(line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            writer.write(data)
            total += size
            if size == 0:
                return total
    remaining = int(headers.get("content-length", "0"))
    total = remaining
    while remaining:
        data = await reader.read(min(remaining, 1 << 20))
        if not data:
            raise ConnectionError("upstream closed mid-body")
        writer.write(data)
        remaining -= len(data)
        await writer.drain()
    return total


class CountingProxy:
    """Forward ``127.0.0.1:<port>`` to ``host:port``, counting requests and body bytes."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        self.upstream = (host, port)
        self.delay = delay
        self.requests = 0
        self.bytes_sent = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the proxy."""
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def reset(self) -> None:
        """Zero the counters."""
        self.requests = 0
        self.bytes_sent = 0

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.upstream)
        try:
            while True:
                try:
                    head = await _read_head(client_r)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method = head.split(b" ", 1)[0].upper()
                if self.delay:
                    await asyncio.sleep(self.delay)
                up_w.write(head)
                await _copy_body(client_r, up_w, _headers(head))
                await up_w.drain()
                reply = await _read_head(up_r)
                client_w.write(reply)
                status = int(reply.split(b" ", 2)[1])
                sent = 0
                if method != b"HEAD" and status not in (204, 304):
                    sent = await _copy_body(up_r, client_w, _headers(reply))
                await client_w.drain()
                self.requests += 1
                self.bytes_sent += sent
        finally:
            for w in (up_w, client_w):
                with contextlib.suppress(Exception):
                    w.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20))
        self._ready.set()
        loop.run_forever()

    def start(self) -> CountingProxy:
        """Start serving in a daemon thread."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop serving and close every connection."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
