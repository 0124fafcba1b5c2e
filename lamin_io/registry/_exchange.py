"""What registry export and import share: how each table is keyed, typed and checksummed.

Every table of :mod:`~lamin_io.registry._schema` is handled alike, from its column and
foreign-key metadata, so a table added later is exported and imported with no code here:

* its *natural key* names a row in any registry: ``uid`` where the table has one, else a
  unique column without a foreign key (``storage.root``), else its primary key when that is
  no surrogate id (``collection_artifact``: collection and position), else the columns of
  its unique constraints (``run_input``: run, artifact and collection);
* a foreign key is written as the referenced row's id, and compared and checksummed as the
  natural key of that row, so checksums hold across registries whose ids differ;
* a row's digest is the SHA-256 of its canonical JSON (columns by name, the surrogate id
  left out, foreign keys replaced by natural keys, times as UTC ISO strings); a table's
  checksum is the SHA-256 of its rows' digests in sorted order, so row order is no part
  of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, DateTime, Float, Integer, LargeBinary, UniqueConstraint

from lamin_io.registry import _schema as s

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import pyarrow as pa
    from sqlalchemy import Column, Table

__all__ = [
    "BATCH_ROWS", "FORMAT", "FORMAT_VERSION", "MANIFEST", "NOT_IMPORTED", "READY_ONLY",
    "REUSED", "Checksum", "Keys", "TableSpec", "arrow_schema", "canonical", "specs",
]

FORMAT = "lamin-io-registry-export"
#: The layout of an export folder (manifest fields, file names); the tables' own layout is
#: the registry's schema version, also in the manifest.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Rows read, written and inserted at a time: memory follows this, not the table's size.
BATCH_ROWS = 5_000
#: Tables of records whose ``status`` marks a save or delete in flight: only *ready* rows
#: are exported (and the rows of other tables that point at them).
READY_ONLY = frozenset({s.artifact.name, s.collection.name})
#: Tables whose rows a target registry reuses as it holds them when their natural key is
#: there already: a storage root's settings say how *that* registry reaches it.
REUSED = frozenset({s.storage.name})
#: Tables exported (and checked) but never imported: the target keeps its own.
NOT_IMPORTED = frozenset({s.meta.name})
#: Columns that place a record in its family within one registry (versioned tables): an
#: append may renumber them, so they are no part of a record's content there.
PLACEMENT = ("version", "version_index", "is_latest")

#: Natural keys of referenced rows, by table: ``{table: {id: natural key}}``.
Keys = dict[str, dict[int, tuple[Any, ...]]]


@dataclass(frozen=True)
class TableSpec:
    """How one table is exported and imported.

    Attributes
    ----------
    table
        The SQLAlchemy table.
    surrogate
        Its single auto-incremented integer primary key, if it has one (a new id on import).
    key
        The columns of its natural key (see the module's notes).
    fks
        ``{column: referenced table}`` for each foreign key (they reference surrogate ids).
    """

    table: Table
    surrogate: str | None
    key: tuple[str, ...]
    fks: dict[str, str]

    @property
    def name(self) -> str:
        """The table's name, also its parquet file's stem."""
        return str(self.table.name)

    @property
    def columns(self) -> tuple[str, ...]:
        """All column names, in table order."""
        return tuple(c.name for c in self.table.columns)

    @property
    def versioned(self) -> bool:
        """Whether rows are versions in families (artifacts, collections)."""
        return {"family_uid", "version_index", "is_latest"} <= set(self.columns)

    def unique_sets(self) -> list[tuple[str, ...]]:
        """Column sets the table keeps unique, besides its primary and natural keys."""
        sets = {tuple(c.name for c in con.columns) for con in self.table.constraints
                if isinstance(con, UniqueConstraint)}
        return sorted(cols for cols in sets if cols != self.key)

    def value(self, name: str, value: Any, keys: Keys) -> Any:
        """Return a column's value with a foreign key replaced by its row's natural key.

        Raises ``KeyError`` when the referenced row is not in ``keys``.
        """
        target = self.fks.get(name)
        if target is None or value is None:
            return value
        return keys[target][value]

    def natural_key(self, row: Mapping[str, Any], keys: Keys) -> tuple[Any, ...]:
        """Return the row's natural key, foreign keys resolved through ``keys``."""
        return tuple(self.value(name, row.get(name), keys) for name in self.key)

    def digest_columns(self, exported: Iterable[str], *, placement: bool = True
                       ) -> tuple[str, ...]:
        """Return the columns a digest covers: ``exported`` less the surrogate id.

        ``placement=False`` also leaves out a versioned record's place in its family.
        """
        skip = {self.surrogate} | (set() if placement or not self.versioned else set(PLACEMENT))
        return tuple(sorted(c for c in exported if c not in skip))

    def digest(self, row: Mapping[str, Any], keys: Keys, columns: Iterable[str]) -> bytes:
        """Return the SHA-256 of the row's canonical JSON over ``columns``."""
        values = {name: canonical(self.value(name, row[name], keys)) for name in columns}
        text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).digest()


def canonical(value: Any) -> Any:
    """Return a value as its row digest writes it (times as UTC ISO strings)."""
    if isinstance(value, datetime):  # (SQLite keeps naive UTC times)
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, bytes):
        return value.hex()
    return value


class Checksum:
    """A table's checksum: SHA-256 over its rows' digests in sorted order."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []

    def add(self, digest: bytes) -> None:
        """Count one row's digest."""
        self._digests.append(digest)

    def __len__(self) -> int:
        return len(self._digests)

    def hexdigest(self) -> str:
        """Return the checksum as 64 hex digits."""
        h = hashlib.sha256()
        for digest in sorted(self._digests):
            h.update(digest)
        return h.hexdigest()


def _spec(table: Table) -> TableSpec:
    pk = list(table.primary_key.columns)
    surrogate = pk[0].name if (len(pk) == 1 and isinstance(pk[0].type, Integer)
                               and pk[0].autoincrement in (True, "auto")
                               and not pk[0].foreign_keys) else None
    fks: dict[str, str] = {}
    for column in table.columns:
        for fk in column.foreign_keys:
            target = fk.column.table
            if list(target.primary_key.columns) != [fk.column]:
                msg = f"{table.name}.{column.name} references no surrogate id"
                raise TypeError(msg)
            fks[column.name] = str(target.name)
    unique = sorted((tuple(c.name for c in con.columns) for con in table.constraints
                     if isinstance(con, UniqueConstraint)), key=lambda cols: (len(cols), cols))
    if "uid" in table.c:
        key: tuple[str, ...] = ("uid",)
    elif any(len(cols) == 1 and cols[0] not in fks for cols in unique):
        key = next(cols for cols in unique if len(cols) == 1 and cols[0] not in fks)
    elif surrogate is None:
        key = tuple(c.name for c in pk)
    else:
        named = {name for cols in unique for name in cols}
        key = tuple(c.name for c in table.columns if c.name in named) or tuple(
            c.name for c in table.columns if c.name != surrogate)
    return TableSpec(table, surrogate, key, fks)


def specs() -> list[TableSpec]:
    """Return every table's spec, referenced tables before the tables that reference them."""
    return [_spec(t) for t in s.metadata.sorted_tables]


def arrow_type(column: Column[Any]) -> pa.DataType:
    """Return the Arrow type a column is written as (times: UTC timestamps in µs)."""
    import pyarrow as pa

    kind = column.type
    if isinstance(kind, Boolean):
        return pa.bool_()
    if isinstance(kind, Integer):
        return pa.int64()
    if isinstance(kind, DateTime):
        return pa.timestamp("us", tz="UTC")
    if isinstance(kind, Float):
        return pa.float64()
    if isinstance(kind, LargeBinary):
        return pa.binary()
    return pa.string()


def arrow_schema(spec: TableSpec, columns: Iterable[str] | None = None) -> pa.Schema:
    """Return the Arrow schema of a table's parquet file (of ``columns``, default all)."""
    import pyarrow as pa

    names = spec.columns if columns is None else tuple(columns)
    return pa.schema([pa.field(name, arrow_type(spec.table.c[name]),
                               nullable=bool(spec.table.c[name].nullable)) for name in names])
