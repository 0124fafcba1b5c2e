"""The local cache: one verified copy per content hash.

Layout: ``<cache dir>/<sha256>/<name>`` plus a ``.stat.json`` sidecar recording the size and
modification times seen right after the verified download. A copy whose files no longer
match the sidecar (missing, edited, truncated) is fetched again.

One entry is filled by one caller at a time: threads of a process and processes sharing
the cache wait for the first download of the same content (a lock per entry: a thread
lock, and ``flock`` on ``<sha256>/.lock`` where the platform has it) instead of
downloading it again and swapping it under a reader's feet.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_io.storage._transfer import download, download_hashed

if TYPE_CHECKING:
    from collections.abc import Iterator

    from upath import UPath

    from lamin_io.storage._hashing import Manifest

__all__ = ["cache_dir", "cached_copy", "cached_download"]

SIDECAR = ".stat.json"
LOCK = ".lock"

_locks_guard = threading.Lock()
_locks: dict[Path, threading.Lock] = {}


@contextlib.contextmanager
def _entry_lock(entry: Path) -> Iterator[None]:
    """Hold the lock of one cache entry (a ``<sha256>`` folder) in this process and others."""
    entry.mkdir(parents=True, exist_ok=True)
    with _locks_guard:
        lock = _locks.setdefault(entry, threading.Lock())
    with lock, open(entry / LOCK, "a") as handle:  # noqa: PTH123
        try:
            import fcntl
        except ImportError:  # (no flock: threads of this process are still serialized)
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_dir() -> Path:
    """Return the cache directory: ``$LAMIN_IO_CACHE_DIR`` or the platform's user cache."""
    env = os.environ.get("LAMIN_IO_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lamin-io"))


def _stat_tree(path: Path) -> dict[str, Any]:
    if path.is_file():
        st = path.stat()
        return {"": [st.st_size, st.st_mtime_ns]}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(path).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _is_valid(local: Path) -> bool:
    sidecar = local.parent / SIDECAR
    if not local.exists() or not sidecar.exists():
        return False
    try:
        recorded = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded == _stat_tree(local))


def cached_copy(src: UPath, *, sha256: str, name: str, manifest: Manifest | None,
                what: str, mute: bool = False,
                versions: str | dict[str, str] | None = None) -> Path:
    """Return a verified local copy of ``src``, downloading it only when needed.

    ``versions``: the S3 ETags recorded for the object (or a folder's files, by relative
    path); the download's requests are pinned to them (see :func:`download`).
    """
    local = cache_dir() / sha256 / name
    if _is_valid(local):
        return local
    with _entry_lock(local.parent):
        if _is_valid(local):  # (another thread or process fetched it meanwhile)
            return local
        download(src, local, sha256=None if manifest else sha256, manifest=manifest,
                 what=what, mute=mute, versions=versions)
        _remember(local)
    return local


def cached_download(src: UPath, *, name: str, what: str, mute: bool = False) -> Path:
    """Download ``src``, whose hash no record holds, into the cache; return the copy.

    Hashed while it downloads (one read of ``src``), then kept under that hash, where
    :func:`cached_copy` finds it once the same content is registered. Where a valid copy
    of that content is cached already, it is kept and the new download dropped.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    try:
        digest, _ = download_hashed(src, staging / name, what=what, mute=mute)
        local = root / digest / name
        with _entry_lock(local.parent):
            if not _is_valid(local):
                if local.is_dir():
                    shutil.rmtree(local)
                os.replace(staging / name, local)
                _remember(local)
        return local
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remember(local: Path) -> None:
    """Record the state of a verified copy in its sidecar (see :func:`_is_valid`)."""
    (local.parent / SIDECAR).write_text(json.dumps(_stat_tree(local)))
