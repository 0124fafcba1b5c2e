"""Registry schema versions: older registries are migrated, newer ones refused."""

from __future__ import annotations

import sqlite3

from sqlalchemy import create_engine, select

import lamin_io as ln
from lamin_io.registry import _schema as s


def _create_v1(db: str) -> None:
    """Write a registry as schema 1 laid it out: today's tables minus artifact.fingerprint."""
    engine = create_engine(f"sqlite:///{db}")
    s.metadata.create_all(engine)
    engine.dispose()
    with sqlite3.connect(db) as c:
        c.execute("ALTER TABLE artifact DROP COLUMN fingerprint")
        c.execute("INSERT INTO lamin_io_meta VALUES ('schema_version', '1')")


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
