"""The registry database: engine set-up, transactions, schema checks and error translation.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every write
transaction starts with ``BEGIN IMMEDIATE`` so concurrent writers from several processes
queue up instead of failing half-way. PostgreSQL serializes registry writes with a
transaction-level advisory lock; both keep the same semantics.

Connections are pooled per process (SQLAlchemy's ``QueuePool``; for PostgreSQL with the
settings below, see the README's "For a team"). A forked child (a DataLoader worker) gets
pools of its own: the parent's connections are dropped in the child without being closed,
as SQLAlchemy documents for ``os.fork()``, so parent and child never share a socket or a
SQLite handle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import QueuePool

from lamin_io._faults import kill_point
from lamin_io.errors import (
    InvalidArgumentError,
    MissingDependencyError,
    RegistryError,
    RegistryLockedError,
    RegistryPermissionError,
    RegistryUnreachableError,
    SchemaVersionError,
)
from lamin_io.registry import _schema as s
from lamin_io.storage import make_local_dir, protect_logs

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Connection, Engine

__all__ = ["CONNECT_TIMEOUT", "MAX_OVERFLOW", "POOL_RECYCLE", "POOL_SIZE", "Database",
           "resolve_pool_size"]

logger = logging.getLogger(__name__)

_WRITE_LOCK_ID = 0x6C616D69  # any constant shared by all lamin-io writers

#: PostgreSQL connections a process keeps open (``connect(pool_size=)`` or
#: ``LAMIN_IO_POOL_SIZE``): a client runs one registry transaction at a time (and a save's
#: lease renewal beside it), so two serve it; ten clients then hold twenty.
POOL_SIZE = 2
#: Connections opened beyond :data:`POOL_SIZE` while more threads need one at once; each is
#: closed when it is given back.
MAX_OVERFLOW = 8
#: Seconds after which a pooled connection is replaced rather than reused: below the idle
#: timeouts of proxies and load balancers (PgBouncer, RDS Proxy, cloud NATs) that drop
#: connections silently. Each checkout also pings the connection (``pool_pre_ping``), so a
#: server restart costs a reconnect, not an error.
POOL_RECYCLE = 1800
#: Seconds libpq waits for the server to answer a new connection: an unreachable server
#: fails fast (:class:`RegistryUnreachableError`) instead of waiting out the system's TCP
#: timeout. A ``connect_timeout`` in the registry URL wins.
CONNECT_TIMEOUT = 10

#: Every open database of this process, for :func:`_after_fork_in_child`.
_open: weakref.WeakSet[Database] = weakref.WeakSet()


def resolve_pool_size(value: int | None = None) -> int:
    """Return the PostgreSQL pool size: ``value``, else ``LAMIN_IO_POOL_SIZE``, else 2.

    Raises
    ------
    InvalidArgumentError
        Not a whole number of at least 1.
    """
    raw: object = value if value is not None else (
        os.environ.get("LAMIN_IO_POOL_SIZE", "").strip() or POOL_SIZE)
    try:
        size = int(str(raw))
    except ValueError:
        size = 0
    if size < 1:
        msg = (f"pool_size (or LAMIN_IO_POOL_SIZE) must be a whole number of connections, "
               f"1 or more, got {raw!r}")
        raise InvalidArgumentError(msg)
    return size


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
        :class:`RegistryLockedError` (and, on PostgreSQL, a thread for a free pooled
        connection).
    pool_size
        PostgreSQL connections kept open (see :func:`resolve_pool_size`); ignored for SQLite.
    """

    def __init__(self, url: str | Path, *, busy_timeout: float = 30.0,
                 pool_size: int | None = None) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.display = parsed.render_as_string(hide_password=True)
        protect_logs([parsed.password])  # (also from the libraries' own log output)
        #: Which database this is, whoever logs in: the URL without user, password, options.
        self.identity = parsed.set(drivername=parsed.get_backend_name(), query={}) \
            ._replace(username=None, password=None).render_as_string()
        self.dialect = parsed.get_backend_name()
        self.busy_timeout = busy_timeout
        self.pool_size = resolve_pool_size(pool_size)
        self.engine = self._make_engine()
        _open.add(self)
        try:
            self._ensure_schema()
        except BaseException:
            self.close()
            raise

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
            connect_args = {} if "connect_timeout" in make_url(self.url).query else {
                "connect_timeout": CONNECT_TIMEOUT}
            return create_engine(
                self.url, poolclass=QueuePool, pool_size=self.pool_size,
                max_overflow=MAX_OVERFLOW, pool_timeout=self.busy_timeout,
                pool_recycle=POOL_RECYCLE, pool_pre_ping=True, connect_args=connect_args)
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
            if "readonly database" in text_:
                raise self._denied(exc) from exc
            msg = f"registry {self.display} cannot be used: {exc.orig}"
            raise RegistryError(msg) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated or _unreachable(str(exc.orig).lower()):
                msg = f"registry {self.display} is unreachable: {exc.orig}; retry"
                raise RegistryUnreachableError(msg) from exc
            if getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE:
                raise self._denied(exc) from exc
            raise
        except PoolTimeoutError as exc:
            msg = (f"registry {self.display}: all {self.pool_size + MAX_OVERFLOW} pooled "
                   f"connections of this process stayed in use for {self.busy_timeout:g}s; "
                   f"use fewer threads at once, or raise pool_size (LAMIN_IO_POOL_SIZE)")
            raise RegistryLockedError(msg) from exc

    def _denied(self, exc: DBAPIError) -> RegistryPermissionError:
        first = next(iter(str(exc.orig).splitlines()), "")
        msg = (f"registry {self.display} denied this: {first}; the database role (for "
               f"SQLite: the file's permissions) does not allow it: saving, versioning, "
               f"deleting and gc need a writer's privileges, creating or migrating the "
               f"schema an admin's (see 'For a team' in the README)")
        return RegistryPermissionError(msg)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """Open a read transaction."""
        with self._errors(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """Open a read-only transaction whose statements all see one consistent snapshot.

        Writers go on meanwhile and are not seen: SQLite (WAL) keeps the snapshot of the
        transaction's first read; PostgreSQL runs it ``REPEATABLE READ, READ ONLY``.
        """
        with self._errors(), self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ",
                                       postgresql_readonly=True)
            with conn.begin():
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
        """Create or migrate the schema; a current one is only read (readers may connect)."""
        with self.read() as conn:
            version = self.schema_version(conn)
        if version is not None:
            self._check_not_newer(version)
            if version == s.SCHEMA_VERSION:
                return
        with self.write() as conn:
            version = self.schema_version(conn)  # again: another process may have done it
            if version is None:
                s.metadata.create_all(conn)
                conn.execute(s.meta.insert().values(name="schema_version",
                                                    value=str(s.SCHEMA_VERSION)))
                return
            self._check_not_newer(version)
            while version < s.SCHEMA_VERSION:
                logger.info("migrating registry %s from schema %d", self.display, version)
                s.MIGRATIONS[version](conn)
                version += 1
                conn.execute(s.meta.update().where(s.meta.c.name == "schema_version")
                             .values(value=str(version)))
                kill_point("migration")

    def _check_not_newer(self, version: int) -> None:
        if version > s.SCHEMA_VERSION:
            msg = (f"registry {self.display} has schema version {version}, newer than "
                   f"this lamin-io understands ({s.SCHEMA_VERSION}): upgrade lamin-io")
            raise SchemaVersionError(msg)

    def close(self) -> None:
        """Release every pooled connection."""
        _open.discard(self)
        self.engine.dispose()


_INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE for "permission denied"


def _after_fork_in_child() -> None:
    """Give each database of the forked child pools of its own.

    SQLAlchemy's documented way for ``os.fork()``: ``dispose(close=False)`` drops the
    parent's pooled connections in the child without closing them (closing would end the
    parent's PostgreSQL sessions, or touch its SQLite locks); the child opens new ones.
    """
    for db in list(_open):
        db.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _unreachable(message: str) -> bool:
    """Whether a driver's error message says the server could not be reached."""
    return any(part in message for part in (
        "connection refused", "could not connect", "connection failed", "timeout expired",
        "could not translate host name", "server closed the connection", "no route to host"))
