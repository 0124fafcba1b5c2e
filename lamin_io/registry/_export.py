"""Exporting a registry: every table to one parquet file, plus a manifest, from one snapshot.

:func:`export_registry` writes ``<table>.parquet`` for every table of the schema and then
``manifest.json`` (last: a folder without it is no export) with the schema version and, per
table, its file, columns, natural key, row count and checksum (see
:mod:`~lamin_io.registry._exchange`). All tables are read in one read-only transaction:
saves running meanwhile are wholly in the export or not at all. Only *ready* artifacts and
collections are exported (a pending or deleting record is a save or delete in flight), and
of the other tables the rows whose references are all exported (a collection's member link
goes with both its ends). The bytes stay in storage: records name them by root and key.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select

from lamin_io.errors import ExportError, InvalidArgumentError
from lamin_io.registry._connection import current
from lamin_io.registry._exchange import (
    BATCH_ROWS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    READY_ONLY,
    Checksum,
    Keys,
    TableSpec,
    arrow_schema,
    specs,
)
from lamin_io.registry._record import READY
from lamin_io.storage import ProgressCallback

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pyarrow as pa
    from sqlalchemy import ColumnElement

__all__ = ["ExportReport", "export_registry"]

logger = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """What :func:`export_registry` wrote.

    Attributes
    ----------
    directory
        The export folder.
    schema_version
        The registry's schema version.
    rows
        Rows written, by table.
    """

    directory: str
    schema_version: int
    rows: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        counts = ", ".join(f"{name} {n}" for name, n in self.rows.items() if n)
        return (f"exported {sum(self.rows.values())} row(s) of schema {self.schema_version} "
                f"to {self.directory} ({counts})")


def export_registry(directory: str | os.PathLike[str], *, mute: bool = False) -> ExportReport:
    """Write the current registry to parquet files and a manifest in ``directory``.

    One file per table (types kept: UTC timestamps, booleans, 64-bit integers, nulls;
    foreign keys as ids) and ``manifest.json`` with the schema version, row counts and a
    checksum per table over its rows with ids replaced by uids. The tables are read from
    one consistent snapshot while other processes go on saving. Only ready records are
    exported: saves and deletes in flight are left out. The bytes stay in storage; see
    :func:`import_registry` and the README for moving them.

    Parameters
    ----------
    directory
        A local folder that does not exist yet or is empty.
    mute
        No progress bars (they show only on a terminal anyway).

    Returns
    -------
    ExportReport
        The folder and the rows written per table.

    Raises
    ------
    ExportError
        ``directory`` holds files already, or cannot be written.

    Examples
    --------
    >>> import lamin_io as ln                                             # doctest: +SKIP
    >>> ln.connect("registry.db")
    >>> ln.export_registry("backup/2026-12-06")
    """
    conn = current()
    out = _new_folder(directory)
    written: list[Path] = []
    try:
        report, tables = _write_tables(conn.db, out, written, mute=mute)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "schema_version": report.schema_version,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "registry": conn.registry, "tables": tables,
        }
        partial = out / f".{MANIFEST}.partial"
        written.append(partial)
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        partial.replace(out / MANIFEST)
    except BaseException:
        for path in written:  # (no half-written export left to be taken for one)
            path.unlink(missing_ok=True)
        raise
    logger.info("%s", report)
    return report


def _new_folder(directory: str | os.PathLike[str]) -> Path:
    text = os.fspath(directory)
    if "://" in text:
        msg = (f"export to a local folder, not {text!r}; copy the folder elsewhere "
               f"afterwards if needed")
        raise InvalidArgumentError(msg)
    out = Path(text).expanduser().resolve()
    if out.exists() and not out.is_dir():
        msg = f"cannot export to {out}: it is a file; give a new or empty folder"
        raise ExportError(msg)
    if out.is_dir() and any(out.iterdir()):
        msg = f"cannot export to {out}: it holds files already; give a new or empty folder"
        raise ExportError(msg)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the export folder {out}: {exc}"
        raise ExportError(msg) from exc
    return out


def _write_tables(db: Any, out: Path, written: list[Path], *, mute: bool
                  ) -> tuple[ExportReport, dict[str, Any]]:
    """Write every table from one snapshot; return the report and the manifest's tables."""
    import pyarrow.parquet as pq

    all_specs = specs()
    by_name = {spec.name: spec for spec in all_specs}
    referenced = {name for spec in all_specs for name in spec.fks.values()}
    keys: Keys = {}
    tables: dict[str, Any] = {}
    with db.snapshot() as c:
        version = db.schema_version(c)
        report = ExportReport(str(out), int(version if version is not None else 0))
        for spec in all_specs:
            stmt = select(spec.table).where(*exported(spec, by_name)).order_by(
                *spec.table.primary_key.columns)
            columns = spec.digest_columns(spec.columns)
            schema = arrow_schema(spec)
            checksum = Checksum()
            path = out / f"{spec.name}.parquet"
            written.append(path)
            with ProgressCallback(f"exporting {spec.name}", mute=mute, threshold=0,
                                  unit="rows") as bar, pq.ParquetWriter(path, schema) as writer:
                if bar.enabled:
                    bar.set_size(c.execute(select(func.count()).select_from(
                        stmt.order_by(None).subquery())).scalar_one())
                result = c.execute(stmt.execution_options(yield_per=BATCH_ROWS))
                for part in result.partitions():
                    rows = [r._mapping for r in part]
                    if spec.name in referenced and spec.surrogate is not None:
                        known = keys.setdefault(spec.name, {})
                        known.update((r[spec.surrogate], spec.natural_key(r, keys))
                                     for r in rows)
                    for r in rows:
                        checksum.add(spec.digest(r, keys, columns))
                    writer.write_batch(_batch(schema, rows))
                    bar.relative_update(len(rows))
            tables[spec.name] = {"file": path.name, "rows": len(checksum),
                                 "checksum": checksum.hexdigest(),
                                 "columns": list(spec.columns), "key": list(spec.key)}
            report.rows[spec.name] = len(checksum)
    return report, tables


def exported(spec: TableSpec, by_name: Mapping[str, TableSpec]) -> list[ColumnElement[bool]]:
    """Return the conditions a row of ``spec`` meets to be exported.

    Ready rows only of :data:`READY_ONLY` tables; elsewhere, rows whose foreign keys are
    null or name an exported row (``[]``: every row).
    """
    t = spec.table
    where: list[ColumnElement[bool]] = []
    if spec.name in READY_ONLY:
        where.append(t.c.status == READY)
    for name, target in spec.fks.items():
        inner = exported(by_name[target], by_name)
        if not inner:
            continue
        ref = by_name[target]
        ids = select(ref.table.c[ref.surrogate]).where(*inner)  # type: ignore[index]
        cond = t.c[name].in_(ids)
        where.append(or_(t.c[name].is_(None), cond) if t.c[name].nullable else cond)
    return where


def _batch(schema: pa.Schema, rows: Sequence[Mapping[str, Any]]) -> pa.RecordBatch:
    import pyarrow as pa

    return pa.record_batch([pa.array([r[f.name] for r in rows], type=f.type) for f in schema],
                           schema=schema)
