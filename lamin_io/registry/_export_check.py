"""An export folder read back for import: its manifest, then its rows checked whole.

:func:`read_manifest` checks the manifest against this lamin-io's schema; a
:class:`CheckedExport` reads every table once, before the target registry is touched, and
keeps what loading and verifying need: the exported ids' natural keys, and each table's
rows in the target's terms (storage roots re-pointed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_io.errors import ExportError, InvalidArgumentError, SchemaVersionError
from lamin_io.registry import _schema as s
from lamin_io.registry._exchange import (
    BATCH_ROWS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    NOT_IMPORTED,
    REUSED,
    Checksum,
    Keys,
    TableSpec,
    arrow_schema,
    specs,
)
from lamin_io.storage import ProgressCallback

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["CheckedExport", "read_manifest"]

#: A root re-pointed to another protocol gets no endpoint: connecting to it records its own.
_NEUTRAL_SETTINGS = json.dumps({"endpoint_url": None, "anon": False, "region": None})
#: What a record keeps of its stored object's state at save, cleared when its storage root
#: is re-pointed: the copy's ETag, time and inode are not the original's.
_STATE_AT_SAVE = ("fingerprint",)


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and check an export's manifest against this lamin-io's schema.

    Raises
    ------
    ExportError
        No manifest, or a damaged one.
    SchemaVersionError
        A newer schema, or an older one whose layout cannot be imported.
    """
    path = folder / MANIFEST
    if not folder.is_dir():
        msg = f"{folder} is no folder: give the folder `lamin-io export` wrote"
        raise ExportError(msg)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        msg = (f"{folder} holds no {MANIFEST}: it is no registry export, or its export did "
               f"not finish; export again")
        raise ExportError(msg) from None
    except (OSError, ValueError) as exc:
        msg = f"the manifest {path} cannot be read ({exc}): the export is damaged"
        raise ExportError(msg) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        msg = f"{path} is no lamin-io registry export manifest (no format {FORMAT!r})"
        raise ExportError(msg)
    version, layout = manifest.get("schema_version"), manifest.get("format_version")
    tables = manifest.get("tables")
    if not (isinstance(version, int) and isinstance(layout, int) and isinstance(tables, dict)
            and all(_entry_ok(name, entry) for name, entry in tables.items())):
        msg = f"the manifest {path} is damaged: a field is missing or of the wrong type"
        raise ExportError(msg)
    if version > s.SCHEMA_VERSION or layout > FORMAT_VERSION:
        msg = (f"the export in {folder} has schema version {version} (export format "
               f"{layout}), newer than this lamin-io understands ({s.SCHEMA_VERSION}, "
               f"{FORMAT_VERSION}): upgrade lamin-io to import it")
        raise SchemaVersionError(msg)
    _check_layout(folder, version, tables)
    return manifest


def export_roots(folder: Path) -> list[str]:
    """Return the storage roots an export's records point at (its ``storage`` table).

    An empty list where the export cannot be read: importing it says what is wrong.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        entry = read_manifest(folder)["tables"].get(s.storage.name)
        if entry is None:
            return []
        table = pq.read_table(folder / entry["file"], columns=["root"])
    except (ExportError, SchemaVersionError, OSError, KeyError, pa.ArrowException):
        return []
    return [str(root) for root in table.column("root").to_pylist()]


def _entry_ok(name: Any, entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str)
            and entry["file"] == Path(entry["file"]).name and entry["file"].endswith(".parquet")
            and isinstance(entry.get("rows"), int) and entry["rows"] >= 0
            and isinstance(entry.get("checksum"), str) and len(entry["checksum"]) == 64
            and isinstance(entry.get("columns"), list)
            and all(isinstance(c, str) for c in entry["columns"]))


def _check_layout(folder: Path, version: int, tables: dict[str, Any]) -> None:
    """Check the export's tables and columns against the schema; older layouts if they fit.

    An export of an older schema is imported when its tables and columns all exist here
    and each column it lacks may be NULL or has a default (what adding a column or a table
    does); the columns it lacks are then left to NULL or their default.
    """
    known = {spec.name: spec for spec in specs()}
    for name, entry in tables.items():
        spec = known.get(name)
        unknown = [name] if spec is None else [
            f"{name}.{c}" for c in entry["columns"] if c not in spec.columns]
        if unknown:
            if version < s.SCHEMA_VERSION:
                msg = (f"the export in {folder} (schema {version}) holds {', '.join(unknown)}, "
                       f"which schema {s.SCHEMA_VERSION} has no more: import it with the "
                       f"lamin-io version that wrote it")
                raise SchemaVersionError(msg)
            msg = (f"the manifest of {folder} names {', '.join(unknown)}, not in schema "
                   f"{version}: the export is damaged")
            raise ExportError(msg)
    for name, spec in known.items():
        entry = tables.get(name)
        missing = list(spec.columns) if entry is None else [
            c for c in spec.columns if c not in entry["columns"]]
        if not missing:
            continue
        if version == s.SCHEMA_VERSION:
            what = f"table {name}" if entry is None else f"{name}.{', '.join(missing)}"
            msg = f"the export in {folder} lacks {what}: the export is damaged; export again"
            raise ExportError(msg)
        required = [c for c in missing if entry is not None and not spec.table.c[c].nullable
                    and spec.table.c[c].default is None
                    and spec.table.c[c].server_default is None]
        if required:
            msg = (f"the export in {folder} (schema {version}) lacks {name}."
                   f"{', '.join(required)}, which schema {s.SCHEMA_VERSION} needs: upgrade the "
                   f"registry it came from to this lamin-io and export it again")
            raise SchemaVersionError(msg)


def _protocol(root: str) -> str:
    return root.split("://", 1)[0] if "://" in root else "file"


class CheckedExport:
    """An export folder: its rows, checked whole before the target is touched."""

    def __init__(self, folder: Path, manifest: dict[str, Any], moves: dict[str, str], *,
                 append: bool) -> None:
        self.folder, self.manifest, self.moves, self.append = folder, manifest, moves, append
        self.tables: dict[str, Any] = manifest["tables"]
        self.specs = [spec for spec in specs() if spec.name in self.tables]
        self.referenced = {name for spec in self.specs for name in spec.fks.values()}
        #: Natural keys by exported id, as exported and with storage roots re-pointed.
        self.keys: Keys = {}
        self.mapped: Keys = {}
        #: Re-pointed storage roots, by exported storage id.
        self.moved: dict[int, str] = {}
        #: Each imported table's rows in the target's terms: their digests by natural key
        #: where the target may hold other rows too (append; storage roots), else only
        #: their count and checksum (the target's table then holds these rows alone).
        self.expected: dict[str, dict[tuple[Any, ...], bytes]] = {}
        self.totals: dict[str, tuple[int, str]] = {}
        #: Versioned tables' ``(uid, family, version_index, version)`` (append only).
        self.versions: dict[str, list[tuple[str, str, int, str]]] = {}
        #: Whether two exported roots end up as one (their keys may then collide).
        self.merged_roots = False

    def columns(self, spec: TableSpec) -> tuple[str, ...]:
        """Return the table's columns in the export."""
        return tuple(self.tables[spec.name]["columns"])

    def batches(self, spec: TableSpec) -> Iterator[list[dict[str, Any]]]:
        """Yield the table's rows, a batch at a time."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        entry = self.tables[spec.name]
        path = self.folder / entry["file"]
        try:
            parquet = pq.ParquetFile(path)
            want = arrow_schema(spec, entry["columns"])
            got = parquet.schema_arrow
            if got.names != want.names or any(got.field(f.name).type != f.type for f in want):
                msg = (f"{path} holds columns {', '.join(got.names)} where the manifest "
                       f"names {', '.join(want.names)} (or of other types): the export is "
                       f"damaged")
                raise ExportError(msg)
            if parquet.metadata.num_rows != entry["rows"]:
                msg = (f"{path} holds {parquet.metadata.num_rows} rows where the manifest "
                       f"counts {entry['rows']}: the export is damaged")
                raise ExportError(msg)
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
                yield batch.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            msg = f"cannot read {path} ({exc}): the export is damaged or incomplete"
            raise ExportError(msg) from None

    def prepare(self, spec: TableSpec, row: dict[str, Any]) -> dict[str, Any]:
        """Return the row as it is imported: re-pointed storage roots, state at save cleared."""
        if not self.moved:
            return row
        if spec.name == "storage" and row["id"] in self.moved:
            old, new = str(row["root"]), self.moved[row["id"]]
            row = {**row, "root": new}
            if _protocol(new) != _protocol(old):
                row["settings"] = _NEUTRAL_SETTINGS
        for column, target in spec.fks.items():
            if target == "storage" and row.get(column) in self.moved:
                row = {**row, **{c: None for c in _STATE_AT_SAVE if c in row}}
        return row

    def check(self, *, mute: bool) -> None:
        """Read every table once: count, checksum and references against the manifest."""
        for spec in self.specs:
            entry = self.tables[spec.name]
            columns = self.columns(spec)
            raw = spec.digest_columns(columns)
            wanted = spec.digest_columns(columns, placement=not self.append)
            checksum = Checksum()
            sink: dict[tuple[Any, ...], bytes] | Checksum | None = None
            if spec.name not in NOT_IMPORTED:
                sink = {} if self.append or spec.name in REUSED else Checksum()
            with ProgressCallback(f"checking {spec.name}", mute=mute, threshold=0,
                                  unit="rows") as bar:
                bar.set_size(entry["rows"])
                for rows in self.batches(spec):
                    for row in rows:
                        try:
                            self._check_row(spec, row, raw, wanted, checksum, sink)
                        except KeyError:
                            msg = (f"{self.folder / entry['file']}: a row of {spec.name} "
                                   f"names a row the export does not hold: the export is "
                                   f"damaged")
                            raise ExportError(msg) from None
                    bar.relative_update(len(rows))
            if len(checksum) != entry["rows"] or checksum.hexdigest() != entry["checksum"]:
                msg = (f"{self.folder / entry['file']} does not match its manifest "
                       f"({len(checksum)} rows, {entry['rows']} counted; checksum "
                       f"{'differs' if len(checksum) == entry['rows'] else 'not checked'}): "
                       f"the export is damaged")
                raise ExportError(msg)
            if isinstance(sink, dict):
                self.expected[spec.name] = sink
            elif sink is not None:
                self.totals[spec.name] = (len(sink), sink.hexdigest())
            if spec.name == "storage":
                self._check_moves()

    def _check_row(self, spec: TableSpec, row: dict[str, Any], raw: tuple[str, ...],
                   wanted: tuple[str, ...], checksum: Checksum,
                   sink: dict[tuple[Any, ...], bytes] | Checksum | None) -> None:
        digest = spec.digest(row, self.keys, raw)
        checksum.add(digest)
        if spec.name == "storage":
            new = self.moves.get(row["root"], row["root"])
            if new != row["root"]:
                self.moved[row["id"]] = new
        sid = row[spec.surrogate] if spec.surrogate is not None else None
        referenced = spec.name in self.referenced and sid is not None
        if not referenced and sink is None:
            return
        nk = spec.natural_key(row, self.keys)
        if referenced:
            self.keys.setdefault(spec.name, {})[sid] = nk  # type: ignore[index]
        if sink is None:
            return
        ready = self.prepare(spec, row)
        if self.mapped is not self.keys:  # (storage roots re-pointed)
            nk = spec.natural_key(ready, self.mapped)
            if referenced:
                self.mapped.setdefault(spec.name, {})[sid] = nk  # type: ignore[index]
        if isinstance(sink, Checksum):
            sink.add(digest if ready is row and wanted == raw
                     else spec.digest(ready, self.mapped, wanted))
            return
        expected = sink
        if nk in expected:
            if spec.name in REUSED:  # (two roots re-pointed to one)
                self.merged_roots = True
                return
            msg = f"{spec.name} {nk} is in the export twice: the export is damaged"
            raise ExportError(msg)
        if spec.name in REUSED:
            expected[nk] = b""
        elif ready is row and wanted == raw:
            expected[nk] = digest
        else:
            expected[nk] = spec.digest(ready, self.mapped, wanted)
        if self.append and spec.versioned:
            self.versions.setdefault(spec.name, []).append(
                (row["uid"], row["family_uid"], int(row["version_index"]), str(row["version"])))

    def _check_moves(self) -> None:
        if not self.moved:  # (the natural keys as exported are those imported)
            self.mapped = self.keys
        roots = {nk[0] for nk in self.keys.get("storage", {}).values()}
        unknown = sorted(set(self.moves) - roots)
        if unknown:
            msg = (f"storage_map names {', '.join(unknown)}, no storage root of the export "
                   f"(its roots: {', '.join(sorted(roots)) or 'none'})")
            raise InvalidArgumentError(msg)
