"""Lineage: transforms, runs, and which artifacts and collections a run read and saved.

A :class:`Transform` is the code: a script, a notebook or a named pipeline step, versioned
by its source's hash. A :class:`Run` is one execution of it. :func:`track` starts a run for
the calling script; while it is active, every saved artifact or collection that is opened,
loaded, cached or mapped becomes one of its inputs (once, and never when this run saved it),
and every artifact or collection saved is one of its outputs. :func:`finish` ends it.

The active run belongs to the process, not to a thread: reads and saves from any thread of
the tracking process are recorded, as are saves of forked children (DataLoader workers read
through paths, not records, so they add no inputs). A run belongs to the registry it was
started in: reads and saves while connected to another registry are not linked to it (a
warning says so once).
"""

from __future__ import annotations

import atexit
import getpass
import hashlib
import inspect
import json
import logging
import os
import socket
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from lamin_io.errors import InvalidArgumentError
from lamin_io.registry import _schema as s
from lamin_io.registry._connection import current
from lamin_io.registry._record import Record, RecordSet, Versioned, new_uid

if TYPE_CHECKING:
    from types import TracebackType

    from lamin_io.registry._artifact import ArtifactSet

__all__ = ["Run", "RunSet", "Transform", "TransformSet", "active_run", "finish", "track"]

logger = logging.getLogger(__name__)

RUNNING, COMPLETED, FAILED = "running", "completed", "failed"
#: What a transform can be: a script file, a Jupyter notebook, a named step (no source file).
KINDS = ("script", "notebook", "pipeline")

_lock = threading.RLock()
_active: Run | None = None
_hooks_installed = False
_warned_registry: set[str] = set()


class Transform(Record):
    """The code a run executes: a script, a notebook or a named pipeline step.

    Made by :func:`track`; one transform per name and source content, so editing a script
    makes a new version (``version`` is the start of its source's SHA-256).
    """

    _table: ClassVar = s.transform
    _kind: ClassVar[str] = "transform"
    _fields: ClassVar[tuple[str, ...]] = (
        "uid", "name", "kind", "version", "hash", "reference", "created_at",
    )

    @classmethod
    def _visible(cls) -> list[Any]:
        return []

    @property
    def name(self) -> str:
        """The script's or notebook's file name, or the name given to :func:`track`."""
        return str(self._saved().name)

    @property
    def kind(self) -> str:
        """``"script"``, ``"notebook"`` or ``"pipeline"``."""
        return str(self._saved().kind)

    @property
    def version(self) -> str:
        """The first 12 hex digits of the source's SHA-256."""
        return str(self._saved().version)

    @property
    def hash(self) -> str:
        """The SHA-256 of the source (of the name, for a pipeline step without a file)."""
        return str(self._saved().hash)

    @property
    def reference(self) -> str | None:
        """Where the source was when it ran (an absolute path), if it had a file."""
        return self._saved().reference

    @property
    def runs(self) -> RunSet:
        """The runs of this transform, oldest first."""
        registry = self._conn()
        with registry.db.read() as c:
            rows = c.execute(select(s.run).where(s.run.c.transform_id == self._saved().id)
                             .order_by(s.run.c.id)).all()
        return RunSet([Run._from_row(r, registry.registry) for r in rows])

    def _summary(self) -> dict[str, Any]:
        row = self._saved()
        return {"uid": row.uid, "name": row.name, "kind": row.kind, "version": row.version,
                "reference": row.reference, "created_at": row.created_at}

    def __repr__(self) -> str:
        if self._row is None:
            return "Transform(unsaved)"
        r = self._row
        return f"Transform(name={r.name!r}, kind={r.kind!r}, version={r.version!r}, uid={r.uid!r})"


class TransformSet(RecordSet[Transform]):
    """A list-like result of :meth:`Transform.filter`."""


Transform._set = TransformSet


class Run(Record):
    """One execution of a :class:`Transform`, with the records it read and saved.

    Start one with :func:`track`; it is also a context manager that finishes the run (as
    failed when the block raises).

    Examples
    --------
    >>> with ln.track(params={"lr": 1e-3}) as run:                        # doctest: +SKIP
    ...     adata = ln.Artifact.get(key="pbmc/raw.h5ad").load()
    ...     ln.Artifact("clean.h5ad", key="pbmc/clean.h5ad").save()
    >>> run.inputs, run.outputs
    """

    _table: ClassVar = s.run
    _kind: ClassVar[str] = "run"
    #: Set on the run :func:`track` started: its process, and the inputs recorded so far.
    _pid: int | None = None
    _seen: set[tuple[str, int]] | None = None
    _fields: ClassVar[tuple[str, ...]] = (
        "uid", "status", "started_at", "finished_at", "user", "host",
    )

    @classmethod
    def _visible(cls) -> list[Any]:
        return []

    @classmethod
    def _related(cls, lookups: dict[str, Any]) -> list[Any]:
        if "transform" not in lookups:
            return []
        value = lookups.pop("transform")
        t = s.transform
        which = t.c.uid == value.uid if hasattr(value, "uid") else \
            (t.c.uid == value) | (t.c.name == value)
        return [s.run.c.transform_id.in_(select(t.c.id).where(which))]

    @property
    def created_at(self) -> datetime:
        """When the run started (UTC); the same as :attr:`started_at`."""
        return self._saved().started_at

    @property
    def started_at(self) -> datetime:
        """When the run started (UTC)."""
        return self._saved().started_at

    @property
    def finished_at(self) -> datetime | None:
        """When the run ended (UTC); ``None`` while it runs (or if its process was killed)."""
        self._refresh()
        return self._saved().finished_at

    @property
    def status(self) -> str:
        """``"running"``, ``"completed"`` or ``"failed"``."""
        self._refresh()
        return str(self._saved().status)

    @property
    def error(self) -> str | None:
        """For a failed run: the exception's type and first line."""
        self._refresh()
        return self._saved().error

    @property
    def user(self) -> str | None:
        """The operating-system user who ran it."""
        return self._saved().user

    @property
    def host(self) -> str | None:
        """The machine it ran on."""
        return self._saved().host

    @property
    def params(self) -> dict[str, Any]:
        """The parameters given to :func:`track`."""
        raw = self._saved().params
        return {} if raw is None else dict(json.loads(raw))

    @property
    def transform(self) -> Transform:
        """The code this run executed."""
        registry = self._conn()
        with registry.db.read() as c:
            row = c.execute(select(s.transform)
                            .where(s.transform.c.id == self._saved().transform_id)).one()
        return Transform._from_row(row, registry.registry)

    @property
    def inputs(self) -> RecordSet[Versioned]:
        """The artifacts and collections this run read, in the order it first read them."""
        from lamin_io.registry._artifact import Artifact
        from lamin_io.registry._collection import Collection

        registry = self._conn()
        ri, a, c_ = s.run_input, s.artifact, s.collection
        with registry.db.read() as c:
            links = c.execute(select(ri.c.artifact_id, ri.c.collection_id)
                              .where(ri.c.run_id == self._saved().id).order_by(ri.c.id)).all()
            artifacts = {r.id: r for r in c.execute(select(a).where(a.c.id.in_(
                [x.artifact_id for x in links if x.artifact_id is not None])))}
            collections = {r.id: r for r in c.execute(select(c_).where(c_.c.id.in_(
                [x.collection_id for x in links if x.collection_id is not None])))}
        out: list[Versioned] = []
        for link in links:
            if link.artifact_id in artifacts:
                out.append(Artifact._from_row(artifacts[link.artifact_id], registry.registry))
            elif link.collection_id in collections:
                out.append(Collection._from_row(collections[link.collection_id],
                                                registry.registry))
        return RecordSet(out)

    @property
    def outputs(self) -> RecordSet[Versioned]:
        """The artifacts, then the collections, this run saved, in the order it saved them."""
        from lamin_io.registry._artifact import Artifact
        from lamin_io.registry._collection import Collection

        self._conn()  # (a run of this registry only)
        found: list[Versioned] = [*Artifact.filter(run=self), *Collection.filter(run=self)]
        return RecordSet(found)

    @property
    def output_artifacts(self) -> ArtifactSet:
        """The artifacts this run saved, in order."""
        from lamin_io.registry._artifact import Artifact, ArtifactSet

        self._conn()  # (a run of this registry only)
        return ArtifactSet(list(Artifact.filter(run=self)))

    def finish(self, *, failed: BaseException | None = None) -> Self:
        """End this run: completed, or failed with ``failed``'s type and first line.

        A run that has already ended is left as it is. If it is the active run, no run is
        active afterwards.
        """
        global _active
        with _lock:
            if _active is not None and _active == self:
                _active = None
        row = self._saved()
        error = None
        if failed is not None:
            first = next(iter(str(failed).splitlines()), "")
            error = f"{type(failed).__name__}: {first}"[:1000]
        with self._conn().db.write() as c:
            c.execute(update(s.run).where(s.run.c.id == row.id, s.run.c.status == RUNNING)
                      .values(status=FAILED if failed is not None else COMPLETED,
                              finished_at=datetime.now(UTC), error=error))
        self._refresh()
        logger.info("run %s of %s %s", row.uid, self.transform.name, self._saved().status)
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and isinstance(exc, SystemExit) and exc.code in (0, None):
            exc = None
        self.finish(failed=exc)

    def view_lineage(self, *, image: str | os.PathLike[str] | None = None) -> str:
        """Print and return the run's inputs and outputs as a text tree.

        See :meth:`Artifact.view_lineage`; ``image=`` also writes a graph with graphviz.
        """
        from lamin_io.registry._lineage import view_lineage

        return view_lineage(self, image=image)

    def describe(self) -> str:
        """Print and return a readable summary: transform, timing, inputs and outputs."""
        row = self._saved()
        transform = self.transform
        lines = [f"Run {row.uid}",
                 f"  transform    {transform.name} ({transform.kind}, {transform.version})",
                 f"  status       {self.status}"
                 + (f": {row.error}" if row.error else ""),
                 f"  started_at   {row.started_at:%Y-%m-%d %H:%M:%S}",
                 "  finished_at  " + (f"{row.finished_at:%Y-%m-%d %H:%M:%S}"
                                       if row.finished_at else "-"),
                 f"  user         {row.user or '-'} on {row.host or '-'}"]
        if row.params:
            lines.append(f"  params       {row.params}")
        lines += [f"  input        {_label(r)}" for r in self.inputs]
        lines += [f"  output       {_label(r)}" for r in self.outputs]
        text = "\n".join(lines)
        print(text)
        return text

    def _summary(self) -> dict[str, Any]:
        row = self._saved()
        return {"uid": row.uid, "transform": self.transform.name, "status": row.status,
                "started_at": row.started_at, "finished_at": row.finished_at,
                "user": row.user, "host": row.host}

    def __repr__(self) -> str:
        if self._row is None:
            return "Run(unsaved)"
        r = self._row
        return (f"Run(uid={r.uid!r}, status={r.status!r}, "
                f"started_at={r.started_at:%Y-%m-%d %H:%M:%S})")


class RunSet(RecordSet[Run]):
    """A list-like result of :meth:`Run.filter`."""


Run._set = RunSet


def _label(record: Versioned) -> str:
    kind = type(record).__name__.lower()
    return f"{kind} {record.key or record.uid} (v{record.version}, uid {record.uid})"


# -- tracking -------------------------------------------------------------------------------

def active_run() -> Run | None:
    """Return the run :func:`track` started in this process, or ``None``."""
    with _lock:
        return _active


def _caller_source() -> tuple[Path | None, str]:
    """Return the calling script's or notebook's file, and its kind.

    The first frame outside lamin-io names the script; in Jupyter, ``JPY_SESSION_NAME``
    names the notebook.
    """
    notebook = os.environ.get("JPY_SESSION_NAME")
    if notebook and Path(notebook).is_file():
        return Path(notebook), "notebook"
    package = str(Path(__file__).resolve().parents[1])
    frame = inspect.currentframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(package):
            path = Path(filename)
            return (path.resolve(), "script") if path.is_file() else (None, "pipeline")
        frame = frame.f_back
    return None, "pipeline"


def _get_or_create_transform(name: str | None, source: Path | None,
                             kind: str) -> tuple[str, int]:
    if source is not None:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        name = name or source.name
    else:
        if not name:
            msg = ("cannot tell which script is running (an interactive session): name the "
                   "work with lamin_io.track(name='...')")
            raise InvalidArgumentError(msg)
        digest = hashlib.sha256(f"pipeline:{name}".encode()).hexdigest()
    t = s.transform
    with current().db.write() as c:
        row = c.execute(select(t).where(t.c.name == name, t.c.hash == digest)).one_or_none()
        if row is None:
            c.execute(t.insert().values(
                uid=new_uid(), name=name, kind=kind, version=digest[:12], hash=digest,
                reference=None if source is None else str(source),
                created_at=datetime.now(UTC)))
            row = c.execute(select(t).where(t.c.name == name, t.c.hash == digest)).one()
    return str(name), int(row.id)


def track(name: str | None = None, *, params: dict[str, Any] | None = None,
          source: str | os.PathLike[str] | None = None) -> Run:
    """Start a run of the calling script (or notebook) and make it the active run.

    While it is active, every saved artifact or collection opened, loaded, cached or mapped
    is recorded once as an input (unless this run saved it, or the call passed
    ``is_run_input=False``) and every artifact or collection saved is an output. End it
    with :func:`finish`, or use the returned run as a context manager. An uncaught
    exception marks it failed; a script that ends without :func:`finish` is marked
    completed when the interpreter exits; a killed process leaves it ``"running"``.
    Tracking again while a run is active finishes that run first.

    Parameters
    ----------
    name
        The transform's name. Default: the script's or notebook's file name; required in an
        interactive session (the transform is then a ``"pipeline"`` step).
    params
        Parameters to keep with the run (JSON-serializable).
    source
        The file whose content versions the transform. Default: the calling script.

    Returns
    -------
    Run
        The new active run.

    Examples
    --------
    >>> import lamin_io as ln                                             # doctest: +SKIP
    >>> with ln.track(params={"resolution": 0.8}) as run:
    ...     adata = ln.Artifact.get(key="pbmc/raw.h5ad").load()
    ...     ln.Artifact("clusters.parquet", key="pbmc/clusters.parquet").save()
    """
    global _active
    if params is not None:
        if not isinstance(params, dict):
            msg = f"params must be a dict, got {type(params).__name__}"
            raise InvalidArgumentError(msg)
        try:
            params_text = json.dumps(params, sort_keys=True)
        except (TypeError, ValueError) as exc:
            msg = f"params must be JSON-serializable (numbers, strings, lists, dicts): {exc}"
            raise InvalidArgumentError(msg) from None
    if source is not None:
        path: Path | None = Path(source).expanduser().resolve()
        if not path.is_file():  # type: ignore[union-attr]
            msg = f"source {source} is not a file: give the script or notebook that runs"
            raise InvalidArgumentError(msg)
        kind = "notebook" if path.suffix == ".ipynb" else "script"  # type: ignore[union-attr]
    else:
        path, kind = _caller_source()
    previous = active_run()
    if previous is not None:
        logger.warning("run %s was still active: finishing it before starting a new one",
                       previous.uid)
        previous.finish()
    transform_name, transform_id = _get_or_create_transform(name, path, kind)
    conn = current()
    uid = new_uid()
    with conn.db.write() as c:
        c.execute(s.run.insert().values(
            uid=uid, transform_id=transform_id, status=RUNNING,
            started_at=datetime.now(UTC), finished_at=None, user=_os_user(),
            host=socket.gethostname(), params=None if params is None else params_text))
        row = c.execute(select(s.run).where(s.run.c.uid == uid)).one()
    run = Run._from_row(row, conn.registry)
    run._pid, run._seen = os.getpid(), set()
    with _lock:
        _active = run
    _install_hooks()
    logger.info("tracking run %s of %s", uid, transform_name)
    return run


def finish() -> Run:
    """End the active run as completed and return it.

    Raises
    ------
    InvalidArgumentError
        No run is active.
    """
    run = active_run()
    if run is None:
        msg = "no run is active: start one with lamin_io.track()"
        raise InvalidArgumentError(msg)
    return run.finish()


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # (no user name in a bare container)
        return None


def _install_hooks() -> None:
    """Mark the active run failed on an uncaught exception, completed at a clean exit."""
    global _hooks_installed
    with _lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    previous_hook = sys.excepthook

    def excepthook(exc_type: type[BaseException], exc: BaseException,
                   tb: TracebackType | None) -> None:
        _end_at_exit(failed=exc)
        previous_hook(exc_type, exc, tb)

    sys.excepthook = excepthook
    atexit.register(_end_at_exit)


def _end_at_exit(failed: BaseException | None = None) -> None:
    run = active_run()
    if run is None or run._pid != os.getpid():  # noqa: SLF001
        return  # (a forked child exiting is not the end of its parent's run)
    try:
        run.finish(failed=failed)
    except Exception:  # noqa: BLE001 (at exit: the registry may be gone; say so, go on)
        logger.warning("could not record the end of run %s", run.uid, exc_info=True)


def _linked_run(record_registry: str) -> Run | None:
    """Return the active run if it belongs to ``record_registry``; warn once otherwise."""
    run = active_run()
    if run is None:
        return None
    if run._registry != record_registry:  # noqa: SLF001
        with _lock:
            first = run.uid not in _warned_registry
            _warned_registry.add(run.uid)
        if first:
            logger.warning("run %s belongs to registry %s; reads and saves in %s are not "
                           "linked to it", run.uid, run._registry, record_registry)  # noqa: SLF001
        return None
    return run


def run_id_for_save(registry: str) -> int | None:
    """Return the id of the run a record saved now in ``registry`` is an output of."""
    run = _linked_run(registry)
    return None if run is None else int(run._saved().id)  # noqa: SLF001


def record_input(record: Versioned, *, is_run_input: bool | None) -> None:
    """Record that the active run read ``record`` (once; never its own output).

    ``is_run_input=False`` skips it; ``True`` without an active run warns.
    """
    if is_run_input is False or record._row is None:  # noqa: SLF001
        return
    registry = record._conn()  # noqa: SLF001
    run = _linked_run(registry.registry)
    if run is None:
        if is_run_input:
            logger.warning("is_run_input=True, but no run is active: start one with "
                           "lamin_io.track() to record inputs")
        return
    row = record._saved()  # noqa: SLF001
    if row.run_id is not None and row.run_id == run._saved().id:  # noqa: SLF001
        return  # (an output of this run read back is no input of it)
    column = f"{record._kind}_id"  # noqa: SLF001
    seen = run._seen if run._seen is not None else set()  # noqa: SLF001
    with _lock:
        if (column, row.id) in seen:
            return
    ri, run_id = s.run_input, run._saved().id  # noqa: SLF001
    try:
        with registry.db.write() as c:
            exists = c.execute(select(ri.c.id).where(ri.c.run_id == run_id,
                                                     ri.c[column] == row.id)).first()
            if exists is None:
                c.execute(ri.insert().values(run_id=run_id, recorded_at=datetime.now(UTC),
                                             **{column: row.id}))
    except IntegrityError:
        pass  # (another thread of this run recorded it first)
    with _lock:
        seen.add((column, row.id))
