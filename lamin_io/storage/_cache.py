"""The local cache: one verified copy per content hash.

Layout: ``<cache dir>/<sha256>/<name>`` plus a ``.stat.json`` sidecar recording the size,
modification time and inode of every file seen right after the verified download. A copy
whose files no longer match the sidecar (missing, edited, truncated, replaced) is fetched
again.

Content stored locally is read where it lies, without a copy; its entry then holds only a
``.verified.json`` sidecar: for each stored path, the size, modification time and inode of
every file at the moment its bytes last hashed to the record's (see :func:`check_stored`).
Either way the rule is one full hash per cache entry: repeated reads cost one ``stat`` a
file, and any change of size, modification time or inode hashes the content again.

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

from lamin_io.storage._hashing import BLOCK_SIZE, hash_stream
from lamin_io.storage._progress import ProgressCallback
from lamin_io.storage._transfer import download, download_hashed

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator

    from upath import UPath

    from lamin_io.storage._hashing import Manifest

__all__ = ["cache_dir", "cached_copy", "cached_download", "check_stored"]

SIDECAR = ".stat.json"
VERIFIED = ".verified.json"
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


def _state(path: Path) -> list[int]:
    """Return what tells that a file changed without reading it: size, mtime, inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _stat_tree(path: Path) -> dict[str, Any]:
    if path.is_file():
        return {"": _state(path)}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[p.relative_to(path).as_posix()] = _state(p)
    return out


def _is_valid(local: Path) -> bool:
    sidecar = local.parent / SIDECAR
    if not local.exists() or not sidecar.exists():
        return False
    try:
        recorded = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    now = _stat_tree(local)
    if not isinstance(recorded, dict) or recorded.keys() != now.keys():
        return False
    # (sidecars written before inodes were recorded hold size and mtime only)
    return all(isinstance(state, list) and len(state) >= 2
               and now[rel][:len(state)] == state for rel, state in recorded.items())


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_stored(path: Path, *, sha256: str, manifest: Manifest | None,
                 only: Collection[str] | None = None, mute: bool = True) -> str | None:
    """Check content stored locally against its record, hashing only what was not checked.

    The rule behind ``cache()`` and ``load()`` of local storage: a file's bytes are hashed
    once for each state (size, modification time, inode) it is found in. The states whose
    bytes matched are kept in ``<cache dir>/<sha256>/.verified.json`` under the stored path,
    so reading again costs one ``stat`` a file until one of them changes. A cache directory
    that cannot be written only means the next read hashes again.

    Parameters
    ----------
    path
        The stored file or folder.
    sha256
        The record's hash (of the file, or of the folder's manifest).
    manifest
        The record's manifest of a folder; ``None`` for a file.
    only
        The folder's files to check (relative paths); default: every file it lists.
    mute
        Hide the progress bar while hashing.

    Returns
    -------
    str | None
        The relative path of the first file whose bytes differ from the record (``""`` for
        a file; a listed file that is gone counts), or ``None`` when all match.
    """
    if manifest is None:
        entries = [("", sha256)]
    else:
        entries = [(rel, digest) for rel, _, digest in manifest.entries
                   if only is None or rel in only]
    entry = cache_dir() / sha256
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_entry_lock(entry))
        except OSError:  # (a read-only cache: checked, not remembered)
            return _check(path, entries, None, mute=mute)
        return _check(path, entries, entry / VERIFIED, mute=mute)
    return None  # pragma: no cover (mypy: the stack does not swallow)


def _check(path: Path, entries: list[tuple[str, str]], sidecar: Path | None, *,
           mute: bool) -> str | None:
    """Hash the files of ``entries`` whose state ``sidecar`` does not hold as verified."""
    where = str(path)
    known = _read_json(sidecar).get(where, {}) if sidecar is not None else {}
    states: dict[str, list[int]] = {}
    todo = []
    for rel, digest in entries:
        try:
            states[rel] = _state(path / rel if rel else path)
        except FileNotFoundError:
            return rel
        if known.get(rel) != states[rel]:
            todo.append((rel, digest))
    if not todo:
        return None
    with ProgressCallback(f"verifying {path.name}", mute=mute) as cb:
        cb.set_size(sum(states[rel][0] for rel, _ in todo))
        for rel, digest in todo:
            file = path / rel if rel else path
            try:
                with file.open("rb", buffering=BLOCK_SIZE) as f:
                    found, _ = hash_stream(f, cb)
                after = _state(file)
            except FileNotFoundError:
                return rel
            if found != digest:
                return rel
            if after != states[rel]:  # changed while it was read: matched, not remembered
                del states[rel]
    if sidecar is not None:
        data = _read_json(sidecar)
        data[where] = {**(data.get(where) or {}), **states}
        tmp = sidecar.with_name(f"{VERIFIED}.{os.getpid()}-{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, sidecar)
        except OSError:
            tmp.unlink(missing_ok=True)
    return None
