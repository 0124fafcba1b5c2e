"""Registry schema versions: older registries are migrated, newer ones refused."""

from __future__ import annotations

import sqlite3

from conftest import SCHEMA_ADDED_COLUMNS, create_old_registry
from sqlalchemy import select

import lamin_io as ln
from lamin_io.registry import _schema as s

_ADDED = SCHEMA_ADDED_COLUMNS


def _create_old(db: str, version: int) -> None:
    create_old_registry(db, version)


def _create_v1(db: str) -> None:
    _create_old(db, 1)


def test_every_version_has_a_migration():
    assert sorted(s.MIGRATIONS) == list(range(1, s.SCHEMA_VERSION))
    assert max(_ADDED) == s.SCHEMA_VERSION


def test_v1_registry_is_migrated(tmp_path):
    db = str(tmp_path / "old.db")
    _create_v1(db)
    with sqlite3.connect(db) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(artifact)")]
    assert "fingerprint" not in cols
    conn = ln.connect(db, tmp_path / "storage")
    with conn.db.read() as c:
        assert c.execute(select(s.meta.c.value)).scalar() == str(s.SCHEMA_VERSION)
    f = tmp_path / "x.csv"
    f.write_bytes(b"a\n1\n")
    art = ln.Artifact(f, key="x.csv").save()
    assert art.cache().read_bytes() == b"a\n1\n"
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT fingerprint FROM artifact").fetchone()[0] is not None


def test_v2_registry_is_migrated(tmp_path):
    db = str(tmp_path / "old.db")
    _create_old(db, 2)
    f = tmp_path / "x.csv"
    f.write_bytes(b"a\n1\n")
    with sqlite3.connect(db) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(artifact)")]
    assert "fingerprint" in cols
    assert "n_observations" not in cols
    conn = ln.connect(db, tmp_path / "storage")
    with conn.db.read() as c:
        assert c.execute(select(s.meta.c.value)).scalar() == str(s.SCHEMA_VERSION)
    art = ln.Artifact(f, key="x.csv").save()
    assert art.n_observations is None  # a csv is not counted; the column exists now
    assert ln.Artifact.filter(n_observations__isnull=True).one() == art
    with sqlite3.connect(db) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(artifact)")]
    assert "n_observations" in cols


def test_v3_registry_is_migrated_and_its_pending_rows_go_by_age(tmp_path):
    """A save left pending before leases existed has none: gc collects it by its age."""
    db = str(tmp_path / "old.db")
    _create_old(db, 3)
    conn = ln.connect(db, tmp_path / "storage")
    with conn.db.read() as c:
        assert c.execute(select(s.meta.c.value)).scalar() == str(s.SCHEMA_VERSION)
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO artifact (uid, key, suffix, size, hash, storage_id, storage_key, "
                  "managed, status, family_uid, version, version_index, is_latest, created_at) "
                  "VALUES ('AAAAAAAAAAAAAAAA', 'old.csv', '.csv', 4, 'h', ?, "
                  "'.lamin-io/objects/AAAAAAAAAAAAAAAA.csv', 1, 'pending', "
                  "'AAAAAAAAAAAAAAAA', '1', 1, 0, '2026-01-01 00:00:00')", (conn.storage_id,))
    assert ln.gc(older_than=3600).records == ["pending old.csv (uid AAAAAAAAAAAAAAAA)"]
