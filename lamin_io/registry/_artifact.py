"""Artifacts: registered files and folders, with versions, saving and deletion.

Reading their content (verify, cache, load, open) is :mod:`lamin_io.registry._reading`.

Saving is crash-safe. The record is written first as *pending*, the bytes are uploaded to
their final key with a conditional create, and only then is the record marked *ready*;
readers see ready records only. A save killed in between leaves a pending record (and maybe
a partial object) that ``lamin-io gc`` removes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import delete, select, update

from lamin_io._faults import kill_point
from lamin_io.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    MissingDependencyError,
    ObjectExistsError,
    RegistryError,
    SaveInterruptedError,
    StorageModifiedError,
    UnsupportedFormatError,
)
from lamin_io.registry import _schema as s
from lamin_io.registry._connection import Connection, current
from lamin_io.registry._keys import (
    RESERVED_PREFIX,
    check_key_length,
    object_key,
    validate_key,
)
from lamin_io.registry._lease import Lease, lease_end, lease_seconds
from lamin_io.registry._reading import ArtifactReads, format_size, manifest_of, stored_path
from lamin_io.registry._record import (
    DELETING,
    PENDING,
    READY,
    RecordSet,
    Versioned,
    family_of,
    new_uid,
    next_version,
    refresh_latest,
)
from lamin_io.registry._run import record_input, run_id_for_save
from lamin_io.storage import (
    Manifest,
    fingerprint,
    hash_path,
    is_local,
    link_outside,
    missing_path,
    remove,
    storage_errors,
    suffix_of,
    to_upath,
    upload,
)

if TYPE_CHECKING:
    from sqlalchemy import Row
    from upath import UPath

    from lamin_io.accessors import Format
    from lamin_io.loaders import BlockLoader, MappedCollection
    from lamin_io.registry._collection import Collection
    from lamin_io.storage import PathLike

__all__ = ["Artifact", "ArtifactSet", "existing_path", "format_size"]

logger = logging.getLogger(__name__)


def _pending_wait() -> float:
    return float(os.environ.get("LAMIN_IO_PENDING_WAIT", "600"))


class Artifact(Versioned, ArtifactReads):
    """A file or folder in the registry.

    Parameters
    ----------
    path
        Local path or URL (``s3://...``) of a file or a folder (``.zarr``, sharded parquet,
        ``.tiledbsoma``).
    key
        A relative path naming it in the registry, e.g. ``"pbmc/raw.h5ad"``; its suffix must
        match the file's. Saving another file under an existing key makes a new version.
    description
        Free text.
    revises
        A saved artifact this one is a new version of; its key is the default ``key``. A
        different ``key`` moves the family to that key (a warning says so at save).
    version
        A version label; default: the next integer in the family.
    storage_options
        fsspec options for reading ``path`` (default: those of the connection).

    Notes
    -----
    Before :meth:`save`, :meth:`open`, :meth:`load` and :meth:`cache` read the file or
    folder given (as lamindb allows): nothing is written to the registry or to storage for
    it, and it is no lineage input until it is saved.

    Examples
    --------
    >>> import lamin_io as ln                                             # doctest: +SKIP
    >>> artifact = ln.Artifact("pbmc.h5ad", key="pbmc/raw.h5ad").save()
    >>> ln.Artifact.get(key="pbmc/raw.h5ad").load()
    """

    _table: ClassVar = s.artifact
    _kind: ClassVar[str] = "artifact"
    _fields: ClassVar[tuple[str, ...]] = (
        "uid", "key", "description", "suffix", "size", "hash", "version", "is_latest",
        "created_at", "n_files", "family_uid", "storage_key", "managed", "n_observations",
    )

    def __init__(self, path: PathLike, *, key: str | None = None,
                 description: str | None = None, revises: Artifact | None = None,
                 version: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self._row = None
        source = existing_path(path, storage_options)
        self._source = source
        self._suffix = suffix_of(source.name)
        if revises is not None and (not isinstance(revises, Artifact) or revises._row is None):
            msg = "revises= must be a saved Artifact (for example Artifact.get(key=...))"
            raise InvalidArgumentError(msg)
        if key is None and revises is not None:
            key = revises.key  # a new version keeps its family's key, as in lamindb
        if key is not None:
            validate_key(key, suffix=self._suffix)
        self._key = key
        self._description = description
        self._revises = revises
        self._version_label = None if version is None else str(version)

    # -- saving ----------------------------------------------------------------------------

    def save(self, *, mute: bool = False) -> Artifact:
        """Hash, upload (unless already inside a storage root) and register.

        Saving content that is already registered returns the existing record (with a
        warning when it is registered under another key); the bytes are never stored twice.

        Parameters
        ----------
        mute
            Hide progress bars.
        """
        if self._row is not None:
            return self
        conn = current()
        if self._revises is not None:  # (a version of a record of this registry)
            self._revises._conn()  # noqa: SLF001
        source = self._source
        located = conn.locate(source)
        if located is not None and located[1].split("/")[0] == RESERVED_PREFIX:
            msg = (f"{source} is an object lamin-io manages under {RESERVED_PREFIX!r}; "
                   f"get its artifact with Artifact.get(...) instead of registering it again")
            raise InvalidKeyError(msg)
        if located is not None and is_local(source):
            self._refuse_in_place_links(conn, located[0])
        key = self._key
        if key is None and located is not None:
            key = validate_key(located[1], suffix=self._suffix)
        if key is not None:
            check_key_length(key, conn.settings.root)
        with storage_errors(str(source), conn.settings.endpoint_url):
            digest, size, manifest = hash_path(source, mute=mute)
        if manifest is not None and not manifest.entries:
            msg = (f"cannot save {source}: it is an empty folder (no file to store; object "
                   f"stores cannot hold an empty folder); write its content first")
            raise InvalidArgumentError(msg)
        n_observations = _count_observations(source, self._suffix)
        fp = None  # registered in place: its state now (before any registry lock)
        if located is not None:
            with storage_errors(str(source), conn.settings.endpoint_url):
                fp = json.dumps(fingerprint(source, folder=manifest is not None))

        deadline = time.monotonic() + _pending_wait()
        while True:
            state, row = self._claim(conn, digest, size, manifest, key, located,
                                     n_observations=n_observations, stored_state=fp)
            if state != "busy":
                break
            if time.monotonic() > deadline:
                msg = (f"another save of the same content (artifact {row.uid}) has been "
                       f"pending since {row.created_at}; if that process died, run "
                       f"`lamin-io gc` and save again")
                raise RegistryError(msg)
            time.sleep(0.2)
        if state == "existing":
            if key is not None and row.key != key:
                logger.warning("content of %s is already registered as %r (uid %s); "
                               "returning that artifact, the bytes are not stored twice",
                               source, row.key, row.uid)
            self._row, self._registry = row, conn.registry
            return self
        if row.status == READY:  # registered in place, nothing to upload
            self._row = row
        else:
            with Lease(conn, row.id):  # gc leaves the record alone while the bytes upload
                self._row = self._upload_and_publish(conn, row, mute=mute)
        self._registry = conn.registry
        self._warn_if_key_moved()
        return self

    def _refuse_in_place_links(self, conn: Connection, storage_id: int) -> None:
        """Refuse to register in place a folder holding links that lead out of its root.

        Its record would point at bytes outside the storage root (reads refuse them, see
        :meth:`verify`). A file given by a link is resolved first: a link inside the root
        to a file outside is saved as a copy, like any file outside.
        """
        root = to_upath(conn.settings_for(storage_id).root).path
        found = link_outside(self._source.path, root)
        if found is not None:
            msg = (f"cannot register {self._source} in place: {found[0]} is a symbolic link "
                   f"to {found[1]}, outside the storage root {root}; lamin-io registers and "
                   f"reads nothing outside the root: copy the content in, or save the folder "
                   f"from a path outside the root (a copy is stored)")
            raise InvalidArgumentError(msg)

    def _warn_if_key_moved(self) -> None:
        """Say so when a new version of ``revises`` moved its family to another key."""
        previous = self._revises
        if previous is None or previous.key == self.key:
            return
        logger.warning("the family of %r now has key %r: version %s was saved under the new "
                       "key, so Artifact.get(key=%r) returns it and %r keeps only the earlier "
                       "versions", previous.key, self.key, self.version, self.key,
                       previous.key)

    def _claim(self, conn: Connection, digest: str, size: int, manifest: Manifest | None,
               key: str | None, located: tuple[int, str] | None, *,
               n_observations: int | None = None,
               stored_state: str | None = None) -> tuple[str, Row[Any]]:
        """Find the record of this content, or insert one (pending, or ready if in place).

        Only the database is touched while its write lock is held: no network call (a slow
        storage endpoint would stall every other writer).
        """
        t = s.artifact
        with conn.db.write() as c:
            row = c.execute(select(t).where(t.c.hash == digest)).one_or_none()
            if row is not None:
                return ("existing" if row.status == READY else "busy"), row
            if located is not None:
                clash = c.execute(select(t).where(t.c.storage_id == located[0],
                                                  t.c.storage_key == located[1])).one_or_none()
                if clash is not None:
                    msg = (f"{self._source} is registered as artifact {clash.key!r} "
                           f"(uid {clash.uid}) with other content: the file changed behind "
                           f"the registry's back; write the new content to a new path")
                    raise StorageModifiedError(msg)
            uid = new_uid()
            family = family_of(c, t, key, self._revises) or uid
            label, index = next_version(c, t, family, self._version_label)
            in_place = located is not None
            values = {
                "uid": uid, "key": key, "description": self._description,
                "suffix": self._suffix, "size": size, "hash": digest,
                "n_files": None if manifest is None else len(manifest.entries),
                "manifest": None if manifest is None else json.dumps(manifest.to_json()),
                "storage_id": located[0] if in_place else conn.storage_id,  # type: ignore[index]
                "storage_key": located[1] if in_place else object_key(uid, self._suffix),  # type: ignore[index]
                "managed": not in_place,
                "status": READY if in_place else PENDING,
                "family_uid": family, "version": label, "version_index": index,
                "is_latest": False,
                "fingerprint": stored_state,
                "n_observations": n_observations,
                "created_at": datetime.now(UTC),
                "lease_until": None if in_place else lease_end(),
                "run_id": run_id_for_save(conn.registry),
            }
            c.execute(t.insert().values(**values))
            if in_place:
                refresh_latest(c, t, family)
            return "new", c.execute(select(t).where(t.c.uid == uid)).one()

    def _upload_and_publish(self, conn: Connection, row: Row[Any], *, mute: bool) -> Row[Any]:
        t = s.artifact
        dest = stored_path(conn, row)
        endpoint = conn.settings_for(row.storage_id).endpoint_url
        try:
            with storage_errors(str(dest), endpoint):
                upload(self._source, dest, sha256=row.hash, manifest=manifest_of(row),
                       mute=mute)
                fp = json.dumps(fingerprint(dest, folder=row.manifest is not None))
        except BaseException as exc:
            # Nothing may stay behind: drop the pending record and any partial object
            # (but never an object that existed before: that one is not ours).
            if not isinstance(exc, ObjectExistsError):
                _quietly(f"removing the partial upload {dest}", remove, dest)
            _quietly(f"dropping the pending record {row.uid}", _delete_row, conn, row.id)
            raise
        kill_point("after-upload")
        try:
            with conn.db.write() as c:
                published = c.execute(update(t).where(t.c.id == row.id, t.c.status == PENDING)
                                      .values(status=READY, fingerprint=fp, lease_until=None))
                kill_point("commit")
                if published.rowcount == 0:
                    msg = (f"saving {self._source} failed: its pending record (uid {row.uid}) "
                           f"was removed by `lamin-io gc` while the bytes uploaded (its lease "
                           f"ran out: this process stalled for over {lease_seconds():g} s, "
                           f"LAMIN_IO_LEASE_SECONDS, or could not reach the registry); the "
                           f"upload was removed: save again")
                    raise SaveInterruptedError(msg)
                refresh_latest(c, t, row.family_uid)
                return c.execute(select(t).where(t.c.id == row.id)).one()
        except BaseException:
            _quietly(f"removing the uploaded object {dest}", remove, dest)
            _quietly(f"dropping the pending record {row.uid}", _delete_row, conn, row.id)
            raise

    # -- reading ---------------------------------------------------------------------------

    @property
    def suffix(self) -> str:
        """File suffix, e.g. ``".h5ad"``; ``""`` for a folder without one."""
        return str(self._saved().suffix) if self._row is not None else self._suffix

    @property
    def size(self) -> int:
        """Size in bytes (all files, for a folder)."""
        return int(self._saved().size)

    @property
    def hash(self) -> str:
        """Full-content SHA-256 (of the manifest, for a folder)."""
        return str(self._saved().hash)

    @property
    def n_files(self) -> int | None:
        """Number of files of a folder artifact; ``None`` for a single file."""
        return self._saved().n_files

    @property
    def n_observations(self) -> int | None:
        """Number of observations (cells) stored, where the format counts them at save.

        Set for TileDB-SOMA experiments and AnnData stores; ``None`` when unknown.
        """
        n = self._saved().n_observations
        return None if n is None else int(n)

    @property
    def manifest(self) -> Manifest | None:
        """The folder's ``(relative path, size, sha256)`` entries; ``None`` for a file."""
        return manifest_of(self._saved())

    @property
    def is_managed(self) -> bool:
        """Whether lamin-io uploaded the bytes (``False``: registered in place)."""
        return bool(self._saved().managed)

    @property
    def storage_root(self) -> str:
        """The storage root holding the bytes."""
        return self._conn().settings_for(self._saved().storage_id).root

    @property
    def path(self) -> UPath:
        """Where the bytes are stored, as a ``UPath`` carrying the storage's settings."""
        return stored_path(self._conn(), self._saved())

    def _what(self) -> str:
        if self._row is None:
            return f"unsaved artifact {self._source}"
        row = self._row
        return f"artifact {row.key or row.uid!r} (uid {row.uid})"

    def _open_writable_copy(self, fmt: Format, mode: str, **kwargs: Any) -> Any:
        """Open a private copy with ``fmt``'s opener (mode and keywords checked already)."""
        import shutil
        import tempfile
        import weakref

        staging = Path(tempfile.mkdtemp(prefix="lamin-io-edit-"))
        copy = staging / PurePosixPath(self.key or f"{self.uid}{self.suffix}").name
        shutil.copytree(self._local_copy(mute=False), copy)
        previous = self

        def save_new_version() -> Artifact:
            try:
                return Artifact(copy, key=previous.key, description=previous.description,
                                revises=previous).save()
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        # an accessor dropped unclosed (or closed after an error, which saves nothing)
        # takes its copy with it: the callback lives exactly as long as the accessor
        weakref.finalize(save_new_version, shutil.rmtree, staging, ignore_errors=True)
        try:
            return fmt.resolve("open")(to_upath(copy), mode=mode, on_close=save_new_version,
                                       **kwargs)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # -- deleting --------------------------------------------------------------------------

    def delete(self, *, storage: bool | None = None) -> None:
        """Delete the record and, for managed artifacts, the stored object.

        Parameters
        ----------
        storage
            Also delete the stored object. Default: ``True`` for objects lamin-io uploaded,
            ``False`` for files registered in place.
        """
        conn = self._conn()
        row = self._saved()
        t = s.artifact
        # checked before anything changes: a storage key that would leave the root is refused
        path = stored_path(conn, row) if (storage if storage is not None else row.managed) \
            else None
        with conn.db.write() as c:
            used = c.execute(select(s.collection.c.key, s.collection.c.uid)
                             .join(s.collection_artifact,
                                   s.collection_artifact.c.collection_id == s.collection.c.id)
                             .where(s.collection_artifact.c.artifact_id == row.id)).all()
            if used:
                names = ", ".join(repr(u.key or u.uid) for u in used)
                msg = f"{self._what()} belongs to collection(s) {names}: delete those first"
                raise RegistryError(msg)
            c.execute(update(t).where(t.c.id == row.id).values(status=DELETING, is_latest=False))
            refresh_latest(c, t, row.family_uid)
        kill_point("delete")
        if path is not None:
            try:
                with storage_errors(str(path), conn.settings_for(row.storage_id).endpoint_url):
                    remove(path)
            except BaseException:
                with conn.db.write() as c:
                    c.execute(update(t).where(t.c.id == row.id).values(status=READY))
                    refresh_latest(c, t, row.family_uid)
                raise
        _delete_row(conn, row.id)
        self._row = None

    # -- display ---------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        row = self._saved()
        return {"uid": row.uid, "key": row.key, "version": row.version,
                "is_latest": bool(row.is_latest), "suffix": row.suffix, "size": row.size,
                "hash": row.hash, "description": row.description,
                "n_observations": row.n_observations, "created_at": row.created_at}

    def describe(self) -> str:
        """Print and return a readable summary of the record."""
        row = self._saved()
        n_versions = len(self.versions)
        lines = [
            f"Artifact {row.key or '(no key)'}",
            f"  uid          {row.uid}",
            f"  version      {row.version} of {n_versions}"
            + ("  (latest)" if row.is_latest else ""),
            f"  suffix       {row.suffix or '(none)'}",
            f"  size         {format_size(row.size)}"
            + (f" in {row.n_files} files" if row.n_files is not None else ""),
            f"  sha256       {row.hash}",
            *([f"  n_obs        {row.n_observations}"] if row.n_observations is not None
              else []),
            f"  storage      {self.storage_root}",
            f"  stored at    {row.storage_key}"
            + ("" if row.managed else "  (registered in place)"),
            f"  created_at   {row.created_at:%Y-%m-%d %H:%M:%S}",
        ]
        run = self.run
        if run is not None:
            lines.append(f"  run          {run.uid} ({run.transform.name}, {run.status})")
        if row.description:
            lines.append(f"  description  {row.description}")
        text = "\n".join(lines)
        print(text)
        return text

    def __repr__(self) -> str:
        if self._row is None:
            return f"Artifact(path={str(self._source)!r}, key={self._key!r}, unsaved)"
        r = self._row
        return (f"Artifact(key={r.key!r}, uid={r.uid!r}, version={r.version!r}, "
                f"suffix={r.suffix!r}, size={format_size(r.size)!r}, "
                f"hash={r.hash[:12]!r}, is_latest={bool(r.is_latest)})")


class ArtifactSet(RecordSet[Artifact]):
    """A list-like result of :meth:`Artifact.filter`."""

    def cache(self, *, mute: bool = False, is_run_input: bool | None = None) -> list[Path]:
        """Return local paths of every artifact, in order (each one a run input)."""
        return [a.cache(mute=mute, is_run_input=is_run_input) for a in self]

    def open(self, *, engine: str = "pyarrow", is_run_input: bool | None = None,
             **kwargs: Any) -> Any:
        """Open all artifacts (table files and folders) as one table, lazily.

        ``engine="pyarrow"`` (default) returns one ``pyarrow.dataset.Dataset``;
        ``engine="polars"`` a context manager yielding one ``polars.LazyFrame``;
        ``engine="dask"`` a Dask DataFrame and ``engine="ray"`` a Ray Dataset, computed on
        the cluster the caller started (extras ``lamin-io[dask]``, ``lamin-io[ray]``). Rows come
        in the order of the artifacts. Artifacts of different formats raise
        ``UnsupportedFormatError``; artifacts on different storages are combined (a
        pyarrow union dataset, ``polars.concat``). ``use_fsspec=True`` and other keywords
        work as in :func:`lamin_io.open`.

        Examples
        --------
        >>> with ln.Artifact.filter(key__startswith="sales/").open(engine="polars") as lf:
        ...     lf.group_by("region").agg(pl.col("total").sum()).collect()  # doctest: +SKIP
        """
        from lamin_io.accessors import open_many

        if not self:
            msg = "no artifacts to open: the query matched nothing"
            raise InvalidArgumentError(msg)
        opened = open_many([a.verify() for a in self], engine=engine,
                           after_scan=lambda: [a.verify() for a in self], **kwargs)
        for artifact in self:
            record_input(artifact, is_run_input=is_run_input)
        return opened

    def mapped(self, layers_keys: str | list[str] | None = None,
               obs_keys: str | list[str] | None = None,
               obsm_keys: str | list[str] | None = None,
               obs_filter: dict[str, Any] | None = None, join: str | None = "inner",
               encode_labels: bool | list[str] = True,  # noqa: FBT001, FBT002 (lamindb's)
               unknown_label: str | dict[str, str] | None = None,
               cache_categories: bool = True, parallel: bool = False,  # noqa: FBT001, FBT002
               dtype: str | None = None, stream: bool = False,  # noqa: FBT001, FBT002
               is_run_input: bool | None = None,  # noqa: FBT001
               **kwargs: Any) -> MappedCollection:
        """Return a :class:`~lamin_io.loaders.MappedCollection` over the AnnData artifacts.

        lamindb's parameters, in its order (see the class). Artifacts whose suffix is no
        ``.h5ad`` or ``.zarr`` are left out with a warning. ``stream=False`` (the default)
        reads local copies (:meth:`Artifact.cache`); ``stream=True`` reads the stored
        objects where they lie, pinned to the versions recorded at save. Keywords of
        lamin-io's own (``fill_missing=``) pass through.
        """
        from lamin_io.loaders import MappedCollection
        from lamin_io.loaders._mapped import _digest

        kept = anndata_members(list(self))
        paths = [a.verify() if stream else a._local_copy(mute=False) for a in kept]  # noqa: SLF001
        versions = [a._versions() if stream else None for a in kept]  # noqa: SLF001
        # the samplers' order follows the content, not the paths
        kwargs.setdefault("order_key", _digest("".join(a.hash for a in kept)))
        mapped = MappedCollection(paths, layers_keys, obs_keys, obsm_keys, obs_filter, join,
                                  encode_labels, unknown_label, cache_categories, parallel,
                                  dtype, versions=versions, **kwargs)
        for artifact in kept:
            record_input(artifact, is_run_input=is_run_input)
        return mapped

    def loader(self, batch_size: int = 256, **kwargs: Any) -> BlockLoader:
        """Return a :class:`~lamin_io.loaders.BlockLoader` over the AnnData artifacts.

        Its batches come from random blocks of neighbouring rows, read a fetch of
        ``fetch_factor`` batches at a time (see the class, whose keywords it takes:
        ``shuffle``, ``seed``, ``num_workers``, ``weights``, ...); :meth:`mapped`'s keywords
        (``obs_keys``, ``obs_filter``, ``join``, ``stream``, ...) choose what is read. The
        order follows the artifacts' content, not their paths.
        """
        from lamin_io.loaders import BlockLoader

        own = {k: kwargs.pop(k) for k in BlockLoader.KEYWORDS if k in kwargs}
        return BlockLoader(self.mapped(**kwargs), batch_size, **own)

    def preshuffle(self, key: str, **kwargs: Any) -> Collection:
        """Rewrite the AnnData artifacts' cells in a random order as zarr shards.

        Returns the new collection ``key`` of shards ``{key}/part-00000.zarr``, ...:
        AnnData zarr stores holding every selected cell once, in a uniform random order
        (from ``seed``), X as CSR in small chunks, obs columns (``obs_keys``, default:
        those every artifact has), obs names, and where each cell came from
        (``source_file``: the artifact's key; ``source_row``). Keywords: ``seed``,
        ``obs_keys``, ``obs_filter``, ``join``, ``layer``, ``shard_bytes``, ``tmp_dir``
        (the spilled rows: about X's size on local disk), ``description``, ``mute``; see
        :func:`lamin_io.loaders.preshuffle`. Saving again with the same key and seed
        returns the existing collection.

        Examples
        --------
        >>> atlas = ln.Artifact.filter(key__startswith="atlas/")         # doctest: +SKIP
        >>> shuffled = atlas.preshuffle("atlas-shuffled")
        >>> loader = shuffled.loader(batch_size=256, block_size=256)
        """
        from lamin_io.registry._collection import preshuffle_artifacts

        return preshuffle_artifacts(self, key, **kwargs)


def anndata_members(artifacts: list[Artifact]) -> list[Artifact]:
    """Return the ``.h5ad``/``.zarr`` artifacts, warning of each other one left out."""
    kept = []
    for artifact in artifacts:
        if ".h5ad" in artifact.suffix or ".zarr" in artifact.suffix:
            kept.append(artifact)
        else:
            logger.warning("ignoring artifact with suffix %s", artifact.suffix)
    if not kept:
        msg = "no .h5ad or .zarr artifacts to map: the query matched none"
        raise InvalidArgumentError(msg)
    return kept


Artifact._set = ArtifactSet


def _delete_row(conn: Connection, row_id: int) -> None:
    t = s.artifact
    with conn.db.write() as c:
        family = c.execute(select(t.c.family_uid).where(t.c.id == row_id)).scalar()
        c.execute(delete(t).where(t.c.id == row_id))
        if family is not None:
            refresh_latest(c, t, family)


def existing_path(path: PathLike, storage_options: dict[str, Any] | None = None) -> UPath:
    """Normalize a user's path or URL, with its storage's options unless given; check it exists.

    Raises
    ------
    PathNotFoundError
        Nothing is stored there.
    """
    conn = current()
    text = os.fspath(path) if not hasattr(path, "protocol") else str(path)
    options = storage_options
    if options is None and "://" in text and not text.startswith("file://"):
        options = conn.path_options(text)
    source = to_upath(path, options)
    with storage_errors(str(source), conn.settings.endpoint_url):
        exists = source.exists()
    if not exists:
        raise missing_path(source)
    return source


def _count_observations(path: UPath, suffix: str) -> int | None:
    """Return what the format table counts in ``path`` (cells of an experiment), or ``None``.

    A registry keeps any file: a format that cannot count, or a store that cannot be read,
    leaves the count unknown rather than failing the save.
    """
    from lamin_io.accessors import format_for

    try:
        counter = format_for(suffix, path, what="n_observations").resolve("n_observations")
    except (UnsupportedFormatError, MissingDependencyError):
        return None
    try:
        n = counter(path)
    except Exception:  # noqa: BLE001 (an unreadable store is still registered)
        logger.debug("cannot count the observations of %s", path, exc_info=True)
        return None
    return None if n is None else int(n)


def _quietly(what: str, fn: Any, *args: Any) -> None:
    """Run a cleanup step after a failed save; a failure of its own is one line of log.

    The save's own error is what the caller re-raises; a cleanup that fails for the same
    reason (no credentials, no bucket) must not bury it under another chain of tracebacks.
    The traceback is logged at DEBUG level.
    """
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 (the save's own error is re-raised by the caller)
        first = next(iter(str(exc).splitlines()), "")
        logger.warning("cleanup after the failed save: %s failed (%s: %s); `lamin-io gc` "
                       "removes what is left", what, type(exc).__name__, first)
        logger.debug("cleanup step %s failed", what, exc_info=True)
