"""Adding environment variables while native threads read the environment, without crashing.

Once a process has read from S3 with polars, a thread of polars' runtime reads an environment
variable every 100 ms for the rest of the process's life (its cloud reads' concurrency
control loop). glibc before 2.40 grows the environment's array of pointers with ``realloc``
when a variable is added, which may free the array that thread is walking: it then reads
freed memory and the process dies of SIGSEGV inside ``getenv`` (seen in CI: a pytest worker
lost mid-run; ``tests/test_environ.py`` reproduces it). Replacing or removing a variable
rewrites pointers in place and is safe.

The tests add variables all the time (``monkeypatch.setenv`` in the autouse fixture of
``conftest.py``, credentials, settings), so :func:`install` routes every addition made
through ``os.environ`` to :func:`_add`, which publishes a new array in one pointer store and
never frees the old one: a reader walks either array, both stay valid. The cost is a few
kilobytes leaked per addition. lamin-io itself never changes the environment; the README
tells users what this means for them.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.strdup.restype = ctypes.c_void_p
_libc.strdup.argtypes = [ctypes.c_char_p]
_libc.getenv.restype = ctypes.c_void_p
_libc.getenv.argtypes = [ctypes.c_char_p]
_environ = ctypes.c_void_p.in_dll(_libc, "environ")
_WORD = ctypes.sizeof(ctypes.c_void_p)

_putenv, _unsetenv = os.putenv, os.unsetenv
#: One change at a time: ctypes lets go of the GIL in the middle of :func:`_add`.
_lock = threading.Lock()


def _entries() -> tuple[Any, int]:
    """The C environment's array of ``NAME=value`` pointers, and how many it holds."""
    array = ctypes.cast(_environ.value, ctypes.POINTER(ctypes.c_void_p))
    if _environ.value == _published[0]:
        # our array, shortened in place by removals at most: os.environ counts the same
        # unless native code changed the environment; check the guess inside our array
        n = len(os.environ)
        if 0 < n <= _published[1] and array[n - 1] and not array[n]:
            return array, n
    n = 0
    while array[n]:
        n += 1
    return array, n


#: The last array :func:`_add` published, and how many entries it had.
_published: list[Any] = [None, 0]


def _holds(name: bytes) -> bool:
    """Whether the C environment has a variable ``name`` (the thread changing it asks)."""
    return _libc.getenv(name) is not None


def _add(name: bytes, value: bytes) -> None:
    """Add ``name=value`` by publishing a copy of the array one entry longer."""
    array, n = _entries()
    grown = _libc.malloc((n + 2) * _WORD)
    if not grown:
        raise MemoryError("no memory for the environment")
    ctypes.memmove(grown, ctypes.cast(array, ctypes.c_void_p), n * _WORD)
    slots = ctypes.cast(grown, ctypes.POINTER(ctypes.c_void_p))
    slots[n] = _libc.strdup(name + b"=" + value)
    slots[n + 1] = None
    _environ.value = grown  # one aligned store: readers see the old array or this one
    _published[:] = [grown, n + 1]


def _safe_putenv(name: Any, value: Any) -> None:
    """``os.putenv``, adding new variables through :func:`_add`."""
    key = os.fsencode(name)
    data = os.fsencode(value)
    with _lock:
        if not key or b"=" in key or b"\0" in key + data or _holds(key):
            _putenv(name, value)  # errors as os.putenv raises them; a replacement is in place
        else:
            _add(key, data)


def _safe_unsetenv(name: Any) -> None:
    """``os.unsetenv``, never in the middle of :func:`_add`."""
    with _lock:
        _unsetenv(name)


def install() -> None:
    """Route additions through ``os.environ`` to :func:`_add`, one change at a time (Linux)."""
    if os.name == "posix" and os.uname().sysname == "Linux":
        os.putenv, os.unsetenv = _safe_putenv, _safe_unsetenv
