"""Adding environment variables while native threads read the environment, without crashing.

Once a process has read from S3 with polars, a thread of polars' runtime reads an environment
variable every 100 ms for the rest of the process's life (its cloud reads' concurrency
control loop). glibc before 2.41 grows the environment's array of pointers with ``realloc``
when a variable is added, which may free the array that thread is walking: it then reads
freed memory and the process dies of SIGSEGV inside ``getenv`` (seen in CI: a pytest worker
lost mid-run; ``tests/test_environ.py`` reproduces it). Replacing or removing a variable
rewrites pointers in place and is safe.

The tests add variables all the time (``monkeypatch.setenv`` in the autouse fixture of
``conftest.py``, credentials, settings), so :func:`install` routes every addition made
through ``os.environ`` to :func:`_add`, as glibc 2.41 does it: the array has spare slots
(all NULL), an addition fills the first one in one pointer store, and a full array is
copied into one twice as large, published in one pointer store, the old one never freed. A
reader walks either array, both stay valid. Changes through ``os.environ`` are made one at
a time; native code that calls ``setenv`` itself is not covered. lamin-io itself never
changes the environment; the README tells users what this means for them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

#: glibc (through ctypes) and its ``environ``; set by :func:`install` on Linux.
_libc: Any = None
_environ: Any = None
_WORD = ctypes.sizeof(ctypes.c_void_p)

_putenv, _unsetenv = os.putenv, os.unsetenv
#: One change at a time: ctypes lets go of the GIL in the middle of :func:`_add`.
_lock = threading.Lock()

#: The last array :func:`_add` allocated, and how many slots it has.
_published: list[Any] = [None, 0]
#: The ``NAME=value`` strings made so far, reused as glibc reuses its own (never freed: a
#: reader may hold one).
_strings: dict[bytes, int] = {}


def _entries() -> tuple[Any, int]:
    """Return the C environment's array of ``NAME=value`` pointers and how many it holds."""
    if not _environ.value:  # (after a native clearenv())
        return None, 0
    array = ctypes.cast(_environ.value, ctypes.POINTER(ctypes.c_void_p))
    if _environ.value == _published[0]:
        # our array, every slot inside it readable: os.environ counts the same unless
        # native code changed the environment; check the guess
        n = len(os.environ)
        if 0 < n < _published[1] and array[n - 1] and not array[n]:
            return array, n
    n = 0
    while array[n]:
        n += 1
    return array, n


def _holds(name: bytes) -> bool:
    """Whether the C environment has a variable ``name`` (the thread changing it asks)."""
    return _libc.getenv(name) is not None


def _add(name: bytes, value: bytes) -> None:
    """Add ``name=value``: into a spare slot of our array, else into a copy twice as large."""
    array, n = _entries()
    text = name + b"=" + value
    entry = _strings.get(text) or _libc.strdup(text)
    if not entry:
        raise MemoryError("no memory for the environment")
    _strings[text] = entry
    if _environ.value and _environ.value == _published[0] and n + 2 <= _published[1]:
        array[n] = entry  # slot n + 1 is NULL already: readers see the end, or this entry
        return
    size = max(2 * (n + 2), 64)
    grown = _libc.calloc(size, _WORD)
    if not grown:
        raise MemoryError("no memory for the environment")
    if n:
        ctypes.memmove(grown, ctypes.cast(array, ctypes.c_void_p), n * _WORD)
    ctypes.cast(grown, ctypes.POINTER(ctypes.c_void_p))[n] = entry
    _environ.value = grown  # one aligned store: readers see the old array or this one
    _published[:] = [grown, size]


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


def _new_lock() -> None:
    """A forked child gets a free lock (another thread of the parent may have held it)."""
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()


def install() -> None:
    """Route changes through ``os.environ`` to the functions above (Linux; else nothing)."""
    global _libc, _environ  # noqa: PLW0603
    if not sys.platform.startswith("linux") or os.putenv is _safe_putenv:
        return
    _libc = ctypes.CDLL(None)
    _libc.calloc.restype = ctypes.c_void_p
    _libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    _libc.strdup.restype = ctypes.c_void_p
    _libc.strdup.argtypes = [ctypes.c_char_p]
    _libc.getenv.restype = ctypes.c_void_p
    _libc.getenv.argtypes = [ctypes.c_char_p]
    _environ = ctypes.c_void_p.in_dll(_libc, "environ")
    os.register_at_fork(after_in_child=_new_lock)
    os.putenv, os.unsetenv = _safe_putenv, _safe_unsetenv
