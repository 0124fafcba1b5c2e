"""Collections: ordered groups of artifacts, versioned like artifacts."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import delete, select

from lamin_io.errors import InvalidArgumentError
from lamin_io.registry import _schema as s
from lamin_io.registry._artifact import Artifact, ArtifactSet, format_size
from lamin_io.registry._connection import current
from lamin_io.registry._keys import validate_key
from lamin_io.registry._record import (
    READY,
    RecordSet,
    Versioned,
    family_of,
    new_uid,
    next_version,
    refresh_latest,
)
from lamin_io.registry._run import record_input, run_id_for_save

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from lamin_io.loaders import BlockLoader, MappedCollection

__all__ = ["Collection", "preshuffle_artifacts"]

logger = logging.getLogger(__name__)


class Collection(Versioned):
    """An ordered group of saved artifacts.

    Parameters
    ----------
    artifacts
        Saved artifacts, in the order the collection keeps.
    key
        A name such as ``"atlas/train"``; saving other artifacts under the same key makes a
        new version.
    description
        Free text.
    revises
        A saved collection this one is a new version of.
    version
        A version label; default: the next integer in the family.

    Examples
    --------
    >>> c = ln.Collection([a1, a2], key="atlas/train").save()             # doctest: +SKIP
    >>> [a.key for a in c.artifacts]
    """

    _table: ClassVar = s.collection
    _kind: ClassVar[str] = "collection"
    _fields: ClassVar[tuple[str, ...]] = (
        "uid", "key", "description", "hash", "version", "is_latest", "created_at",
        "family_uid",
    )

    def __init__(self, artifacts: Iterable[Artifact], *, key: str,
                 description: str | None = None, revises: Collection | None = None,
                 version: str | None = None) -> None:
        self._row = None
        members = list(artifacts)
        if not members:
            msg = "a collection needs at least one artifact"
            raise InvalidArgumentError(msg)
        for a in members:
            if not isinstance(a, Artifact) or a._row is None:
                msg = f"collection members must be saved artifacts; got {a!r}: call .save() first"
                raise InvalidArgumentError(msg)
        validate_key(key, suffix=None)
        if revises is not None and (not isinstance(revises, Collection) or revises._row is None):
            msg = "revises= must be a saved Collection"
            raise InvalidArgumentError(msg)
        self._members = members
        self._key = key
        self._description = description
        self._revises = revises
        self._version_label = None if version is None else str(version)

    def save(self) -> Collection:
        """Register the collection; the same artifacts in the same order return the existing one."""
        if self._row is not None:
            return self
        digest = hashlib.sha256("\n".join(a.hash for a in self._members).encode()).hexdigest()
        t = s.collection
        conn = current()
        for record in [*self._members, *([self._revises] if self._revises else [])]:
            record._conn()  # noqa: SLF001 (rows of this registry only)
        with conn.db.write() as c:
            row = c.execute(select(t).where(t.c.hash == digest)).one_or_none()
            if row is None:
                uid = new_uid()
                family = family_of(c, t, self._key, self._revises) or uid
                label, index = next_version(c, t, family, self._version_label)
                res = c.execute(t.insert().values(
                    uid=uid, key=self._key, description=self._description, hash=digest,
                    status=READY, family_uid=family, version=label, version_index=index,
                    is_latest=False, created_at=datetime.now(UTC),
                    run_id=run_id_for_save(conn.registry)))
                cid = int(res.inserted_primary_key[0])  # type: ignore[index]
                c.execute(s.collection_artifact.insert(), [
                    {"collection_id": cid, "position": i, "artifact_id": a._saved().id}
                    for i, a in enumerate(self._members)])
                refresh_latest(c, t, family)
                row = c.execute(select(t).where(t.c.id == cid)).one()
            elif row.key != self._key:
                logger.warning("these artifacts already form collection %r (uid %s); "
                               "returning it", row.key, row.uid)
        self._row, self._registry = row, conn.registry
        return self

    @property
    def artifacts(self) -> ArtifactSet:
        """The member artifacts, in order."""
        a, ca = s.artifact, s.collection_artifact
        registry = self._conn()
        with registry.db.read() as c:
            rows = c.execute(select(a).join(ca, ca.c.artifact_id == a.c.id)
                             .where(ca.c.collection_id == self._saved().id)
                             .order_by(ca.c.position)).all()
        return ArtifactSet([Artifact._from_row(r, registry.registry) for r in rows])

    # A collection read is one input of the active run: the collection, not each member.

    def cache(self, *, mute: bool = False, is_run_input: bool | None = None) -> list[Path]:
        """Return local paths of every member, in order (downloading S3 objects once)."""
        paths = self.artifacts.cache(mute=mute, is_run_input=False)
        record_input(self, is_run_input=is_run_input)
        return paths

    def open(self, *, engine: str = "pyarrow", is_run_input: bool | None = None,
             **kwargs: Any) -> Any:
        """Open all member artifacts as one dataset (see :meth:`ArtifactSet.open`)."""
        opened = self.artifacts.open(engine=engine, is_run_input=False, **kwargs)
        record_input(self, is_run_input=is_run_input)
        return opened

    def mapped(self, *args: Any, **kwargs: Any) -> MappedCollection:
        """Return a :class:`~lamin_io.loaders.MappedCollection` over the members, in order.

        lamindb's parameters (``layers_keys``, ``obs_keys``, ``obsm_keys``, ``obs_filter``,
        ``join``, ``encode_labels``, ``unknown_label``, ``cache_categories``, ``parallel``,
        ``dtype``, ``stream``, ``is_run_input``); see :meth:`ArtifactSet.mapped`.

        Examples
        --------
        >>> with collection.mapped(obs_keys=["cell_type"]) as ds:            # doctest: +SKIP
        ...     loader = DataLoader(ds, batch_size=256, shuffle=True, num_workers=2)
        """
        is_run_input = kwargs.pop("is_run_input", None)
        kwargs["is_run_input"] = False  # (the collection is the input, not each member)
        mapped = self.artifacts.mapped(*args, **kwargs)
        record_input(self, is_run_input=is_run_input)
        return mapped

    def loader(self, batch_size: int = 256, **kwargs: Any) -> BlockLoader:
        """Return a :class:`~lamin_io.loaders.BlockLoader` over the members, in order.

        See :meth:`ArtifactSet.loader`.

        Examples
        --------
        >>> with collection.loader(batch_size=256, obs_keys=["cell_type"]) as loader:
        ...     for batch in loader:                                      # doctest: +SKIP
        ...         x, y = batch["X"], batch["cell_type"]
        """
        is_run_input = kwargs.pop("is_run_input", None)
        loader = self.artifacts.loader(batch_size, is_run_input=False, **kwargs)
        record_input(self, is_run_input=is_run_input)
        return loader

    def preshuffle(self, key: str, **kwargs: Any) -> Collection:
        """Rewrite the members' cells in a random order as zarr shards, a new collection.

        See :meth:`ArtifactSet.preshuffle`.

        Examples
        --------
        >>> shuffled = collection.preshuffle("atlas-shuffled")            # doctest: +SKIP
        >>> loader = shuffled.loader(batch_size=256, block_size=64, obs_keys=["cell_type"])
        """
        is_run_input = kwargs.pop("is_run_input", None)
        shuffled = preshuffle_artifacts(self.artifacts, key, is_run_input=False, **kwargs)
        record_input(self, is_run_input=is_run_input)
        return shuffled

    def delete(self) -> None:
        """Delete the collection record; its artifacts stay."""
        row = self._saved()
        t = s.collection
        with self._conn().db.write() as c:
            c.execute(delete(s.collection_artifact)
                      .where(s.collection_artifact.c.collection_id == row.id))
            c.execute(delete(t).where(t.c.id == row.id))
            refresh_latest(c, t, row.family_uid)
        self._row = None

    def _summary(self) -> dict[str, Any]:
        row = self._saved()
        return {"uid": row.uid, "key": row.key, "version": row.version,
                "is_latest": bool(row.is_latest), "n_artifacts": len(self.artifacts),
                "description": row.description, "created_at": row.created_at}

    def describe(self) -> str:
        """Print and return a readable summary, members included."""
        row = self._saved()
        members = self.artifacts
        lines = [f"Collection {row.key}",
                 f"  uid          {row.uid}",
                 f"  version      {row.version}" + ("  (latest)" if row.is_latest else ""),
                 f"  artifacts    {len(members)}, {format_size(sum(a.size for a in members))}"]
        lines += [f"    {i:>3}. {a.key or a.uid} (v{a.version})" for i, a in enumerate(members)]
        if row.description:
            lines.append(f"  description  {row.description}")
        text = "\n".join(lines)
        print(text)
        return text

    def __repr__(self) -> str:
        if self._row is None:
            return f"Collection(key={self._key!r}, n_artifacts={len(self._members)}, unsaved)"
        r = self._row
        return (f"Collection(key={r.key!r}, uid={r.uid!r}, version={r.version!r}, "
                f"is_latest={bool(r.is_latest)})")


class CollectionSet(RecordSet[Collection]):
    """A list-like result of :meth:`Collection.filter`."""


Collection._set = CollectionSet


def preshuffle_artifacts(artifacts: Iterable[Artifact], key: str, *,
                         description: str | None = None, obs_filter: dict[str, Any] | None = None,
                         join: str = "inner", layer: str | None = None,
                         tmp_dir: str | Path | None = None, mute: bool = False,
                         is_run_input: bool | None = None, **kwargs: Any) -> Collection:
    """Preshuffle AnnData artifacts into shards saved as artifacts and the collection ``key``.

    The shards (``{key}/part-00000.zarr``, ...) are written by
    :func:`lamin_io.loaders.preshuffle` (``seed``, ``obs_keys``, ``shard_bytes``; the
    sources read where they lie) and saved one by one as they are written. A failure
    deletes the shards this call registered (not those an earlier run with the same key and
    seed had saved) and re-raises.
    """
    import shutil

    from lamin_io.loaders import preshuffle
    from lamin_io.registry._artifact import anndata_members

    validate_key(key, suffix=None)
    members = anndata_members(list(artifacts))
    names = [a.key or a.uid for a in members]
    if len(set(names)) < len(names):  # (versions of one key: told apart by uid)
        names = [a.uid for a in members]
    before = {a.uid for a in Artifact.filter(key__startswith=f"{key}/")}
    saved: list[Artifact] = []

    def save(path: Path) -> None:
        saved.append(Artifact(path, key=f"{key}/{path.name}", description=description
                              ).save(mute=mute))
        shutil.rmtree(path, ignore_errors=True)

    ds = ArtifactSet(members).mapped(layers_keys=layer, obs_filter=obs_filter, join=join,
                                     stream=True, is_run_input=is_run_input)
    try:
        preshuffle(ds, None, names=names, tag=key, on_shard=save, tmp_dir=tmp_dir,
                   mute=mute, **kwargs)
        return Collection(saved, key=key, description=description).save()
    except BaseException:
        for artifact in saved:  # (no half-made result: the shards this call saved go)
            if artifact.uid not in before:
                try:
                    artifact.delete()
                except Exception:  # noqa: BLE001 (the first error is the one to raise)
                    logger.warning("could not delete shard %s after a failed preshuffle",
                                   artifact.key)
        raise
    finally:
        ds.close()
