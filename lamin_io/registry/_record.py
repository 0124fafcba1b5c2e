"""What artifacts and collections share: uids, versions, queries and list-like results."""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar, overload

from sqlalchemy import func, select, update

from lamin_io.errors import (
    ArtifactNotFoundError,
    InvalidArgumentError,
    MultipleResultsError,
    RegistryMismatchError,
)
from lamin_io.registry import _schema as s
from lamin_io.registry._connection import current
from lamin_io.registry._query import conditions, ordering

if TYPE_CHECKING:
    import os
    from datetime import datetime

    import pandas as pd
    from sqlalchemy import Connection, Row, Table

    from lamin_io.registry._connection import Connection as Registry
    from lamin_io.registry._run import Run, Transform

__all__ = ["READY", "Record", "RecordSet", "Versioned", "new_uid"]

READY, PENDING, DELETING = "ready", "pending", "deleting"
_ALPHABET = string.ascii_letters + string.digits


def new_uid() -> str:
    """Return a random 16-character base62 uid."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(16))


class Record:
    """Base of every record (artifacts, collections, runs, transforms): one row of a table."""

    _table: ClassVar[Table]
    _kind: ClassVar[str]
    _fields: ClassVar[tuple[str, ...]]
    _row: Row[Any] | None
    _set: ClassVar[type[RecordSet[Any]]]
    #: The registry the row was read from or written to (its display URL).
    _registry: str | None = None

    @classmethod
    def _from_row(cls, row: Row[Any], registry: str | None = None) -> Self:
        """Return the record of a row read from ``registry`` (default: the current one)."""
        obj = cls.__new__(cls)
        obj._row = row
        obj._registry = registry if registry is not None else current().registry
        return obj

    def _conn(self) -> Registry:
        """Return the connection, once sure this record is a row of its registry.

        A record read from one registry and used while connected to another would read
        or change the other's rows of the same ids: refused, until reconnected.
        """
        conn = current()
        if self._row is not None and self._registry not in (None, conn.registry):
            msg = (f"this {self._kind} ({self._row.uid}) is a record of registry "
                   f"{self._registry}, but the connection is now to {conn.registry}: "
                   f"connect to {self._registry} again to use it")
            raise RegistryMismatchError(msg)
        return conn

    def _saved(self) -> Row[Any]:
        if self._row is None:
            msg = f"this {self._kind} is not saved yet: call .save() first"
            raise InvalidArgumentError(msg)
        return self._row

    @property
    def uid(self) -> str:
        """Unique id of this record."""
        return str(self._saved().uid)

    @property
    def created_at(self) -> datetime:
        """When the record was written (UTC)."""
        return self._saved().created_at

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or other._table is not self._table:
            return NotImplemented
        if self._row is None or other._row is None:
            return self is other
        return bool(self._row.uid == other._row.uid)

    def __hash__(self) -> int:
        return hash(self._row.uid) if self._row is not None else id(self)

    def _refresh(self) -> None:
        if self._row is None:
            return
        t = self._table
        with self._conn().db.read() as conn:
            row = conn.execute(select(t).where(t.c.id == self._row.id)).one_or_none()
        if row is not None:
            self._row = row

    # -- queries ---------------------------------------------------------------------------

    @classmethod
    def _visible(cls) -> list[Any]:
        """Return the conditions a row meets to be shown: ready (no save or delete in flight)."""
        return [cls._table.c.status == READY]

    @classmethod
    def _related(cls, lookups: dict[str, Any]) -> list[Any]:
        """Turn lookups on related records (popped from ``lookups``) into conditions."""
        return []

    @classmethod
    def _select(cls, lookups: dict[str, Any], order_by: str | Sequence[str] | None = None,
                limit: int | None = None, offset: int = 0) -> list[Self]:
        t = cls._table
        if (limit is not None and (not isinstance(limit, int) or limit < 0)) or (
                not isinstance(offset, int) or offset < 0):
            msg = f"limit and offset must be whole numbers 0 or more, got {limit}, {offset}"
            raise InvalidArgumentError(msg)
        where = [*cls._visible(), *cls._related(lookups), *conditions(t, cls._fields, lookups)]
        stmt = (select(t).where(*where)
                .order_by(*ordering(t, cls._fields, order_by)).offset(offset or None)
                .limit(limit))
        registry = current()
        with registry.db.read() as conn:
            return [cls._from_row(r, registry.registry) for r in conn.execute(stmt).all()]

    @classmethod
    def filter(cls, *, order_by: str | Sequence[str] | None = None, limit: int | None = None,
               offset: int = 0, **lookups: Any) -> RecordSet[Self]:
        """Return the records matching Django-style lookups.

        ``order_by`` names fields (a leading ``-``: descending; default: the order they
        were saved in); ``limit`` and ``offset`` take a page of the result.

        Examples
        --------
        >>> Artifact.filter(key__startswith="proj/", suffix=".h5ad", is_latest=True)
        ... # doctest: +SKIP
        >>> Artifact.filter(size__gt=10**9, order_by="-created_at", limit=20, offset=40)
        ... # doctest: +SKIP
        """
        return cls._set(cls._select(lookups, order_by, limit, offset))

    @classmethod
    def get(cls, uid: str | None = None, *, key: str | None = None,
            version: str | None = None, **lookups: Any) -> Self:
        """Return one record: by ``uid``, or by ``key`` (latest version unless ``version``).

        Raises
        ------
        ArtifactNotFoundError
            Nothing matches.
        MultipleResultsError
            The lookups match several records of different families.
        """
        if uid is not None:
            lookups["uid"] = uid
        if key is not None:
            lookups["key"] = key
        if version is not None:
            lookups["version"] = str(version)
        if not lookups:
            msg = f"{cls.__name__}.get() needs a uid, a key or lookups"
            raise InvalidArgumentError(msg)
        found = cls._select(lookups)
        if not found:
            shown = ", ".join(f"{k}={v!r}" for k, v in lookups.items())
            msg = f"no {cls._kind} matches {shown}; list what exists with `lamin-io ls`"
            raise ArtifactNotFoundError(msg)
        if len(found) > 1 and version is None and uid is None and "is_latest" in cls._fields:
            latest = [r for r in found if r._saved().is_latest]
            families = {r._saved().family_uid for r in found}
            if len(families) == 1 and latest:
                return latest[0]
            if len(latest) == 1 and key is not None:
                return latest[0]
            msg = (f"{len(found)} {cls._kind}s of {len(families)} families match; "
                   f"narrow the query (uid=, version=)")
            raise MultipleResultsError(msg)
        return found[-1]


class Versioned(Record):
    """A record with a key and versions in a family: artifacts and collections."""

    @property
    def key(self) -> str | None:
        """The key, a relative path such as ``"project/pbmc.h5ad"``."""
        return self._saved().key

    @property
    def description(self) -> str | None:
        """Free text given at save."""
        return self._saved().description

    @property
    def version(self) -> str:
        """Version label within the family (``"1"``, ``"2"``, ... unless given)."""
        return str(self._saved().version)

    @property
    def is_latest(self) -> bool:
        """Whether this is the newest version of its family."""
        self._refresh()
        return bool(self._saved().is_latest)

    @property
    def versions(self) -> RecordSet[Self]:
        """All ready versions of this record's family, oldest first."""
        t = self._table
        registry = self._conn()
        with registry.db.read() as conn:
            rows = conn.execute(select(t).where(t.c.family_uid == self._saved().family_uid,
                                                t.c.status == READY)
                                .order_by(t.c.version_index)).all()
        return self._set([type(self)._from_row(r, registry.registry) for r in rows])

    @property
    def run(self) -> Run | None:
        """The run that saved this record (``None``: saved outside a tracked run)."""
        from lamin_io.registry._run import Run

        self._refresh()
        run_id = self._saved().run_id
        if run_id is None:
            return None
        registry = self._conn()
        with registry.db.read() as c:
            row = c.execute(select(s.run).where(s.run.c.id == run_id)).one()
        return Run._from_row(row, registry.registry)

    @property
    def transform(self) -> Transform | None:
        """The transform of the run that saved this record, if any."""
        run = self.run
        return None if run is None else run.transform

    def view_lineage(self, *, image: str | os.PathLike[str] | None = None,
                     depth: int | None = None) -> str:
        """Print and return where this record came from, as a text tree.

        Each level is the run that saved a record (its transform, user, time and status)
        and under it the run's inputs, followed upstream in turn; a run already shown is
        not expanded again. The last lines list the runs that read this record.

        Parameters
        ----------
        image
            Also draw the graph with graphviz into this file (``.svg``, ``.png``, ``.pdf``;
            needs ``pip install 'lamin-io[lineage]'`` and graphviz's ``dot`` program).
        depth
            How many runs upstream to follow (default: all).
        """
        from lamin_io.registry._lineage import view_lineage

        return view_lineage(self, image=image, depth=depth)

    @classmethod
    def _related(cls, lookups: dict[str, Any]) -> list[Any]:
        """``run=`` (a Run or its uid) and ``transform=`` (a Transform, its uid or name).

        They select the records saved by that run, or by any run of that transform.
        """
        out = []
        t = cls._table
        if "run" in lookups:
            value = lookups.pop("run")
            uid = getattr(value, "uid", value)
            out.append(t.c.run_id.in_(select(s.run.c.id).where(s.run.c.uid == uid)))
        if "transform" in lookups:
            value = lookups.pop("transform")
            if hasattr(value, "uid"):
                which = s.transform.c.uid == value.uid
            else:
                which = (s.transform.c.uid == value) | (s.transform.c.name == value)
            runs = select(s.run.c.id).join(s.transform, s.run.c.transform_id == s.transform.c.id)
            out.append(t.c.run_id.in_(runs.where(which)))
        return out


def next_version(conn: Connection, table: Table, family_uid: str,
                 version: str | None) -> tuple[str, int]:
    """Return ``(version label, version index)`` for a new member of a family."""
    max_index = conn.execute(select(func.max(table.c.version_index))
                             .where(table.c.family_uid == family_uid)).scalar()
    index = int(max_index or 0) + 1
    label = str(index) if version is None else str(version)
    taken = conn.execute(select(table.c.id).where(table.c.family_uid == family_uid,
                                                  table.c.version == label)).first()
    if taken is not None:
        msg = f"version {label!r} already exists in this family: choose another label"
        raise InvalidArgumentError(msg)
    return label, index


def refresh_latest(conn: Connection, table: Table, family_uid: str) -> None:
    """Mark the ready member with the highest version index as the family's latest."""
    newest = conn.execute(select(func.max(table.c.version_index))
                          .where(table.c.family_uid == family_uid,
                                 table.c.status == READY)).scalar()
    conn.execute(update(table).where(table.c.family_uid == family_uid)
                 .values(is_latest=(table.c.version_index == (newest or -1))
                         & (table.c.status == READY)))


def family_of(conn: Connection, table: Table, key: str | None,
              revises: Record | None) -> str | None:
    """Return the family a new record joins: ``revises``'s, or that of its key's latest."""
    if revises is not None:
        return str(revises._saved().family_uid)
    if key is None:
        return None
    # pending rows count too: a concurrent first save of this key already chose the family
    row = conn.execute(select(table.c.family_uid)
                       .where(table.c.key == key, table.c.status.in_((READY, PENDING)))
                       .order_by(table.c.is_latest.desc(), table.c.id.desc())).first()
    return None if row is None else str(row.family_uid)


T = TypeVar("T", bound=Record)


class RecordSet(Sequence[T], Generic[T]):
    """A list-like query result with a few conveniences (``df()``, ``one()``, ``first()``)."""

    def __init__(self, records: list[T]) -> None:
        self._records = records

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> Self: ...
    def __getitem__(self, i: int | slice) -> T | Self:
        if isinstance(i, slice):
            return type(self)(self._records[i])
        return self._records[i]

    def __len__(self) -> int:
        return len(self._records)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordSet):
            return [r.uid for r in self] == [r.uid for r in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def first(self) -> T | None:
        """Return the first record, or ``None`` when empty."""
        return self._records[0] if self._records else None

    def one(self) -> T:
        """Return the only record; raise if there are none or several."""
        if len(self._records) != 1:
            cls = ArtifactNotFoundError if not self._records else MultipleResultsError
            msg = f"expected exactly one record, found {len(self._records)}"
            raise cls(msg)
        return self._records[0]

    def df(self) -> pd.DataFrame:
        """Return the records as a pandas DataFrame indexed by uid."""
        import pandas as pd

        rows = [r._summary() for r in self._records]  # type: ignore[attr-defined]
        return pd.DataFrame(rows).set_index("uid") if rows else pd.DataFrame()

    def __repr__(self) -> str:
        if not self._records:
            return f"{type(self).__name__}([])"
        inner = "\n  ".join(repr(r) for r in self._records[:20])
        more = f"\n  ... {len(self) - 20} more" if len(self) > 20 else ""
        return f"{type(self).__name__}([\n  {inner}{more}\n])"
