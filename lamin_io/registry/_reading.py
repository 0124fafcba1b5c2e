"""Reading an artifact's content: check it against the record, cache, load, open lazily.

:class:`ArtifactReads` is the reading half of :class:`~lamin_io.Artifact` (which adds
saving, versions and deletion). A saved artifact's reads check the stored object against
its record first; before ``save()`` they read the file or folder the artifact was made from,
and write nothing to the registry or to storage.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from lamin_io.errors import (
    CorruptArtifactError,
    InvalidArgumentError,
    LaminIOError,
    StorageModifiedError,
    StorageObjectMissingError,
    WriteNotSupportedError,
)
from lamin_io.registry._keys import check_storage_key
from lamin_io.registry._run import record_input
from lamin_io.storage import (
    Manifest,
    cached_copy,
    cached_download,
    check_stored,
    fingerprint,
    folder_states,
    is_local,
    link_outside,
    missing_path,
    storage_errors,
    to_upath,
)

if TYPE_CHECKING:
    from sqlalchemy import Row
    from upath import UPath

    from lamin_io.accessors import Format
    from lamin_io.registry._connection import Connection

__all__ = ["LOAD_WARN_BYTES", "ArtifactReads", "format_size", "manifest_of", "stored_path"]


def format_size(n: int) -> str:
    """Return a byte count for humans (``"1.5 MB"``)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


#: Files a desktop adds to folders it shows, which no reader reads: a registered folder may
#: gain them without counting as modified.
_DESKTOP_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

#: Default of ``LAMIN_IO_LOAD_WARN_BYTES``: ``load()`` warns above this size.
LOAD_WARN_BYTES = 10_000_000_000


def _warn_if_large(what: str, size: int) -> None:
    """Warn (``UserWarning``) before loading ``size`` bytes above the configured limit."""
    raw = os.environ.get("LAMIN_IO_LOAD_WARN_BYTES", "").strip()
    try:
        limit = int(float(raw)) if raw else LOAD_WARN_BYTES
    except ValueError:
        msg = f"LAMIN_IO_LOAD_WARN_BYTES must be a number of bytes (0: never warn), got {raw!r}"
        raise InvalidArgumentError(msg) from None
    if 0 < limit < size:
        warnings.warn(
            f"loading {what} into memory: {format_size(size)}, above "
            f"{format_size(limit)} (LAMIN_IO_LOAD_WARN_BYTES); open() reads it lazily",
            UserWarning, stacklevel=3)


class ArtifactReads:
    """What reads an artifact's content; see :class:`~lamin_io.Artifact`."""

    _row: Row[Any] | None
    _source: UPath

    if TYPE_CHECKING:  # provided by Artifact and Record
        def _saved(self) -> Row[Any]: ...
        def _conn(self) -> Connection: ...
        def _what(self) -> str: ...
        def _open_writable_copy(self, fmt: Format, mode: str, **kwargs: Any) -> Any: ...
        @property
        def suffix(self) -> str: ...
        @property
        def size(self) -> int: ...
        @property
        def n_files(self) -> int | None: ...
        @property
        def manifest(self) -> Manifest | None: ...

    def verify(self) -> UPath:
        """Check that the stored object still matches the record; return its path.

        Cheap: no content is read while the object's state matches the record's (on S3
        the ETag, of each file for a folder; locally size, modification time and inode,
        the hash only once those moved). :meth:`cache` and :meth:`load` hash the content
        too, once per state (see "The record is the truth" in the README).

        Raises
        ------
        StorageObjectMissingError
            The stored object is gone.
        StorageModifiedError
            It was changed behind the registry's back (a folder: a file rewritten, or one
            added that its manifest does not list).
        CorruptArtifactError
            A folder lacks a file its manifest lists (never read as fill values), or the
            stored object (or a file below it) is a symbolic link leading out of the
            storage root (nothing outside the root is read).
        """
        conn = self._conn()
        row = self._saved()
        path = stored_path(conn, row)
        settings = conn.settings_for(row.storage_id)
        with storage_errors(str(path), settings.endpoint_url):
            if is_local(path):  # before any byte is read through the link
                self._refuse_links_out(to_upath(settings.root).path, row.storage_key)
            if row.manifest is not None:
                self._verify_folder(path)
            else:
                self._verify_file(path)
        return path

    def _versions(self) -> str | dict[str, str] | None:
        """Return the S3 versions recorded at save, for readers to pin their requests to.

        A file's ETag, or a folder's files' ETags by relative path; ``None`` where none were
        recorded (local storage, records from before).
        """
        recorded = json.loads(self._saved().fingerprint or "{}")
        if "files" in recorded:
            etags = {rel: state[1] for rel, state in recorded["files"].items()
                     if len(state) == 2 and isinstance(state[1], str)}
            return etags or None
        etag = recorded.get("etag")
        return str(etag) if etag else None

    def _refuse_links_out(self, root: str, key: str) -> None:
        """Raise if the stored object, or a file below it, is a link leading out of ``root``."""
        found = link_outside(os.path.join(root, key), root)
        if found is not None:
            msg = (f"{self._what()}: {found[0]} is a symbolic link to {found[1]}, outside "
                   f"the storage root {root}; lamin-io reads nothing outside the root: "
                   f"put the content itself there, or delete the record")
            raise CorruptArtifactError(msg)

    def _verify_file(self, path: UPath) -> None:
        row = self._saved()
        try:
            now = fingerprint(path)
        except StorageObjectMissingError as exc:
            msg = (f"{self._what()}: its stored object {path} is missing; restore it or "
                   f"remove the record with `lamin-io delete {row.key or row.uid}`")
            raise StorageObjectMissingError(msg) from exc
        recorded = json.loads(row.fingerprint or "{}")
        changed = now["size"] != row.size or (
            "etag" in recorded and now.get("etag") != recorded["etag"])
        if not changed and any(k in recorded and now.get(k) != recorded[k]
                               for k in ("mtime_ns", "inode")):  # touched or replaced locally
            changed = check_stored(Path(path.path), sha256=row.hash, manifest=None) is not None
        if changed:
            msg = (f"{self._what()}: the stored object {path} no longer matches the record "
                   f"(overwritten or truncated outside lamin-io); save the new content as a "
                   f"new version")
            raise StorageModifiedError(msg)

    def _verify_folder(self, path: UPath) -> None:
        row = self._saved()
        listing = folder_states(path)
        if not listing:
            msg = f"{self._what()}: its stored folder {path} is missing"
            raise StorageObjectMissingError(msg)
        manifest = self.manifest
        assert manifest is not None  # noqa: S101 (folder rows always carry one)
        # each file's state at save (records from before these states: sizes alone)
        recorded = json.loads(row.fingerprint or "{}").get("files", {})
        local = is_local(path)
        listed = {rel for rel, _, _ in manifest.entries}
        added = sorted(rel for rel in listing if rel not in listed
                       and PurePosixPath(rel).name not in _DESKTOP_FILES)
        if added:  # (a reader may read them: a zarr chunk, a TileDB fragment)
            msg = (f"{self._what()}: file {added[0]!r} in {path} is not in the record's "
                   f"manifest{f' (and {len(added) - 1} more)' if len(added) > 1 else ''}: "
                   f"added outside lamin-io; remove it, or save the new content as a new "
                   f"version")
            raise StorageModifiedError(msg)
        touched = set()  # local files of the recorded size whose time or inode moved
        for rel, size, _ in manifest.entries:
            if rel not in listing:
                msg = (f"{self._what()}: file {rel!r} listed in its manifest is missing from "
                       f"{path}; the folder is incomplete and is not read")
                raise CorruptArtifactError(msg)
            now = listing[rel]
            # an ETag names the content; a local file's new time or inode may not
            if now[0] != size or (rel in recorded and now != recorded[rel] and not local):
                self._modified_file(rel, path)
            if rel in recorded and now != recorded[rel]:
                touched.add(rel)
        if touched:  # hashed in one go (each state once, see check_stored)
            bad = check_stored(Path(path.path), sha256=row.hash, manifest=manifest,
                               only=touched)
            if bad is not None:
                self._modified_file(bad, path)

    def _modified_file(self, rel: str, path: UPath) -> None:
        msg = (f"{self._what()}: file {rel!r} in {path} no longer matches the record "
               f"(rewritten outside lamin-io); save the new content as a new version")
        raise StorageModifiedError(msg)

    def cache(self, *, mute: bool = False, is_run_input: bool | None = None) -> Path:
        """Return a local path to the content, downloading S3 objects once.

        The local copy is kept per content hash and fetched again when it no longer matches
        the record (missing, edited). Local storage returns the stored path itself. An
        unsaved artifact returns its local file or folder itself (an S3 one is downloaded
        into the cache).

        Parameters
        ----------
        mute
            Hide progress bars.
        is_run_input
            ``False``: do not record this read as an input of the active run (see
            :func:`lamin_io.track`); ``True``: warn when no run is active.
        """
        local = self._local_copy(mute=mute)
        self._read_as_input(is_run_input=is_run_input)
        return local

    def _local_copy(self, *, mute: bool) -> Path:
        """Return a local path to the content (:meth:`cache` without lineage)."""
        if self._row is None:
            return self._cache_unsaved(mute=mute)
        path = self.verify()
        if is_local(path):
            local = Path(path.path)
            self._check_content(local, mute=mute)
            return local
        row = self._saved()
        name = PurePosixPath(row.key).name if row.key else f"{row.uid}{row.suffix}"
        with storage_errors(str(path), self._conn().settings_for(row.storage_id).endpoint_url):
            return cached_copy(path, sha256=row.hash, name=name, manifest=self.manifest,
                               what=self._what(), mute=mute, versions=self._versions())

    def _check_content(self, local: Path, *, mute: bool) -> None:
        """Hash locally stored content against the record, once per state of its files.

        What :meth:`verify` cannot see: bytes damaged in place while size, modification time
        and inode stayed as recorded (a disk error, a write that restored the time). The
        states whose bytes matched are remembered in the cache (:func:`check_stored`).
        """
        row = self._saved()
        bad = check_stored(local, sha256=row.hash, manifest=self.manifest, mute=mute)
        if bad is None:
            return
        where = f"file {bad!r} in {local}" if bad else str(local)
        msg = (f"{self._what()}: the stored bytes of {where} no longer hash to the record's "
               f"SHA-256 although the file's size, time and inode did not move: damaged in "
               f"place (a disk error, or a write that kept them); restore it from a copy, or "
               f"delete the record")
        raise CorruptArtifactError(msg)

    def _stored_at(self, local: Path) -> str:
        """Say where a saved artifact is stored when ``local`` is a copy of it, for a note."""
        if self._row is None:
            return ""
        stored = stored_path(self._conn(), self._saved())
        return "" if is_local(stored) and Path(stored.path) == local else f", stored at {stored}"

    def _cache_unsaved(self, *, mute: bool) -> Path:
        """Return the unsaved source: itself if local, else a copy in the cache.

        A remote source is read once: hashed while it downloads, and kept under that hash.
        """
        source = self._source
        endpoint = dict(source.storage_options).get("endpoint_url")
        with storage_errors(str(source), endpoint):
            if not source.exists():
                raise missing_path(source)
            if is_local(source):
                return Path(source.path)
            return cached_download(source, name=source.name, what=self._what(), mute=mute)

    def _is_folder(self) -> bool:
        """Whether the content is a folder (the record says; an unsaved source is asked)."""
        if self._row is not None:
            return self.n_files is not None
        source = self._source
        with storage_errors(str(source), dict(source.storage_options).get("endpoint_url")):
            return bool(source.is_dir())

    def _source_size(self) -> int:
        source = self._source
        with storage_errors(str(source), dict(source.storage_options).get("endpoint_url")):
            return int(source.fs.du(source.path, total=True))

    def _read_as_input(self, *, is_run_input: bool | None) -> None:
        """Record this read as an input of the active run (see :func:`track`).

        Only saved artifacts: an unsaved one has no record to link to, and reading it
        writes nothing to the registry (``is_run_input`` then has no effect, as in lamindb).
        """
        record_input(self, is_run_input=is_run_input)  # type: ignore[arg-type]

    def load(self, *, mute: bool = False, is_run_input: bool | None = None,
             **kwargs: Any) -> Any:
        """Load into memory: AnnData for ``.h5ad``/``.zarr``, a pandas DataFrame for tables.

        Tables are parquet, csv, tsv, Arrow IPC/Feather, JSON Lines and ORC files, and
        folders of one of them (sharded or hive-partitioned). Extra keyword arguments go to
        the reader (``anndata.read_h5ad``, ``pandas.read_*``; ``pyarrow.dataset.dataset`` for
        table folders); one the reader does not take is an ``UnsupportedFormatError``,
        raised before anything is downloaded. Above ``LAMIN_IO_LOAD_WARN_BYTES`` (default
        10 GB; ``0`` turns it off) a ``UserWarning`` suggests :meth:`open` instead. An
        unsaved artifact loads the file or folder it was made from.

        Parameters
        ----------
        mute
            Hide progress bars of a download.
        is_run_input
            ``False``: not an input of the active run (see :func:`lamin_io.track`).
        **kwargs
            Passed to the format's reader.

        Raises
        ------
        UnsupportedFormatError
            No reader for the suffix, or a keyword the reader does not take.
        CorruptArtifactError
            The bytes cannot be decoded (a truncated file, a damaged chunk).
        """
        from lamin_io.accessors import format_for

        fmt = format_for(self.suffix)
        loader = fmt.resolve("load")
        fmt.check_keywords("load", self.suffix, kwargs,
                           folder=self._is_folder() if kwargs else None)
        if self._row is None:
            _warn_if_large(self._what(), self._source_size())
        else:
            _warn_if_large(self._what(), self.size)
        local = self._local_copy(mute=mute)
        try:
            loaded = loader(to_upath(local), **kwargs)
        except LaminIOError as exc:  # (the reader named the local copy)
            exc.add_note(f"while loading {self._what()}{self._stored_at(local)}")
            raise
        self._read_as_input(is_run_input=is_run_input)
        return loaded

    def open(self, mode: str = "r", *, is_run_input: bool | None = None, **kwargs: Any) -> Any:
        """Open lazily where the bytes lie (see :func:`lamin_io.open`).

        A write mode on a folder (``"r+"`` on an AnnData ``.zarr``, ``"w"`` on a
        ``.tiledbsoma`` experiment) works on a private copy; closing the accessor saves that
        copy as a new version of this artifact (the registered version stays immutable: the
        record is the truth). The format table's ``modes`` and keywords are checked before
        anything is copied; single files open where they lie, and their readers refuse
        write modes. An unsaved artifact opens the file or folder it was made from, as
        :func:`lamin_io.open` does (a write mode then edits that file itself).

        Parameters
        ----------
        mode
            ``"r"``, or a write mode the format takes.
        is_run_input
            ``False``: not an input of the active run (see :func:`lamin_io.track`).
        **kwargs
            Passed to the format's opener (``engine=`` for tables, ...).
        """
        from lamin_io.accessors import format_for
        from lamin_io.accessors import open as open_path

        if self._row is None:
            return open_path(self._source, mode, **kwargs)
        path = self.verify()
        if mode == "r" or self.n_files is None:
            # read-only openers that cannot pin their reads (a polars scan) call the check
            # again when they finish; the others ignore it
            try:
                opened = open_path(path, mode, on_close=self.verify if mode == "r" else None,
                                   versions=self._versions() if mode == "r" else None,
                                   **kwargs)
            except LaminIOError as exc:
                exc.add_note(f"while opening {self._what()}")
                raise
            self._read_as_input(is_run_input=is_run_input)
            return opened
        fmt = format_for(self.suffix, path, what="open")
        if mode not in fmt.modes:
            shown = " or ".join(map(repr, fmt.modes))
            msg = (f"cannot open {self._what()} in mode {mode!r}: {fmt.name} stores open in "
                   f"mode {shown}")
            raise WriteNotSupportedError(msg)
        fmt.check_keywords("open", self.suffix, kwargs)
        opened = self._open_writable_copy(fmt, mode, **kwargs)
        self._read_as_input(is_run_input=is_run_input)
        return opened


def manifest_of(row: Row[Any]) -> Manifest | None:
    """Return the manifest stored in an artifact row, ``None`` for a single file."""
    return None if row.manifest is None else Manifest.from_json(json.loads(row.manifest))


def stored_path(conn: Connection, row: Row[Any]) -> UPath:
    """Return where an artifact row's bytes are stored, with its storage's settings.

    The row's storage key is checked first (:func:`check_storage_key`): every read, delete
    and ``gc`` of an artifact finds its bytes here, never outside the storage root.
    """
    key = check_storage_key(row.storage_key, what=f"artifact {row.key or row.uid!r} "
                                                   f"(uid {row.uid})")
    settings = conn.settings_for(row.storage_id)
    return to_upath(f"{settings.root}/{key}", settings.fsspec_options())
