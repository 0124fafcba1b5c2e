"""Batches in flight: start the next ones while one is processed, and never leak a read."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Pending", "pipelined"]

T = TypeVar("T")


class Pending(Generic[T]):
    """Reads a backend started.

    Called, it waits for them and finishes the work (decoding, copying out) and returns
    the result; :meth:`settle` only waits for the I/O started (``wait_io``), for a request
    that failed: nothing is decoded and no new read starts.
    """

    def __init__(self, finish: Callable[[], T],
                 wait_io: Callable[[], object] | None = None) -> None:
        self._finish, self._wait_io = finish, wait_io

    def __call__(self) -> T:
        """Wait for the reads and finish them."""
        return self._finish()

    def settle(self) -> None:
        """Wait for the I/O started, ignoring its errors (the request fails for another)."""
        if self._wait_io is not None:
            try:
                self._wait_io()
            except Exception:  # noqa: BLE001, S110
                pass


def pipelined(n: int, start: Callable[[int], Pending[T]], use: Callable[[int, T], None], *,
              ahead: int = 1, on_failure: Callable[[], object] | None = None) -> None:
    """Start batch ``b + ahead`` while batch ``b`` is waited for and used, for ``b < n``.

    ``start(b)`` returns batch ``b``'s reads started; ``use(b, result)`` processes what
    they returned. When anything fails, ``on_failure`` is called (to end a read-ahead),
    every read started and not waited for is settled (no read outlives the request: the
    file may close) and the error propagates.
    """
    ahead = max(1, ahead)
    upcoming: deque[Pending[T]] = deque()  # started, not waited for
    current: Pending[T] | None = None
    try:
        upcoming.extend(start(b) for b in range(min(ahead, n)))
        for b in range(n):
            current = upcoming.popleft()
            if b + ahead < n:
                upcoming.append(start(b + ahead))
            result = current()  # the next ones are on their way meanwhile
            current = None
            use(b, result)
            del result  # before the next batch's buffer is made
    except BaseException:
        if on_failure is not None:
            on_failure()
        for started in (current, *upcoming):
            if started is not None:
                started.settle()
        raise
