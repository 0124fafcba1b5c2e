"""Registry export and import: round trips between SQLite and PostgreSQL, on local and S3
storage, append/replace/fail, dry runs, damaged exports, re-pointed storage, a snapshot
under a concurrent writer, and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anndata as ad
import click
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import _postgres_database, write_bytes
from sqlalchemy import select, update

import lamin_io as ln
from lamin_io import errors, registry
from lamin_io.registry import _schema as s

if TYPE_CHECKING:
    from pathlib import Path

TABLES = (s.transform, s.run, s.artifact, s.collection, s.collection_artifact, s.run_input)


# -- helpers -------------------------------------------------------------------------------

def _utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def records(conn: Any) -> dict[str, list[dict[str, Any]]]:
    """Every row of the record tables, ids left out and foreign keys as uids (roots)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with conn.db.read() as c:
        names = {"storage": {r.id: r.root for r in c.execute(select(s.storage))}}
        for t in (s.transform, s.run, s.artifact, s.collection):
            names[t.name] = {r.id: r.uid for r in c.execute(select(t.c.id, t.c.uid))}
        for t in TABLES:
            rows = []
            for r in c.execute(select(t)):
                row = {k: _utc(v) for k, v in r._mapping.items() if k != "id"}
                for k in list(row):
                    if k.endswith("_id") and row[k] is not None:
                        row[k] = names[k[:-3]][row[k]]
                rows.append(row)
            out[t.name] = sorted(rows, key=repr)
    return out


def dump(conn: Any) -> list[Any]:
    """Every row of every table, ids included: to check that nothing was written."""
    with conn.db.read() as c:
        return [sorted(map(tuple, c.execute(select(t)).all()), key=repr)
                for t in s.metadata.sorted_tables]


def _adata(seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.random((12, 4), dtype=np.float32))
    a.obs["cell_type"] = pd.Categorical(rng.choice(["B", "T"], 12))
    return a


def populate(tmp_path: Path) -> dict[str, Any]:
    """Save versions, an h5ad, a collection of two versions, and a tracked run."""
    tables = [pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]}),
              pd.DataFrame({"x": [4, 5], "y": ["d", None]})]
    src = tmp_path / "src"
    src.mkdir()
    versions = []
    for i, df in enumerate(tables):
        df.to_parquet(src / f"t{i}.parquet")
        versions.append(ln.Artifact(src / f"t{i}.parquet", key="tables/t.parquet",
                                    description=None if i else "first").save())
    adata = _adata(0)
    adata.write_h5ad(src / "cells.h5ad")
    cells = ln.Artifact(src / "cells.h5ad", key="cells/pbmc.h5ad").save()
    ln.Collection([cells, versions[1]], key="atlas").save()
    collection = ln.Collection([versions[0], cells, versions[1]], key="atlas").save()
    if hasattr(registry, "track"):  # lineage: a run that read one artifact, saved another
        with ln.track(name="export-test", params={"k": 1}):
            versions[0].load()
            pd.DataFrame({"z": [7]}).to_parquet(src / "out.parquet")
            ln.Artifact(src / "out.parquet", key="out/z.parquet").save()
    return {"tables": tables, "adata": adata, "collection": collection.uid,
            "members": [a.uid for a in collection.artifacts]}


@pytest.fixture(params=["sqlite", "postgres"])
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A second fresh registry to import into: SQLite, or PostgreSQL when set."""
    import os

    if request.param == "sqlite":
        yield str(tmp_path / "target.db")
        return
    base = os.environ.get("LAMIN_IO_TEST_POSTGRES")
    if not base:
        pytest.skip("LAMIN_IO_TEST_POSTGRES is not set")
    yield from _postgres_database(base)


def _source(tmp_path: Path) -> Any:
    """A SQLite registry on local storage, populated."""
    conn = ln.connect(tmp_path / "source.db", tmp_path / "store")
    populate(tmp_path)
    return conn


# -- round trips ---------------------------------------------------------------------------

def test_round_trip_gives_identical_records_and_working_reads(conn_any_db, target_url,
                                                              tmp_path):
    truth = populate(tmp_path)
    before = records(conn_any_db)
    report = ln.export_registry(tmp_path / "export", mute=True)
    assert report.rows["artifact"] == len(before["artifact"])
    assert report.rows["collection_artifact"] == 5
    storage_roots = {conn_any_db.settings.root}

    target = ln.connect(target_url, tmp_path / "target-store")
    imported = ln.import_registry(tmp_path / "export", mute=True)
    assert imported.inserted["artifact"] == len(before["artifact"])
    assert records(target) == before
    with target.db.read() as c:
        assert storage_roots <= {r.root for r in c.execute(select(s.storage))}

    old, new = ln.Artifact.filter(key="tables/t.parquet", order_by="created_at")
    assert (old.is_latest, new.is_latest) == (False, True)
    assert ln.Artifact.get(key="tables/t.parquet") == new
    pd.testing.assert_frame_equal(new.load(), truth["tables"][1])
    pd.testing.assert_frame_equal(old.open().to_table().to_pandas(), truth["tables"][0])
    cells = ln.Artifact.get(key="cells/pbmc.h5ad")
    np.testing.assert_array_equal(cells.load().X, truth["adata"].X)
    with cells.open() as lazy:
        assert list(lazy.obs["cell_type"]) == list(truth["adata"].obs["cell_type"])
    collection = ln.Collection.get(key="atlas")
    assert collection.uid == truth["collection"]
    assert [a.uid for a in collection.artifacts] == truth["members"]
    assert collection.is_latest
    assert collection.version == "2"
    if hasattr(registry, "track"):
        out = ln.Artifact.get(key="out/z.parquet")
        assert out.run is not None
        assert out.run.transform.name == "export-test"


def test_parquet_files_keep_types(tmp_path):
    _source(tmp_path)
    ln.export_registry(tmp_path / "export", mute=True)
    table = pq.read_table(tmp_path / "export" / "artifact.parquet")
    assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("is_latest").type == pa.bool_()
    assert table.schema.field("size").type == pa.int64()
    assert table.schema.field("storage_id").type == pa.int64()
    rows = table.to_pylist()
    assert None in {r["description"] for r in rows}  # nulls stay nulls
    assert all(r["created_at"].tzinfo is not None for r in rows)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["schema_version"] == s.SCHEMA_VERSION
    assert {name: t["rows"] for name, t in manifest["tables"].items()} == {
        name: pq.read_metadata(tmp_path / "export" / f"{name}.parquet").num_rows
        for name in manifest["tables"]}


def test_run_tables_round_trip_and_remap(target_url, tmp_path):
    """Transform, run and run_input rows (written directly) follow their records' new ids."""
    conn = _source(tmp_path)
    now = datetime.now(UTC)
    with conn.db.write() as c:  # ids that cannot be the target's: remapping is needed
        tid = c.execute(s.transform.insert().values(
            id=70, uid="T" * 16, name="direct", kind="pipeline", version="1", hash="h" * 64,
            created_at=now)).inserted_primary_key[0]
        rid = c.execute(s.run.insert().values(
            id=80, uid="R" * 16, transform_id=tid, status="completed", started_at=now,
            finished_at=now, user="me", host="here", params='{"a": 1}')).inserted_primary_key[0]
        art = c.execute(select(s.artifact.c.id).where(s.artifact.c.key == "cells/pbmc.h5ad")
                        ).scalar_one()
        col = c.execute(select(s.collection.c.id).where(s.collection.c.is_latest)).scalar_one()
        c.execute(s.run_input.insert(), [
            {"run_id": rid, "artifact_id": art, "collection_id": None, "recorded_at": now},
            {"run_id": rid, "artifact_id": None, "collection_id": col, "recorded_at": now}])
        c.execute(update(s.artifact).where(s.artifact.c.id == art).values(run_id=rid))
    before = records(conn)
    ln.export_registry(tmp_path / "export", mute=True)
    target = ln.connect(target_url, tmp_path / "store")
    with target.db.write() as c:  # the target's ids start elsewhere
        c.execute(s.transform.insert().values(
            uid="X" * 16, name="other", kind="pipeline", version="1", hash="x" * 64,
            created_at=now))
    ln.import_registry(tmp_path / "export", if_exists="append", mute=True)
    after = records(target)
    after["transform"] = [t for t in after["transform"] if t["uid"] != "X" * 16]
    assert after == before
    assert ln.Artifact.get(key="cells/pbmc.h5ad").run.uid == "R" * 16


def test_records_in_flight_are_left_out(tmp_path):
    conn = _source(tmp_path)
    now = datetime.now(UTC)
    with conn.db.write() as c:
        pending = c.execute(s.artifact.insert().values(
            uid="P" * 16, key="late/p.csv", suffix=".csv", size=1, hash="p" * 64,
            storage_id=conn.storage_id, storage_key=".lamin-io/objects/p.csv", managed=True,
            status="pending", family_uid="P" * 16, version="1", version_index=1,
            is_latest=False, created_at=now, lease_until=now)).inserted_primary_key[0]
        run = c.execute(s.run.insert().values(
            uid="R" * 16, transform_id=c.execute(s.transform.insert().values(
                uid="T" * 16, name="t", kind="pipeline", version="1", hash="h" * 64,
                created_at=now)).inserted_primary_key[0],
            status="running", started_at=now)).inserted_primary_key[0]
        c.execute(s.run_input.insert().values(run_id=run, artifact_id=pending, recorded_at=now))
    ready = len(ln.Artifact.filter())
    report = ln.export_registry(tmp_path / "export", mute=True)
    assert report.rows["artifact"] == ready
    assert report.rows["run_input"] == len(records(conn)["run_input"]) - 1
    assert "P" * 16 not in {r["uid"] for r in pq.read_table(
        tmp_path / "export" / "artifact.parquet").to_pylist()}
    ln.connect(tmp_path / "target.db", tmp_path / "store")
    ln.import_registry(tmp_path / "export", mute=True)
    assert len(ln.Artifact.filter()) == ready


def test_export_folder_must_be_new_or_empty(tmp_path):
    _source(tmp_path)
    write_bytes(tmp_path / "busy" / "x.txt", b"x")
    with pytest.raises(errors.ExportError, match="holds files already"):
        ln.export_registry(tmp_path / "busy")
    with pytest.raises(errors.InvalidArgumentError, match="local folder"):
        ln.export_registry("s3://bucket/export")
    ln.export_registry(tmp_path / "empty", mute=True)
    assert (tmp_path / "empty" / "manifest.json").exists()


# -- if_exists -----------------------------------------------------------------------------

def test_fail_replace_append(target_url, tmp_path):
    source = _source(tmp_path)
    before = records(source)
    ln.export_registry(tmp_path / "export", mute=True)
    target = ln.connect(target_url, tmp_path / "target-store")
    own = ln.Artifact(write_bytes(tmp_path / "own.csv", b"a\n1\n"), key="own.csv").save()
    held = dump(target)
    with pytest.raises(errors.ImportConflictError, match="holds records already"):
        ln.import_registry(tmp_path / "export", mute=True)
    assert dump(target) == held

    report = ln.import_registry(tmp_path / "export", if_exists="append", mute=True)
    assert report.inserted["artifact"] == len(before["artifact"])
    merged = records(target)
    assert [a for a in merged["artifact"] if a["uid"] != own.uid] == before["artifact"]
    assert merged["collection_artifact"] == before["collection_artifact"]
    again = ln.import_registry(tmp_path / "export", if_exists="append", mute=True)
    assert sum(again.inserted.values()) == 0
    assert again.skipped["artifact"] == len(before["artifact"])
    assert records(target) == merged

    report = ln.import_registry(tmp_path / "export", if_exists="replace", mute=True)
    assert report.deleted["artifact"] == len(before["artifact"]) + 1
    assert records(target) == before
    assert ln.Artifact.filter(uid=own.uid).first() is None


def test_append_refuses_other_content_under_a_uid(target_url, tmp_path):
    _source(tmp_path)
    ln.export_registry(tmp_path / "export", mute=True)
    target = ln.connect(target_url, tmp_path / "target-store")
    ln.import_registry(tmp_path / "export", mute=True)
    uid = ln.Artifact.get(key="cells/pbmc.h5ad").uid
    with target.db.write() as c:
        c.execute(update(s.artifact).where(s.artifact.c.uid == uid).values(description="new"))
    held = dump(target)
    with pytest.raises(errors.ImportConflictError, match=f"{uid}.*differs in description"):
        ln.import_registry(tmp_path / "export", if_exists="append", mute=True)
    assert dump(target) == held


def test_append_refuses_the_same_content_under_another_uid(target_url, tmp_path):
    _source(tmp_path)
    ln.export_registry(tmp_path / "export", mute=True)
    target = ln.connect(target_url, tmp_path / "target-store")
    ln.Artifact(tmp_path / "src" / "cells.h5ad", key="mine/cells.h5ad").save()
    held = dump(target)
    with pytest.raises(errors.ImportConflictError, match="same hash"):
        ln.import_registry(tmp_path / "export", if_exists="append", mute=True)
    assert dump(target) == held


def test_append_places_diverged_versions_after_the_newest(target_url, tmp_path):
    source = ln.connect(tmp_path / "a.db", tmp_path / "store")
    key = "t.csv"
    first = ln.Artifact(write_bytes(tmp_path / "1.csv", b"v\n1\n"), key=key).save()
    ln.export_registry(tmp_path / "base", mute=True)
    a3 = ln.Artifact(write_bytes(tmp_path / "a.csv", b"v\n2a\n"), key=key).save()
    ln.export_registry(tmp_path / "later", mute=True)

    target = ln.connect(target_url, tmp_path / "store")
    ln.import_registry(tmp_path / "base", mute=True)
    b3 = ln.Artifact(write_bytes(tmp_path / "b.csv", b"v\n2b\n"), key=key).save()
    assert b3.version == a3.version == "2"
    report = ln.import_registry(tmp_path / "later", if_exists="append", mute=True)
    assert report.renumbered == [f"artifact {a3.uid}: version 2 -> 3"]
    family = ln.Artifact.get(uid=first.uid).versions
    assert [(a.uid, a.version, a.is_latest) for a in family] == [
        (first.uid, "1", False), (b3.uid, "2", False), (a3.uid, "3", True)]
    assert ln.Artifact.get(key=key).uid == a3.uid
    assert source is not target

    # a label given by hand that the target's family holds is refused, naming both
    ln.connect(tmp_path / "a.db", tmp_path / "store")
    ln.Artifact(write_bytes(tmp_path / "c.csv", b"v\n3a\n"), key=key, version="x").save()
    ln.export_registry(tmp_path / "labelled", mute=True)
    target = ln.connect(target_url, tmp_path / "store")
    mine = ln.Artifact(write_bytes(tmp_path / "d.csv", b"v\n3b\n"), key=key, version="x").save()
    held = dump(target)
    with pytest.raises(errors.ImportConflictError, match=f"version 'x'.*{mine.uid}"):
        ln.import_registry(tmp_path / "labelled", if_exists="append", mute=True)
    assert dump(target) == held


def test_append_refuses_a_family_whose_key_another_family_has(target_url, tmp_path):
    """Two registries saved different files under one key: appending one to the other would
    give that key two families, each with a latest version."""
    ln.connect(tmp_path / "a.db", tmp_path / "store")
    theirs = ln.Artifact(write_bytes(tmp_path / "1.csv", b"v\n1\n"), key="p/t.csv").save()
    ln.Artifact(write_bytes(tmp_path / "o.csv", b"v\n0\n"), key="p/other.csv").save()
    ln.export_registry(tmp_path / "export", mute=True)

    target = ln.connect(target_url, tmp_path / "target-store")
    mine = ln.Artifact(write_bytes(tmp_path / "2.csv", b"v\n2\n"), key="p/t.csv").save()
    held = dump(target)
    for dry_run in (True, False):
        with pytest.raises(errors.ImportConflictError) as info:
            ln.import_registry(tmp_path / "export", if_exists="append", dry_run=dry_run,
                               mute=True)
        message = str(info.value)
        assert "key 'p/t.csv' would name the latest versions of 2 families" in message
        assert f"(artifact {theirs.uid} and artifact {mine.uid})" in message
        assert dump(target) == held
    assert ln.Artifact.get(key="p/t.csv") == mine

    # once the family moved to another key, the export appends
    moved = ln.Artifact(write_bytes(tmp_path / "3.csv", b"v\n3\n"), key="p/mine.csv",
                        revises=mine).save()
    ln.import_registry(tmp_path / "export", if_exists="append", mute=True)
    assert ln.Artifact.get(key="p/t.csv").uid == theirs.uid
    assert ln.Artifact.get(key="p/mine.csv") == moved


def test_append_judges_keys_once_loaded(target_url, tmp_path):
    """A family the export moves off a key frees it for another; a family the export moves
    onto a key the registry's own family has is refused."""
    ln.connect(tmp_path / "a.db", tmp_path / "store")
    f1 = ln.Artifact(write_bytes(tmp_path / "f1.csv", b"v\nf1\n"), key="a.csv").save()
    ln.export_registry(tmp_path / "first", mute=True)
    ln.Artifact(write_bytes(tmp_path / "f2.csv", b"v\nf2\n"), key="b.csv", revises=f1).save()
    n1 = ln.Artifact(write_bytes(tmp_path / "n1.csv", b"v\nn1\n"), key="c.csv").save()
    n2 = ln.Artifact(write_bytes(tmp_path / "n2.csv", b"v\nn2\n"), key="a.csv",
                     revises=n1).save()
    ln.export_registry(tmp_path / "second", mute=True)

    target = ln.connect(target_url, tmp_path / "target-store")
    ln.import_registry(tmp_path / "first", mute=True)
    ln.import_registry(tmp_path / "second", if_exists="append", mute=True)
    assert ln.Artifact.get(key="a.csv").uid == n2.uid

    # the registry's own family has k.csv; the export moves f onto it
    ln.connect(tmp_path / "c.db", tmp_path / "store-c")
    g1 = ln.Artifact(write_bytes(tmp_path / "g1.csv", b"v\ng1\n"), key="f.csv").save()
    ln.export_registry(tmp_path / "g-first", mute=True)
    g2 = ln.Artifact(write_bytes(tmp_path / "g2.csv", b"v\ng2\n"), key="k.csv",
                     revises=g1).save()
    ln.export_registry(tmp_path / "g-second", mute=True)
    target = ln.connect(target_url, tmp_path / "target-store")
    ln.import_registry(tmp_path / "g-first", if_exists="append", mute=True)
    own = ln.Artifact(write_bytes(tmp_path / "k.csv", b"v\nown\n"), key="k.csv").save()
    held = dump(target)
    with pytest.raises(errors.ImportConflictError,
                       match=f"key 'k.csv' would name.*artifact {g2.uid} and artifact {own.uid}"):
        ln.import_registry(tmp_path / "g-second", if_exists="append", mute=True)
    assert dump(target) == held


def test_dry_run_writes_nothing(target_url, tmp_path):
    _source(tmp_path)
    ln.export_registry(tmp_path / "export", mute=True)
    target = ln.connect(target_url, tmp_path / "target-store")
    held = dump(target)
    dry = ln.import_registry(tmp_path / "export", dry_run=True, mute=True)
    assert dump(target) == held
    assert dry.dry_run
    assert str(dry).startswith("would import")
    real = ln.import_registry(tmp_path / "export", mute=True)
    assert (dry.inserted, dry.skipped) == (real.inserted, real.skipped)


def test_bad_if_exists_and_storage_map(tmp_path):
    _source(tmp_path)
    ln.export_registry(tmp_path / "export", mute=True)
    ln.connect(tmp_path / "target.db", tmp_path / "store")
    with pytest.raises(errors.InvalidArgumentError, match="if_exists"):
        ln.import_registry(tmp_path / "export", if_exists="merge")
    with pytest.raises(errors.InvalidArgumentError, match="no storage root of the export"):
        ln.import_registry(tmp_path / "export", storage_map={str(tmp_path / "nope"): "/x"})


# -- damaged exports -----------------------------------------------------------------------

def _truncate(folder: Path) -> None:
    path = folder / "artifact.parquet"
    path.write_bytes(path.read_bytes()[:-200])


def _drop_file(folder: Path) -> None:
    (folder / "collection_artifact.parquet").unlink()


def _edit_manifest(change: Any) -> Any:
    def damage(folder: Path) -> None:
        path = folder / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return damage


def _edit_rows(folder: Path) -> None:
    """Same count, same types, one value changed: only the checksum tells."""
    path = folder / "artifact.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["description"] = "edited"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def _swap_member(folder: Path) -> None:
    """A collection link pointing at an artifact the export does not hold."""
    path = folder / "collection_artifact.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["artifact_id"] = 999_999
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


DAMAGE = {
    "truncated parquet": (_truncate, errors.ExportError, "damaged"),
    "missing parquet": (_drop_file, errors.ExportError, "damaged or incomplete"),
    "missing manifest": (lambda f: (f / "manifest.json").unlink(), errors.ExportError,
                         "holds no manifest.json"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text("{not json"),
                          errors.ExportError, "cannot be read"),
    "row count edited": (_edit_manifest(lambda m: m["tables"]["artifact"].update(rows=99)),
                         errors.ExportError, "counts 99"),
    "checksum edited": (_edit_manifest(lambda m: m["tables"]["collection"].update(
        checksum="0" * 64)), errors.ExportError, "does not match its manifest"),
    "row edited": (_edit_rows, errors.ExportError, "checksum differs"),
    "dangling reference": (_swap_member, errors.ExportError, "does not hold"),
    "newer schema": (_edit_manifest(lambda m: m.update(schema_version=s.SCHEMA_VERSION + 1)),
                     errors.SchemaVersionError, "newer than this lamin-io"),
    "a table dropped": (_edit_manifest(lambda m: m["tables"].pop("run")), errors.ExportError,
                        "lacks table run"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_or_newer_export_is_refused_and_nothing_written(damage, target_url, tmp_path):
    _source(tmp_path)
    ln.export_registry(tmp_path / "export", mute=True)
    change, error, message = DAMAGE[damage]
    change(tmp_path / "export")
    target = ln.connect(target_url, tmp_path / "target-store")
    held = dump(target)
    for if_exists in ("fail", "replace"):
        with pytest.raises(error, match=message):
            ln.import_registry(tmp_path / "export", if_exists=if_exists, mute=True)
    assert dump(target) == held


def _rewrite_as_schema_4(folder: Path, *, drop: tuple[str, ...] = ("run_id",)) -> None:
    """Make an export look written before schema 5: no lineage tables, no run_id columns."""
    from lamin_io.registry._exchange import Checksum, specs

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 4
    keys: dict[str, dict[int, tuple[Any, ...]]] = {}
    for spec in specs():
        if spec.name in ("transform", "run", "run_input"):
            del manifest["tables"][spec.name]
            (folder / f"{spec.name}.parquet").unlink()
            continue
        path = folder / f"{spec.name}.parquet"
        table = pq.read_table(path)
        table = table.drop_columns([c for c in drop if c in table.column_names])
        pq.write_table(table, path)
        rows = table.to_pylist()
        entry = manifest["tables"][spec.name]
        entry["columns"] = table.column_names
        checksum = Checksum()
        for row in rows:
            if spec.surrogate:
                keys.setdefault(spec.name, {})[row[spec.surrogate]] = spec.natural_key(row, keys)
            checksum.add(spec.digest(row, keys, spec.digest_columns(table.column_names)))
        entry["checksum"] = checksum.hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_older_schema_export(tmp_path):
    """An export of schema 4 (before lineage) imports, its missing columns NULL; one that
    lacks a column schema 5 needs is refused."""
    _source(tmp_path)
    before = records(registry.current())
    ln.export_registry(tmp_path / "export", mute=True)
    shutil.copytree(tmp_path / "export", tmp_path / "broken")
    _rewrite_as_schema_4(tmp_path / "export")
    _rewrite_as_schema_4(tmp_path / "broken", drop=("run_id", "suffix"))
    target = ln.connect(tmp_path / "target.db", tmp_path / "store")
    held = dump(target)
    with pytest.raises(errors.SchemaVersionError, match=r"lacks artifact\.suffix"):
        ln.import_registry(tmp_path / "broken", mute=True)
    assert dump(target) == held
    ln.import_registry(tmp_path / "export", mute=True)
    after = records(target)
    assert after["run"] == []
    assert all(a["run_id"] is None for a in after["artifact"])
    strip = [{**a, "run_id": None} for a in before["artifact"]]
    assert after["artifact"] == sorted(strip, key=repr)


# -- storage -------------------------------------------------------------------------------

def test_storage_map_repoints_moved_bytes(conn, storage_kind, tmp_path):
    truth = populate(tmp_path)
    old_root = conn.settings.root
    ln.export_registry(tmp_path / "export", mute=True)
    moved = tmp_path / "moved"
    root = conn.root
    root.fs.get(root.path, str(moved), recursive=True)  # the bytes, moved by hand
    if storage_kind == "local":
        shutil.rmtree(old_root)
    target = ln.connect(tmp_path / "target.db", moved)
    report = ln.import_registry(tmp_path / "export", storage_map={old_root: str(moved)},
                                mute=True)
    assert report.skipped["storage"] == 1  # the target's own root, reused
    with target.db.read() as c:
        assert {r.root for r in c.execute(select(s.storage))} == {str(moved)}
        assert set(c.execute(select(s.artifact.c.fingerprint)).scalars()) == {None}
    new = ln.Artifact.get(key="tables/t.parquet")
    assert new.storage_root == str(moved)
    pd.testing.assert_frame_equal(new.load(), truth["tables"][1])
    np.testing.assert_array_equal(ln.Artifact.get(key="cells/pbmc.h5ad").load().X,
                                  truth["adata"].X)
    assert [a.uid for a in ln.Collection.get(key="atlas").artifacts] == truth["members"]


def test_two_roots_re_pointed_to_one(tmp_path):
    ln.connect(tmp_path / "source.db", tmp_path / "a")
    ln.Artifact(write_bytes(tmp_path / "x.csv", b"x\n1\n"), key="x.csv").save()
    ln.connect(tmp_path / "source.db", tmp_path / "b")
    ln.Artifact(write_bytes(tmp_path / "y.csv", b"y\n2\n"), key="y.csv").save()
    ln.export_registry(tmp_path / "export", mute=True)
    shutil.copytree(tmp_path / "a", tmp_path / "both")
    shutil.copytree(tmp_path / "b", tmp_path / "both", dirs_exist_ok=True)
    target = ln.connect(tmp_path / "target.db", tmp_path / "both")
    both = str(tmp_path / "both")
    moves = {str(tmp_path / "a"): both, str(tmp_path / "b"): both}
    report = ln.import_registry(tmp_path / "export", storage_map=moves, mute=True)
    assert report.skipped["storage"] == 2
    with target.db.read() as c:
        assert c.execute(select(s.storage.c.root)).scalars().all() == [str(tmp_path / "both")]
    assert ln.Artifact.get(key="x.csv").load().columns.tolist() == ["x"]
    assert ln.Artifact.get(key="y.csv").load().columns.tolist() == ["y"]


def test_same_root_in_target_is_reused(tmp_path):
    _source(tmp_path)
    ln.export_registry(tmp_path / "export", mute=True)
    target = ln.connect(tmp_path / "target.db", tmp_path / "store")
    report = ln.import_registry(tmp_path / "export", mute=True)
    assert report.skipped["storage"] == 1
    assert report.inserted["storage"] == 0
    with target.db.read() as c:
        assert c.execute(select(s.storage.c.id)).scalars().all() == [target.storage_id]
    assert ln.Artifact.get(key="tables/t.parquet").load().shape == (2, 2)


# -- one snapshot --------------------------------------------------------------------------

def test_snapshot_does_not_see_later_writes(registry_url, tmp_path):
    conn = ln.connect(registry_url, tmp_path / "store")
    ln.Artifact(write_bytes(tmp_path / "a.csv", b"a\n1\n"), key="a.csv").save()
    count = select(s.artifact.c.uid)
    with conn.db.snapshot() as c:
        seen = c.execute(count).scalars().all()
        ln.Artifact(write_bytes(tmp_path / "b.csv", b"b\n2\n"), key="b.csv").save()
        assert c.execute(count).scalars().all() == seen
    assert len(ln.Artifact.filter()) == 2


WRITER = """
import sys, pathlib
import lamin_io as ln
registry, storage, work = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
ln.connect(registry, storage)
previous, i = None, 0
while not (work / "stop").exists():
    f = work / f"w{i}.csv"
    f.write_text(f"i\\n{i}\\n")
    art = ln.Artifact(f, key=f"writer/{i}.csv").save(mute=True)
    if previous is not None:
        ln.Collection([previous, art], key=f"writer/c{i}").save()
    previous, i = art, i + 1
    (work / "count").write_text(str(i))
"""


def _bulk_artifacts(conn: Any, n: int) -> None:
    now = datetime.now(UTC)
    with conn.db.write() as c:
        c.execute(s.artifact.insert(), [
            {"uid": f"bulk{i:012d}", "key": f"bulk/{i}.csv", "suffix": ".csv", "size": i,
             "hash": hashlib.sha256(str(i).encode()).hexdigest(),
             "storage_id": conn.storage_id, "storage_key": f"bulk/{i}.csv", "managed": False,
             "status": "ready", "family_uid": f"bulk{i:012d}", "version": "1",
             "version_index": 1, "is_latest": True, "created_at": now} for i in range(n)])


def test_export_is_one_snapshot_under_a_concurrent_writer(registry_url, tmp_path, cli_env):
    """A writer saves artifacts and two-member collections all along: every export holds
    whole collections (their members, in order, hash to the collection's hash) and counts
    matching its files, and imports with its checks passing."""
    conn = ln.connect(registry_url, tmp_path / "store")
    _bulk_artifacts(conn, 5000)
    work = tmp_path / "writer"
    work.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    proc = subprocess.Popen([sys.executable, str(script), registry_url, conn.settings.root,
                             str(work)], env=cli_env)
    try:
        while not (work / "count").exists() or int((work / "count").read_text() or 0) < 3:
            assert proc.poll() is None, "the writer stopped"
            time.sleep(0.05)
        for round_ in range(3):
            folder = tmp_path / f"export{round_}"
            ln.export_registry(folder, mute=True)
            manifest = json.loads((folder / "manifest.json").read_text())
            tables = {name: pq.read_table(folder / f"{name}.parquet").to_pylist()
                      for name in manifest["tables"]}
            for name, entry in manifest["tables"].items():
                assert entry["rows"] == len(tables[name])
            hashes = {a["id"]: a["hash"] for a in tables["artifact"]}
            members: dict[int, list[tuple[int, str]]] = {}
            for link in tables["collection_artifact"]:
                members.setdefault(link["collection_id"], []).append(
                    (link["position"], hashes[link["artifact_id"]]))
            for col in tables["collection"]:
                ordered = [h for _, h in sorted(members[col["id"]])]
                assert hashlib.sha256("\n".join(ordered).encode()).hexdigest() == col["hash"]
            ln.connect(tmp_path / f"target{round_}.db", tmp_path / "target-store")
            ln.import_registry(folder, mute=True)
            assert len(ln.Collection.filter()) == len(tables["collection"])
            ln.connect(registry_url, conn.settings.root)
    finally:
        (work / "stop").write_text("")
        proc.wait(timeout=120)
    assert proc.returncode == 0


# -- the command line ----------------------------------------------------------------------

def _cli(env: dict[str, str], *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "lamin_io.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == rc, (proc.stdout, proc.stderr)
    return proc


def test_cli_export_and_import(cli_env, tmp_path):
    _cli(cli_env, "connect", "--registry", str(tmp_path / "a.db"), "--storage",
         str(tmp_path / "store"))
    _cli(cli_env, "save", str(write_bytes(tmp_path / "t.csv", b"a\n1\n")), "--key", "p/t.csv")
    out = _cli(cli_env, "export", str(tmp_path / "export")).stdout
    assert out.startswith("exported ")
    assert "artifact 1" in out
    err = _cli(cli_env, "export", str(tmp_path / "export"), rc=1).stderr
    assert err.startswith("error: cannot export")
    assert "Traceback" not in err

    _cli(cli_env, "connect", "--registry", str(tmp_path / "b.db"), "--storage",
         str(tmp_path / "store"))
    assert "would import 1 row(s)" in _cli(cli_env, "import", str(tmp_path / "export"),
                                           "--dry-run").stdout
    assert "p/t.csv" not in _cli(cli_env, "ls").stdout
    assert "imported 1 row(s)" in _cli(cli_env, "import", str(tmp_path / "export")).stdout
    assert "p/t.csv" in _cli(cli_env, "ls").stdout
    assert _cli(cli_env, "cache", "p/t.csv").stdout.strip()
    err = _cli(cli_env, "import", str(tmp_path / "export"), rc=1).stderr
    assert err.startswith("error: registry")
    assert "holds records already" in err
    assert len(err.strip().splitlines()) == 1
    out = _cli(cli_env, "import", str(tmp_path / "export"), "--if-exists", "append").stdout
    assert "imported 0 row(s)" in out
    assert "there already" in out
    _cli(cli_env, "import", str(tmp_path / "export"), "--storage-map", "nonsense", rc=2)
    (tmp_path / "export" / "manifest.json").write_text("{")
    err = _cli(cli_env, "import", str(tmp_path / "export"), "--if-exists", "replace",
               rc=1).stderr
    assert "the export is damaged" in err
    assert "Usage:" in _cli(cli_env, "import", "--help").stdout

    _cli(cli_env, "connect", "--registry", str(tmp_path / "c.db"), "--storage",
         str(tmp_path / "moved"))
    shutil.copytree(tmp_path / "store", tmp_path / "moved", dirs_exist_ok=True)
    _cli(cli_env, "connect", "--registry", str(tmp_path / "a.db"), "--storage",
         str(tmp_path / "store"))
    _cli(cli_env, "export", str(tmp_path / "export2"))
    _cli(cli_env, "connect", "--registry", str(tmp_path / "c.db"), "--storage",
         str(tmp_path / "moved"))
    _cli(cli_env, "import", str(tmp_path / "export2"), "--storage-map",
         f"{tmp_path / 'store'}={tmp_path / 'moved'}")
    assert str(tmp_path / "moved") in _cli(cli_env, "describe", "p/t.csv").stdout


def test_cli_storage_map_splits_after_the_root_of_the_export(cli_env, tmp_path):
    """Paths may hold '=': the entry is split where the export's storage root ends."""
    old, new = tmp_path / "run=1" / "store", tmp_path / "run=2" / "moved"
    _cli(cli_env, "connect", "--registry", str(tmp_path / "a.db"), "--storage", str(old))
    _cli(cli_env, "save", str(write_bytes(tmp_path / "t.csv", b"a\n1\n")), "--key", "p/t.csv")
    _cli(cli_env, "export", str(tmp_path / "export"))
    shutil.copytree(old, new)
    _cli(cli_env, "connect", "--registry", str(tmp_path / "b.db"), "--storage", str(new))
    _cli(cli_env, "import", str(tmp_path / "export"), "--storage-map", f"{old}={new}")
    described = _cli(cli_env, "describe", "p/t.csv").stdout
    assert str(new) in described
    assert str(old) not in described
    assert _cli(cli_env, "cache", "p/t.csv").stdout.strip()
    # an entry whose every split names no root of the export: the first '=' splits it
    err = _cli(cli_env, "import", str(tmp_path / "export"), "--if-exists", "replace",
               "--storage-map", f"{tmp_path}/x=y={new}", rc=1).stderr
    assert f"storage_map names {tmp_path}/x, no storage root of the export" in err


def test_storage_map_entries_split_where_a_root_of_the_export_ends(tmp_path):
    from lamin_io.cli import _storage_map

    a, ab = str(tmp_path / "a"), str(tmp_path / "a=b")
    assert _storage_map((f"{ab}=/new",), [ab]) == {ab: "/new"}
    assert _storage_map((f"{a}=b=/new",), [a]) == {a: "b=/new"}
    assert _storage_map(("s3://x/y=s3://z",), []) == {"s3://x/y": "s3://z"}  # the first '='
    with pytest.raises(click.UsageError, match="both storage roots of the export"):
        _storage_map((f"{ab}=/new",), [a, ab])
    with pytest.raises(click.UsageError, match="takes OLD=NEW"):
        _storage_map(("=/new",), [a])
