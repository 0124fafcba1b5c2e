"""The one place that turns user input into a :class:`upath.UPath`."""

from __future__ import annotations

import copy
import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from upath import UPath

from lamin_io.errors import InvalidArgumentError
from lamin_io.storage._filesystem import bound_retries, refresh_if_credentials_changed
from lamin_io.storage._options import S3_DEFAULTS
from lamin_io.storage._redact import protect_logs

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["PathLike", "is_local", "link_outside", "make_local_dir", "relative_key", "suffix_of",
           "to_upath"]

PathLike = str | os.PathLike[str] | UPath

#: Compression suffixes that belong to the suffix before them (``.h5ad.gz``, ``.csv.gz``).
COMPRESSION_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst", ".lz4"})


def _merge_defaults(options: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    # deep copies: botocore rewrites the retries dict it is given in place
    defaults = copy.deepcopy(dict(defaults))
    out = dict(options)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = {**v, **out[k]}
    return out


def to_upath(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> UPath:
    """Normalize a path or URL (``str``, ``Path``, ``UPath``) into an absolute ``UPath``.

    Local paths are expanded and made absolute; ``s3://`` URLs get bounded retries and
    timeouts unless ``storage_options`` override them (see :mod:`lamin_io.storage._options`),
    and s3fs adds no retries of its own to botocore's. Filesystem instances are shared per
    (protocol, options) through fsspec's instance cache, which is cleared when the ambient
    AWS credentials change.
    """
    if isinstance(path, UPath) and not storage_options:
        if path.protocol in ("", "file", "local"):
            return UPath(Path(path.path).expanduser().resolve())
        if path.protocol in ("s3", "s3a"):
            bound_retries(path.fs)
        return path
    if not isinstance(path, str | os.PathLike):
        msg = f"expected a path or URL string, got {type(path).__name__}: {path!r}"
        raise InvalidArgumentError(msg)
    s = os.fspath(path)
    if not s:
        msg = "empty path: give a local path or a URL such as s3://bucket/key"
        raise InvalidArgumentError(msg)
    if "://" not in s or s.startswith("file://"):
        local = s.removeprefix("file://")
        return UPath(Path(local).expanduser().resolve())
    protocol = s.split("://", 1)[0].lower()
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        options = _merge_defaults(options, S3_DEFAULTS)
        import s3fs  # noqa: F401 (its libraries' loggers exist once it is imported)

        protect_logs(options.get(name) for name in ("secret", "token", "password"))
    refresh_if_credentials_changed(protocol)
    upath = UPath(s.rstrip("/"), **options)
    if protocol in ("s3", "s3a"):
        bound_retries(upath.fs)
    return upath


def is_local(path: UPath) -> bool:
    """Whether ``path`` is on the local filesystem."""
    return path.protocol in ("", "file", "local")


def suffix_of(name: str) -> str:
    """Return a file name's suffix, keeping a compression suffix with the one before it.

    A compressed tar archive keeps the suffix of what it holds, as lamindb does
    (``.h5ad.tar.gz``); without one before it (or a number, ``v1.2.tar.gz``) it is ``.tar.gz``.

    >>> suffix_of("pbmc.h5ad.gz"), suffix_of("x/y.zarr"), suffix_of("table")
    ('.h5ad.gz', '.zarr', '')
    >>> suffix_of("pbmc.h5ad.tar.gz"), suffix_of("backup.tar.gz")
    ('.h5ad.tar.gz', '.tar.gz')
    """
    suffixes = PurePosixPath(name.rstrip("/")).suffixes
    if not suffixes:
        return ""
    if suffixes[-1].lower() in COMPRESSION_SUFFIXES and len(suffixes) >= 2:
        if (suffixes[-2].lower() == ".tar" and len(suffixes) >= 3
                and suffixes[-3][1:2].isalpha()):
            return "".join(suffixes[-3:])
        return "".join(suffixes[-2:])
    return suffixes[-1]


def relative_key(path: UPath, root: UPath) -> str | None:
    """Return ``path`` relative to ``root`` as a POSIX key, or ``None`` if it lies outside."""
    if path.protocol != root.protocol and not (is_local(path) and is_local(root)):
        return None
    p, r = str(path.path).rstrip("/"), str(root.path).rstrip("/")
    if p.startswith(r + "/"):
        return p[len(r) + 1 :]
    return None


def link_outside(path: str | os.PathLike[str], root: str | os.PathLike[str]
                 ) -> tuple[str, str] | None:
    """Find a symbolic link at or below a local path that leads out of ``root``.

    Checks ``path`` itself (or a folder above it, up to ``root``) and, for a folder, every
    entry below it (one ``scandir`` a folder; links that stay inside are followed, once).

    Returns
    -------
    tuple[str, str] | None
        ``(the link, where it leads)`` for the first one found, ``None`` when nothing leads
        out.
    """
    base = os.path.realpath(root)

    def outside(p: str) -> bool:
        real = os.path.realpath(p)
        return real != base and not real.startswith(base.rstrip(os.sep) + os.sep)

    start = os.fspath(path)
    if outside(start):
        return start, os.path.realpath(start)
    if not os.path.isdir(start):
        return None
    seen = {os.path.realpath(start)}
    todo = [start]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_symlink() and outside(entry.path):
                    return entry.path, os.path.realpath(entry.path)
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real not in seen:
                        seen.add(real)
                        todo.append(entry.path)
    return None


def make_local_dir(path: Path, what: str) -> None:
    """Create a local directory and its parents, naming a regular file that stands in the way.

    Parameters
    ----------
    path
        The directory to create (nothing happens if it exists).
    what
        What it is for, for the message (``"storage root /data/x"``).

    Raises
    ------
    InvalidArgumentError
        ``path`` or one of its parents is a regular file.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()),
                       None)
        if blocker is None:  # pragma: no cover (a race with another process)
            raise
        msg = (f"{what}: {blocker} is a regular file, not a directory; choose a path whose "
               f"folders are directories (or move {blocker} away)")
        raise InvalidArgumentError(msg) from exc
