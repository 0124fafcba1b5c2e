"""The registry database: engine set-up, transactions, schema checks and error translation.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every write
transaction starts with ``BEGIN IMMEDIATE`` so concurrent writers from several processes
queue up instead of failing half-way. PostgreSQL serializes registry writes with a
transaction-level advisory lock; both keep the same semantics.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from lamin_io.errors import (
    MissingDependencyError,
    RegistryError,
    RegistryLockedError,
    RegistryUnreachableError,
    SchemaVersionError,
)
from lamin_io.registry import _schema as s
from lamin_io.storage import make_local_dir

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Connection, Engine

__all__ = ["Database"]

logger = logging.getLogger(__name__)

_WRITE_LOCK_ID = 0x6C616D69  # any constant shared by all lamin-io writers


def normalize_url(registry: str | Path) -> str:
    """Turn a SQLite file path or a database URL into a SQLAlchemy URL string."""
    s_ = str(registry)
    if s_.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + s_.split("://", 1)[1]
    if "://" in s_:
        return s_
    path = Path(s_).expanduser().resolve()
    return f"sqlite:///{path}"


class Database:
    """One registry database.

    Parameters
    ----------
    url
        A SQLite file path, ``sqlite:///...`` or ``postgresql://...`` URL.
    busy_timeout
        Seconds a writer waits for a lock held by another process before
        :class:`RegistryLockedError`.
    """

    def __init__(self, url: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.display = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        self.busy_timeout = busy_timeout
        self.engine = self._make_engine()
        self._ensure_schema()

    def _make_engine(self) -> Engine:
        if self.dialect == "sqlite":
            path = make_url(self.url).database
            if path and path != ":memory:":
                make_local_dir(Path(path).parent, f"registry {path}")
            engine = create_engine(self.url, connect_args={"timeout": self.busy_timeout})
            busy_ms = int(self.busy_timeout * 1000)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # transactions are begun explicitly below
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={busy_ms}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA case_sensitive_like=ON")  # `contains` is case-sensitive
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                write = conn.get_execution_options().get("lamin_io_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        if self.dialect == "postgresql":
            try:
                import psycopg  # noqa: F401
            except ImportError as exc:
                msg = "a PostgreSQL registry needs psycopg: pip install 'lamin-io[postgres]'"
                raise MissingDependencyError(msg) from exc
            return create_engine(self.url, pool_pre_ping=True)
        msg = f"unsupported registry URL {self.display}: use a SQLite path or postgresql://"
        raise RegistryError(msg)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            text_ = str(exc.orig).lower()
            if "locked" in text_ or "busy" in text_:
                msg = (f"registry {self.display} stayed locked by another writer for "
                       f"{self.busy_timeout:g}s; retry, or raise busy_timeout in connect()")
                raise RegistryLockedError(msg) from None
            if _unreachable(text_):
                msg = (f"registry {self.display} is unreachable: {exc.orig}; check the host "
                       f"and port, and that the database server is running, then retry")
                raise RegistryUnreachableError(msg) from exc
            msg = f"registry {self.display} cannot be used: {exc.orig}"
            raise RegistryError(msg) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated or _unreachable(str(exc.orig).lower()):
                msg = f"registry {self.display} is unreachable: {exc.orig}; retry"
                raise RegistryUnreachableError(msg) from exc
            raise

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """Open a read transaction."""
        with self._errors(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """Open a write transaction, serialized against every other writer of this registry."""
        with self._errors(), self.engine.connect() as conn:
            conn.execution_options(lamin_io_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _WRITE_LOCK_ID})
                yield conn

    def schema_version(self, conn: Connection) -> int | None:
        """Return the stored schema version, or ``None`` for an empty database."""
        if not self.engine.dialect.has_table(conn, s.meta.name):
            return None
        row = conn.execute(select(s.meta.c.value).where(s.meta.c.name == "schema_version"))
        value = row.scalar_one_or_none()
        return int(value) if value is not None else None

    def _ensure_schema(self) -> None:
        with self.write() as conn:
            version = self.schema_version(conn)
            if version is None:
                s.metadata.create_all(conn)
                conn.execute(s.meta.insert().values(name="schema_version",
                                                    value=str(s.SCHEMA_VERSION)))
                return
            if version > s.SCHEMA_VERSION:
                msg = (f"registry {self.display} has schema version {version}, newer than "
                       f"this lamin-io understands ({s.SCHEMA_VERSION}): upgrade lamin-io")
                raise SchemaVersionError(msg)
            while version < s.SCHEMA_VERSION:
                logger.info("migrating registry %s from schema %d", self.display, version)
                s.MIGRATIONS[version](conn)
                version += 1
                conn.execute(s.meta.update().where(s.meta.c.name == "schema_version")
                             .values(value=str(version)))

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()


def _unreachable(message: str) -> bool:
    """Whether a driver's error message says the server could not be reached."""
    return any(part in message for part in (
        "connection refused", "could not connect", "connection failed", "timeout expired",
        "could not translate host name", "server closed the connection", "no route to host"))
