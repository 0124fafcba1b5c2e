"""Importing a registry export into the current registry, in one transaction.

The export is checked whole before anything is written: its manifest (format, schema
version, tables and columns), every parquet file (readable, with the columns and types
named), and every table's row count and checksum, each foreign key resolved to an exported
row. Then, in one write transaction of the target registry:

1. ``if_exists``: ``"fail"`` refuses a target that holds records (storage roots aside),
   ``"replace"`` deletes them all first, ``"append"`` merges;
2. storage roots, re-pointed by ``storage_map``, are matched by root and reused as the
   target holds them, or inserted;
3. every other table, in foreign-key order, is streamed in batches: a row whose natural key
   the target holds is skipped when its content is the same (ids and a record's place in
   its family aside) and refused with :class:`~lamin_io.errors.ImportConflictError`
   otherwise; a new row gets a new id, and its foreign keys the target's ids of the rows
   they name;
4. on append, the new versions of a family the target holds are placed after its newest
   when their places are taken (a label lamin-io numbered follows its new place), and
   ``is_latest`` is settled per family;
5. every table is read back, and its rows' count and checksum compared with the export's:
   a difference rolls everything back.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

from lamin_io.errors import (
    ImportConflictError,
    InvalidArgumentError,
    RegistryError,
)
from lamin_io.registry._connection import _normalize_root, current
from lamin_io.registry._exchange import (
    BATCH_ROWS,
    NOT_IMPORTED,
    REUSED,
    Checksum,
    Keys,
    TableSpec,
    canonical,
    specs,
)
from lamin_io.registry._export_check import CheckedExport, read_manifest
from lamin_io.registry._record import refresh_latest
from lamin_io.storage import ProgressCallback

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Connection

__all__ = ["IF_EXISTS", "ImportReport", "import_registry"]

logger = logging.getLogger(__name__)

IF_EXISTS = ("fail", "replace", "append")


@dataclass
class ImportReport:
    """What :func:`import_registry` did (with ``dry_run``: would do).

    Attributes
    ----------
    directory, registry, if_exists, dry_run
        The export folder, the target registry and the options.
    rows
        Rows of each table in the export.
    inserted
        Rows written, by table.
    skipped
        Rows the target held already (same content), storage roots reused included.
    deleted
        Rows deleted first (``if_exists="replace"``).
    renumbered
        Versions placed after the target's newest of their family (``"artifact <uid>:
        version 3 -> 5"``).
    """

    directory: str
    registry: str
    if_exists: str
    dry_run: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    inserted: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    renumbered: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{name} {self.inserted.get(name, 0)}"
                 + (f" (+{self.skipped[name]} there already)" if self.skipped.get(name) else "")
                 for name in self.inserted if self.rows.get(name)]
        text_ = (f"{'would import' if self.dry_run else 'imported'} "
                 f"{sum(self.inserted.values())} row(s) from {self.directory} into "
                 f"{self.registry} ({', '.join(parts)})")
        if self.deleted:
            text_ += (f"; {'would delete' if self.dry_run else 'deleted'} "
                      f"{sum(self.deleted.values())} row(s) first")
        if self.renumbered:
            text_ += (f"; {len(self.renumbered)} version(s) placed after their family's "
                      f"newest")
        return text_


class _DryRun(Exception):  # noqa: N818 (not an error: unwinds the transaction)
    pass


def import_registry(directory: str | os.PathLike[str], if_exists: str = "fail", *,
                    storage_map: Mapping[str, str] | None = None, dry_run: bool = False,
                    mute: bool = False) -> ImportReport:
    """Load a registry export into the current registry (SQLite or PostgreSQL).

    Everything happens in one transaction, after the export was checked whole: a damaged
    export, one of a newer schema, or a conflict with the target writes nothing. Ids are
    re-mapped, so collections, versions and runs point at the right rows; afterwards every
    table's count and checksum are compared with the export's. The bytes are not copied:
    the records point at the storage roots they name (see ``storage_map``).

    Parameters
    ----------
    directory
        A folder written by :func:`export_registry`.
    if_exists
        What to do when the target holds records: ``"fail"`` (default: refuse),
        ``"replace"`` (delete them all first, storage roots kept; their bytes stay in
        storage) or ``"append"`` (merge: a uid the target holds with the same content is
        skipped, with other content refused; new versions of a family whose places are
        taken are placed after the target's newest; ``is_latest`` settled per family).
    storage_map
        ``{old root: new root}``: re-point the records of a storage root whose bytes were
        moved. A root the target holds is reused with its own settings; a record's state
        at save (ETag, time) is cleared where its root is re-pointed. Roots not named stay.
    dry_run
        Do everything, then roll back: report what would be imported.
    mute
        No progress bars.

    Returns
    -------
    ImportReport
        Rows inserted, skipped, deleted and renumbered, per table.

    Raises
    ------
    ExportError
        The export is damaged (missing or truncated file, count or checksum mismatch).
    SchemaVersionError
        It was written by a newer lamin-io, or by an older one with columns this one
        cannot fill.
    ImportConflictError
        The target holds records (``"fail"``), or other content under a uid of the export
        (``"append"``).

    Examples
    --------
    >>> import lamin_io as ln                                             # doctest: +SKIP
    >>> ln.connect("postgresql://me@db.example.org/lamin", "s3://new-bucket/data")
    >>> ln.import_registry("backup/2026-12-06",
    ...                    storage_map={"s3://old-bucket/data": "s3://new-bucket/data"})
    """
    if if_exists not in IF_EXISTS:
        msg = f"if_exists must be one of {', '.join(map(repr, IF_EXISTS))}, got {if_exists!r}"
        raise InvalidArgumentError(msg)
    folder = Path(os.fspath(directory)).expanduser().resolve()
    manifest = read_manifest(folder)
    source = CheckedExport(folder, manifest, _normalize_map(storage_map),
                           append=if_exists == "append")
    source.check(mute=mute)
    conn = current()
    report = ImportReport(str(folder), conn.registry, if_exists, dry_run,
                          rows={name: int(t["rows"]) for name, t in manifest["tables"].items()
                                if name not in NOT_IMPORTED})
    try:
        with conn.db.write() as c:
            _Load(c, conn.db.dialect, source, report, if_exists).run(mute=mute)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    except IntegrityError as exc:
        msg = (f"importing {folder} into {conn.registry} broke a constraint of the target "
               f"({str(exc.orig).splitlines()[0]}); nothing was imported")
        raise ImportConflictError(msg) from None
    logger.info("%s", report)
    return report


def _normalize_map(storage_map: Mapping[str, str] | None) -> dict[str, str]:
    if storage_map is None:
        return {}
    if not isinstance(storage_map, Mapping):
        msg = f"storage_map must be a dict {{old root: new root}}, got {storage_map!r}"
        raise InvalidArgumentError(msg)
    return {_normalize_root(old): _normalize_root(new) for old, new in storage_map.items()}


# -- the target ----------------------------------------------------------------------------

class _Load:
    """One import into the target registry, inside its write transaction."""

    def __init__(self, c: Connection, dialect: str, source: CheckedExport,
                 report: ImportReport, if_exists: str) -> None:
        self.c, self.dialect, self.source, self.report = c, dialect, source, report
        self.if_exists = if_exists
        self.append = if_exists == "append"
        self.all = [spec for spec in specs() if spec.name not in NOT_IMPORTED]
        #: Target ids by natural key, and (append) content digests by natural key.
        self.ids: dict[str, dict[tuple[Any, ...], int | None]] = {}
        self.content: dict[str, dict[tuple[Any, ...], bytes]] = {}
        #: Target natural keys by id, for the tables referenced.
        self.keys: Keys = {}
        #: A new row's id is its exported id plus its table's offset (the target's largest
        #: id before the import; ids are kept in an empty one); a row the target held
        #: keeps its own, in ``matched``.
        self.offset: dict[str, int] = {}
        self.matched: dict[str, dict[int, int]] = defaultdict(dict)
        #: Families (by table) that gained versions in a target that held them.
        self.touched: dict[str, set[str]] = defaultdict(set)

    def run(self, *, mute: bool) -> None:
        """Clear or check the target, load every table, settle families, verify."""
        self._clear()
        self._read_target()
        for spec in self.source.specs:
            if spec.name not in NOT_IMPORTED:
                self._load(spec, mute=mute)
        if self.dialect == "postgresql" and not self.report.dry_run:
            for spec in self.all:
                if spec.surrogate is not None and self.report.inserted.get(spec.name):
                    self.c.execute(text(
                        f"SELECT setval(pg_get_serial_sequence('{spec.name}', "
                        f"'{spec.surrogate}'), (SELECT MAX({spec.surrogate}) FROM {spec.name}))"))
        for name, families in self.touched.items():
            table = next(spec.table for spec in self.all if spec.name == name)
            for family in families:
                refresh_latest(self.c, table, family)
        if self.append:
            for spec in self.all:
                if spec.versioned and "key" in spec.table.c:
                    self._check_keys(spec)
        # what only loading needed goes before the tables are read back
        self.ids, self.content, self.keys = {}, {}, {}
        self.matched.clear()
        self.source.keys = self.source.mapped = {}
        self._verify()

    def _clear(self) -> None:
        data = [spec for spec in self.all if spec.name not in REUSED]
        if self.if_exists == "fail":
            held = {spec.name: self.c.execute(select(func.count()).select_from(spec.table))
                    .scalar_one() for spec in data}
            held = {name: n for name, n in held.items() if n}
            if held:
                counts = ", ".join(f"{n} {name}" for name, n in held.items())
                msg = (f"registry {self.report.registry} holds records already ({counts}): "
                       f"import into an empty registry, or pass if_exists='append' (merge) "
                       f"or 'replace' (delete them first)")
                raise ImportConflictError(msg)
        elif self.if_exists == "replace":
            for spec in reversed(data):
                done = self.c.execute(delete(spec.table)).rowcount
                if done:
                    self.report.deleted[spec.name] = done

    def _rows(self, spec: TableSpec) -> Iterator[Any]:
        result = self.c.execute(select(spec.table).execution_options(yield_per=BATCH_ROWS))
        for part in result.partitions():
            yield from (r._mapping for r in part)

    def _read_target(self) -> None:
        referenced = {name for spec in self.all for name in spec.fks.values()}
        for spec in self.all:
            ids = self.ids.setdefault(spec.name, {})
            content = self.content.setdefault(spec.name, {})
            columns = spec.digest_columns(self._columns(spec), placement=False)
            keep = self.append and spec.name not in REUSED and spec.name in self.source.tables
            for row in self._rows(spec):
                nk = spec.natural_key(row, self.keys)
                sid = row[spec.surrogate] if spec.surrogate else None
                if sid is not None and spec.name in referenced:
                    self.keys.setdefault(spec.name, {})[sid] = nk
                ids[nk] = sid
                if keep:
                    content[nk] = spec.digest(row, self.keys, columns)

    def _columns(self, spec: TableSpec) -> tuple[str, ...]:
        return self.source.columns(spec) if spec.name in self.source.tables else spec.columns

    def _load(self, spec: TableSpec, *, mute: bool) -> None:
        name, source = spec.name, self.source
        columns = self._columns(spec)
        content_columns = spec.digest_columns(columns, placement=False)
        ids, content, matched = self.ids[name], self.content[name], self.matched[name]
        offset = 0
        if spec.surrogate is not None:
            top = self.c.execute(select(func.max(spec.table.c[spec.surrogate]))).scalar()
            self.offset[name] = offset = int(top or 0)
        placements = self._placements(spec) if self.append and spec.versioned else {}
        uniques = self._uniques(spec, columns) if self.append or source.merged_roots else []
        inserted = skipped = 0
        with ProgressCallback(f"importing {name}", mute=mute, threshold=0, unit="rows") as bar:
            bar.set_size(source.tables[name]["rows"])
            for rows in source.batches(spec):
                pending = []
                for original in rows:
                    row = source.prepare(spec, original)
                    nk = spec.natural_key(row, source.mapped)
                    if nk in ids:
                        if name not in REUSED and content.get(nk) != spec.digest(
                                row, source.mapped, content_columns):
                            raise ImportConflictError(self._conflict(spec, nk, row))
                        if spec.surrogate is not None:
                            matched[row[spec.surrogate]] = ids[nk]  # type: ignore[assignment]
                        skipped += 1
                        continue
                    values = {c: row[c] for c in columns}
                    for column, target in spec.fks.items():
                        value = values.get(column)
                        if value is not None:
                            values[column] = self.matched[target].get(
                                value, value + self.offset[target])
                    if spec.surrogate is not None:
                        values[spec.surrogate] += offset
                    values.update(placements.get(nk, {}))
                    for unique, seen in uniques:
                        self._claim(spec, unique, seen, values, nk)
                    if name in REUSED and spec.surrogate is not None:  # (a second root
                        ids[nk] = values[spec.surrogate]  # re-pointed to this one reuses it)
                    pending.append(values)
                if pending:
                    self.c.execute(spec.table.insert(), pending)
                    inserted += len(pending)
                bar.relative_update(len(rows))
        self.report.inserted[name] = inserted
        if skipped:
            self.report.skipped[name] = skipped

    def _conflict(self, spec: TableSpec, nk: tuple[Any, ...], row: dict[str, Any]) -> str:
        what = f"{spec.name} {nk[0] if len(nk) == 1 else nk}"
        differ = ""
        if "uid" in spec.key:
            held = self.c.execute(select(spec.table).where(spec.table.c.uid == nk[0])).one()
            names = [c for c in spec.digest_columns(self._columns(spec), placement=False)
                     if canonical(spec.value(c, held._mapping[c], self.keys))
                     != canonical(spec.value(c, row[c], self.source.mapped))]
            differ = f" (differs in {', '.join(names)})" if names else ""
        return (f"{what} is in registry {self.report.registry} with other content than in the "
                f"export {self.source.folder}{differ}: nothing was imported; delete it from "
                f"the registry, or import into another one")

    def _uniques(self, spec: TableSpec, columns: tuple[str, ...]
                 ) -> list[tuple[tuple[str, ...], set[tuple[Any, ...]]]]:
        """Return the target's values of each unique column set (to name a clash)."""
        out = []
        for unique in spec.unique_sets():
            if spec.surrogate in unique or not set(unique) <= set(columns):
                continue
            cols = [spec.table.c[c] for c in unique]
            out.append((unique, {tuple(r) for r in self.c.execute(select(*cols))}))
        return out

    def _claim(self, spec: TableSpec, unique: tuple[str, ...], seen: set[tuple[Any, ...]],
               values: dict[str, Any], nk: tuple[Any, ...]) -> None:
        value = tuple(values.get(c) for c in unique)
        if None in value:
            return
        if value in seen:
            shown = {c: v for c, v in zip(unique, value, strict=True) if c not in spec.fks}
            msg = (f"{spec.name} {nk[0] if len(nk) == 1 else nk} cannot be imported into "
                   f"registry {self.report.registry}: another {spec.name} there (or in the "
                   f"export) has the same {', '.join(unique)} ({shown}); nothing was "
                   f"imported")
            raise ImportConflictError(msg)
        seen.add(value)

    def _placements(self, spec: TableSpec) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Return new places for appended versions of families the target holds."""
        t, name = spec.table, spec.name
        held: dict[str, tuple[int, set[int], dict[str, str]]] = {}
        for uid, family, index, label in self.c.execute(
                select(t.c.uid, t.c.family_uid, t.c.version_index, t.c.version)):
            top, taken, labels = held.setdefault(family, (0, set(), {}))
            held[family] = (max(top, index), taken | {index}, {**labels, label: uid})
        incoming: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
        for uid, family, index, label in self.source.versions.get(name, []):
            if (uid,) not in self.ids[name] and family in held:
                incoming[family].append((index, uid, label))
        out: dict[tuple[Any, ...], dict[str, Any]] = {}
        for family, rows in incoming.items():
            top, taken, labels = held[family]
            rows.sort()
            self.touched[name].add(family)
            if any(index in taken for index, _, _ in rows):
                for place, (index, uid, label) in enumerate(rows, start=top + 1):
                    new = str(place) if label == str(index) else label
                    out[(uid,)] = {"version_index": place, "version": new}
                    self.report.renumbered.append(f"{name} {uid}: version {label} -> {new}")
            for _, uid, label in rows:
                final = out.get((uid,), {}).get("version", label)
                if final in labels:
                    msg = (f"{name} {uid} is version {final!r} of family {family} in the "
                           f"export, and {name} {labels[final]} is that version in registry "
                           f"{self.report.registry}: nothing was imported; give one of them "
                           f"another version label")
                    raise ImportConflictError(msg)
        return out

    def _check_keys(self, spec: TableSpec) -> None:
        """Refuse an append after which one key names the latest versions of two families.

        Saving under a key makes a version of the family whose latest version has it; two
        would leave ``get(key=)`` two latest versions to choose from. Checked once loaded
        (families the export moves to other keys free theirs), for keys of families the
        export brings.
        """
        t, name = spec.table, spec.name
        incoming = {family for _, family, _, _ in self.source.versions.get(name, [])}
        if not incoming:
            return
        latest: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key, family, uid in self.c.execute(
                select(t.c.key, t.c.family_uid, t.c.uid).where(t.c.is_latest.is_(True),
                                                               t.c.key.is_not(None))):
            latest[key].append((family, uid))
        for key, rows in sorted(latest.items()):
            families = {family for family, _ in rows}
            if len(families) > 1 and families & incoming:
                uids = " and ".join(f"{name} {uid}" for _, uid in sorted(
                    rows, key=lambda r: r[0] not in incoming))
                msg = (f"after this import, key {key!r} would name the latest versions of "
                       f"{len(families)} families in registry {self.report.registry} "
                       f"({uids}): nothing was imported; move one of them to another key "
                       f"first (save a version with revises= and key=), or import into "
                       f"another registry")
                raise ImportConflictError(msg)

    def _verify(self) -> None:
        """Read every imported table back; its count and checksum must be the export's."""
        keys: Keys = {}
        for spec in self.all:
            expected = self.source.expected.get(spec.name)
            total = self.source.totals.get(spec.name)
            columns = spec.digest_columns(self._columns(spec), placement=not self.append)
            actual, found = Checksum(), 0
            for row in self._rows(spec):
                nk = spec.natural_key(row, keys)
                if spec.surrogate is not None:
                    keys.setdefault(spec.name, {})[row[spec.surrogate]] = nk
                if (nk in expected) if expected is not None else total is not None:
                    found += 1
                    if spec.name not in REUSED:
                        actual.add(spec.digest(row, keys, columns))
            if expected is not None:
                want = Checksum()
                for digest in ([] if spec.name in REUSED else expected.values()):
                    want.add(digest)
                total = (len(expected), want.hexdigest())
            if total is None:
                continue
            got = actual.hexdigest()
            if (found, got) != total:
                msg = (f"after importing, table {spec.name} of registry "
                       f"{self.report.registry} does not match the export ({found} rows "
                       f"found of {total[0]}, checksum {'same' if got == total[1] else 'differs'}"
                       f"): rolled back, nothing was imported")
                raise RegistryError(msg)
