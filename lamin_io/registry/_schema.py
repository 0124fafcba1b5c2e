"""Registry tables, the schema version, and the migrations between versions.

Schema history:

1. storages, artifacts (with folder manifests and versions), collections.
2. ``artifact.fingerprint``: the stored object's ETag/version id (S3) or size and
   modification time (local) seen at save, so a later read detects an object changed
   behind the registry's back without re-reading it.
3. ``artifact.n_observations``: the number of observations (cells) a stored object holds,
   where its format can count them (TileDB-SOMA experiments, AnnData); ``NULL`` when
   unknown.
4. ``artifact.lease_until``: until when a *pending* record's save is known to be running
   (renewed by the saving process); ``gc`` collects a pending record only after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection

SCHEMA_VERSION = 5

metadata = MetaData()

meta = Table(
    "lamin_io_meta", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

storage = Table(
    "storage", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("root", Text, nullable=False, unique=True),
    Column("settings", Text, nullable=False, default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

artifact = Table(
    "artifact", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(16), nullable=False, unique=True),
    Column("key", Text, nullable=True),
    Column("description", Text, nullable=True),
    Column("suffix", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("n_files", Integer, nullable=True),
    Column("manifest", Text, nullable=True),
    Column("storage_id", Integer, ForeignKey("storage.id"), nullable=False),
    Column("storage_key", Text, nullable=False),
    Column("managed", Boolean, nullable=False),
    Column("status", String(16), nullable=False),
    Column("family_uid", String(16), nullable=False),
    Column("version", String(64), nullable=False),
    Column("version_index", Integer, nullable=False),
    Column("is_latest", Boolean, nullable=False, default=False),
    Column("fingerprint", Text, nullable=True),
    Column("n_observations", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("run_id", Integer, ForeignKey("run.id"), nullable=True),
    UniqueConstraint("family_uid", "version_index"),
    UniqueConstraint("family_uid", "version"),
    UniqueConstraint("storage_id", "storage_key"),
    Index("ix_artifact_key", "key"),
    Index("ix_artifact_family", "family_uid"),
)

transform = Table(
    "transform", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(16), nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("version", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("reference", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", "hash"),
)

run = Table(
    "run", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(16), nullable=False, unique=True),
    Column("transform_id", Integer, ForeignKey("transform.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("user", Text, nullable=True),
    Column("host", Text, nullable=True),
    Column("params", Text, nullable=True),
    Column("error", Text, nullable=True),
    Index("ix_run_transform", "transform_id"),
)

collection = Table(
    "collection", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(16), nullable=False, unique=True),
    Column("key", Text, nullable=True),
    Column("description", Text, nullable=True),
    Column("hash", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("family_uid", String(16), nullable=False),
    Column("version", String(64), nullable=False),
    Column("version_index", Integer, nullable=False),
    Column("is_latest", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("run_id", Integer, ForeignKey("run.id"), nullable=True),
    UniqueConstraint("family_uid", "version_index"),
    UniqueConstraint("family_uid", "version"),
    Index("ix_collection_key", "key"),
)

collection_artifact = Table(
    "collection_artifact", metadata,
    Column("collection_id", Integer, ForeignKey("collection.id", ondelete="CASCADE"),
           primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("artifact_id", Integer, ForeignKey("artifact.id"), nullable=False),
    Index("ix_collection_artifact_artifact", "artifact_id"),
)


run_input = Table(
    "run_input", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("run.id", ondelete="CASCADE"), nullable=False),
    Column("artifact_id", Integer, ForeignKey("artifact.id", ondelete="CASCADE"), nullable=True),
    Column("collection_id", Integer, ForeignKey("collection.id", ondelete="CASCADE"),
           nullable=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    # one of the two is set; NULLs never collide, so each pair is unique on its own
    UniqueConstraint("run_id", "artifact_id"),
    UniqueConstraint("run_id", "collection_id"),
    Index("ix_run_input_artifact", "artifact_id"),
    Index("ix_run_input_collection", "collection_id"),
)


def _v1_to_v2(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE artifact ADD COLUMN fingerprint TEXT"))


def _v2_to_v3(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE artifact ADD COLUMN n_observations BIGINT"))


def _v3_to_v4(conn: Connection) -> None:
    # (a record pending before the upgrade has no lease: gc goes by its age, as before)
    conn.execute(text("ALTER TABLE artifact ADD COLUMN lease_until TIMESTAMP WITH TIME ZONE"
                      if conn.dialect.name == "postgresql" else
                      "ALTER TABLE artifact ADD COLUMN lease_until DATETIME"))


def _v4_to_v5(conn: Connection) -> None:
    for table in (transform, run, run_input):
        table.create(conn)
    for name in ("artifact", "collection"):
        conn.execute(text(f"ALTER TABLE {name} ADD COLUMN run_id INTEGER REFERENCES run(id)"))


#: ``MIGRATIONS[n]`` upgrades a registry from schema ``n`` to ``n + 1``.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3,
                                                       3: _v3_to_v4, 4: _v4_to_v5}
