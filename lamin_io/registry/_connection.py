"""Connecting to a registry and a default storage root.

Resolution order when :func:`connect` is called without arguments: the environment
variables ``LAMIN_IO_REGISTRY`` / ``LAMIN_IO_STORAGE``, then the settings saved by
``lamin-io connect``, then an embedded default under the user's data directory.

:func:`connect` and :func:`disconnect` reset every cached filesystem and storage client
(:func:`lamin_io.storage.reset_clients`): after switching registries or credentials,
nothing made for the previous ones is reused.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from lamin_io.errors import InvalidArgumentError
from lamin_io.registry import _schema as s
from lamin_io.registry._db import Database
from lamin_io.storage import (
    StorageSettings,
    make_local_dir,
    relative_key,
    reset_clients,
    resolve_endpoint,
    to_upath,
    without_credentials,
)

if TYPE_CHECKING:
    from upath import UPath

    from lamin_io.storage import StorageOptions

__all__ = ["Connection", "connect", "current", "disconnect"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_current: Connection | None = None


def _new_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_new_lock_after_fork)


def data_dir() -> Path:
    """Return ``$LAMIN_IO_DATA_DIR`` or the platform's user data directory."""
    env = os.environ.get("LAMIN_IO_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_data_dir

    return Path(user_data_dir("lamin-io"))


def config_file() -> Path:
    """Return the file where ``lamin-io connect`` saves its settings."""
    env = os.environ.get("LAMIN_IO_CONFIG_DIR")
    if env:
        return Path(env).expanduser().resolve() / "settings.json"
    from platformdirs import user_config_dir

    return Path(user_config_dir("lamin-io")) / "settings.json"


def _normalize_root(storage: str | os.PathLike[str]) -> str:
    text = os.fspath(storage)
    if "://" in text and not text.startswith("file://"):
        protocol = text.split("://", 1)[0].lower()
        if protocol not in ("s3", "s3a"):
            msg = f"unsupported storage {text!r}: use a local directory or s3://bucket/prefix"
            raise InvalidArgumentError(msg)
        rest = text.split("://", 1)[1].strip("/")
        if not rest:
            msg = f"storage URL {text!r} names no bucket: use s3://bucket or s3://bucket/prefix"
            raise InvalidArgumentError(msg)
        return f"s3://{rest}"
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


class Connection:
    """An open registry plus the default storage root new artifacts are uploaded into.

    Create it with :func:`lamin_io.connect`.
    """

    def __init__(self, db: Database, settings: StorageSettings) -> None:
        self.db = db
        self.settings = settings
        self._roots: dict[int, StorageSettings] = {}
        self.storage_id = self._register_root(settings)

    @property
    def registry(self) -> str:
        """Which registry this is: its URL without user, password or options.

        Records remember it; the same database reached as another user (a reader's and a
        writer's role) is the same registry.
        """
        return self.db.identity

    @property
    def root(self) -> UPath:
        """The default storage root as a path."""
        return to_upath(self.settings.root, self.settings.fsspec_options())

    def _register_root(self, settings: StorageSettings) -> int:
        """Return the root's registry id, registering it or updating its settings if needed.

        A root registered with these settings is only read: a role that may only read the
        registry connects too.
        """
        if not settings.is_remote:
            make_local_dir(Path(settings.root), f"storage root {settings.root}")
        public = settings.public_dict()
        find = select(s.storage.c.id, s.storage.c.settings).where(
            s.storage.c.root == settings.root)
        with self.db.read() as conn:
            found = conn.execute(find).one_or_none()
        if found is not None and json.loads(found.settings) == public:
            storage_id = int(found.id)
        else:
            with self.db.write() as conn:
                found = conn.execute(find).one_or_none()  # again, under the write lock
                if found is None:
                    res = conn.execute(s.storage.insert().values(
                        root=settings.root, settings=json.dumps(public),
                        created_at=datetime.now(UTC)))
                    storage_id = int(res.inserted_primary_key[0])  # type: ignore[index]
                else:
                    conn.execute(s.storage.update().where(s.storage.c.id == found.id)
                                 .values(settings=json.dumps(public)))
                    storage_id = int(found.id)
        self._roots[storage_id] = settings
        return storage_id

    def settings_for(self, storage_id: int) -> StorageSettings:
        """Return how to reach the storage root with registry id ``storage_id``."""
        if storage_id in self._roots:
            return self._roots[storage_id]
        with self.db.read() as conn:
            row = conn.execute(select(s.storage).where(s.storage.c.id == storage_id)).one()
        public = json.loads(row.settings)
        same_protocol = row.root.split("://", 1)[0] == self.settings.root.split("://", 1)[0]
        # credentials given for this connection's endpoint go to that endpoint only: another
        # root saved in the registry under another endpoint gets the other options alone
        # (timeouts, retries) and finds its credentials in the standard AWS chain
        options = dict(self.settings.options) if same_protocol else {}
        if public.get("endpoint_url") != self.settings.endpoint_url:
            options = without_credentials(options)
        settings = StorageSettings(
            root=row.root, endpoint_url=public.get("endpoint_url"),
            anon=bool(public.get("anon")), region=public.get("region"), options=options)
        self._roots[storage_id] = settings
        return settings

    def locate(self, path: UPath) -> tuple[int, str] | None:
        """Return ``(storage_id, key)`` if ``path`` lies inside a registered storage root."""
        with self.db.read() as conn:
            rows = conn.execute(select(s.storage.c.id, s.storage.c.root)).all()
        for storage_id, root in sorted(rows, key=lambda r: -len(r.root)):
            key = relative_key(path, _bare(root))
            if key:
                return int(storage_id), key
        return None

    def path_options(self, url: str) -> dict[str, Any]:
        """Return fsspec options for a URL: those of the registered root holding it, if any."""
        with self.db.read() as conn:
            rows = conn.execute(select(s.storage.c.id, s.storage.c.root)).all()
        for storage_id, root in sorted(rows, key=lambda r: -len(r.root)):
            if url == root or url.startswith(root.rstrip("/") + "/"):
                return self.settings_for(int(storage_id)).fsspec_options()
        if url.split("://", 1)[0] == self.settings.protocol:
            return self.settings.fsspec_options()
        return {}

    def close(self) -> None:
        """Release the database connections."""
        self.db.close()

    def __repr__(self) -> str:
        return f"Connection(registry={self.registry!r}, storage={self.settings!r})"


def _bare(root: str) -> UPath:
    from upath import UPath

    return UPath(root)


def _saved_settings() -> dict[str, Any]:
    path = config_file()
    if not path.exists():
        return {}
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError:
        logger.warning("ignoring unreadable lamin-io settings file %s", path)
        return {}
    return data


def url_without_password(url: str) -> tuple[str, bool]:
    """Return ``url`` without its password, and whether it carried one.

    Both places a PostgreSQL URL can hold a password are cleared: ``user:password@`` and the
    ``password=`` query parameter. A SQLite path or a URL without a password comes back
    unchanged. libpq (and so psycopg) then takes the password from ``PGPASSWORD`` or
    ``~/.pgpass``.

    Parameters
    ----------
    url
        A registry URL or SQLite path.

    Returns
    -------
    tuple[str, bool]
        The URL safe to write to disk, and ``True`` when a password was removed.

    Examples
    --------
    >>> url_without_password("postgresql://me:secret@db.example.org/lamin")
    ('postgresql://me@db.example.org/lamin', True)
    """
    if "://" not in url:
        return url, False
    from sqlalchemy.engine import URL, make_url

    parsed = make_url(url)
    if parsed.password is None and "password" not in parsed.query:
        return url, False
    # URL.set() cannot clear a field (None means "keep"), so build the URL anew
    clean = URL.create(parsed.drivername, username=parsed.username, host=parsed.host,
                       port=parsed.port, database=parsed.database,
                       query={k: v for k, v in parsed.query.items() if k != "password"})
    return clean.render_as_string(hide_password=False), True


def save_settings(values: dict[str, Any]) -> Path:
    """Persist non-secret connection settings for later ``lamin-io`` commands.

    A password in ``values["registry"]`` is dropped before anything is written (see
    :func:`url_without_password`).

    Parameters
    ----------
    values
        The settings: ``registry``, ``storage``, ``endpoint_url``, ``anon``.

    Returns
    -------
    Path
        The settings file written.
    """
    values = dict(values)
    if isinstance(values.get("registry"), str):
        values["registry"], _ = url_without_password(values["registry"])
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))
    return path


def connect(
    registry: str | os.PathLike[str] | None = None,
    storage: str | os.PathLike[str] | None = None,
    *,
    endpoint_url: str | None = None,
    anon: bool = False,
    region: str | None = None,
    storage_options: StorageOptions | dict[str, Any] | None = None,
    busy_timeout: float = 30.0,
    pool_size: int | None = None,
) -> Connection:
    """Connect to a registry and a default storage root, and make them current.

    Parameters
    ----------
    registry
        A SQLite file path or a ``postgresql://`` URL. Default: ``$LAMIN_IO_REGISTRY``,
        then the saved settings, then ``<user data dir>/registry.db``.
    storage
        A local directory or ``s3://bucket/prefix`` that new artifacts are uploaded into.
        Default: ``$LAMIN_IO_STORAGE``, then the saved settings, then
        ``<user data dir>/storage``.
    endpoint_url
        S3-compatible endpoint; ``AWS_ENDPOINT_URL`` is honoured as boto3 does.
    anon
        Anonymous access (public buckets).
    region
        AWS region, when it must be set explicitly.
    storage_options
        Further s3fs options (credentials here stay in memory only).
    busy_timeout
        Seconds to wait for another writer's lock before :class:`RegistryLockedError`.
    pool_size
        PostgreSQL connections this process keeps open (default: ``LAMIN_IO_POOL_SIZE``,
        else 2); up to 8 more open while more threads need one at once. Pooled
        connections are pinged before use and replaced after 30 minutes; a server that
        does not answer fails after 10 s (``connect_timeout`` in the URL overrides).
        A forked process (a DataLoader worker) opens its own. SQLite ignores it.

    Every cached filesystem and storage client is reset
    (:func:`lamin_io.storage.reset_clients`): the previous connection's credentials are
    never reused. The PostgreSQL password comes from the URL, ``PGPASSWORD`` or
    ``~/.pgpass``; only ``lamin-io connect`` saves settings, never a password.

    Returns
    -------
    The new current :class:`Connection`.

    Examples
    --------
    >>> import lamin_io as ln                                          # doctest: +SKIP
    >>> ln.connect("my.db", "s3://bucket/data", endpoint_url="http://127.0.0.1:9000")
    """
    global _current
    saved = _saved_settings()
    registry = registry or os.environ.get("LAMIN_IO_REGISTRY") or saved.get("registry") \
        or data_dir() / "registry.db"
    explicit = storage or os.environ.get("LAMIN_IO_STORAGE")
    storage = explicit or saved.get("storage") or data_dir() / "storage"
    # the saved endpoint and anonymous access belong to the saved storage: a storage given
    # here (or in LAMIN_IO_STORAGE) gets them only when it is that same storage
    saved_storage = saved.get("storage")
    if not explicit or (saved_storage is not None
                        and _normalize_root(explicit) == _normalize_root(saved_storage)):
        if endpoint_url is None and "endpoint_url" in saved:
            endpoint_url = saved["endpoint_url"]
        anon = anon or bool(saved.get("anon"))
    root = _normalize_root(storage)
    settings = StorageSettings(
        root=root,
        endpoint_url=resolve_endpoint(endpoint_url) if "://" in root else None,
        anon=anon, region=region, options=dict(storage_options or {}))
    db = Database(os.fspath(registry), busy_timeout=busy_timeout, pool_size=pool_size)
    try:
        conn = Connection(db, settings)
    except BaseException:
        db.close()
        raise
    with _lock:
        if _current is not None:
            _current.close()
        _current = conn
        reset_clients()
    logger.info("connected to %s with storage %s", conn.registry, root)
    return conn


def current() -> Connection:
    """Return the current connection, connecting to the defaults on first use."""
    with _lock:
        conn = _current
    return conn if conn is not None else connect()


def disconnect() -> None:
    """Close the current connection; the next registry call connects to the defaults.

    Every cached filesystem and storage client is reset too (see :func:`connect`).
    """
    global _current
    with _lock:
        if _current is not None:
            _current.close()
        _current = None
        reset_clients()
