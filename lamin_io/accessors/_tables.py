"""Tables: parquet, csv, tsv, Arrow IPC/Feather, JSON Lines and ORC, as files or folders.

``open()`` gives a ``pyarrow.dataset.Dataset`` (the default engine) or, with
``engine="polars"``, a :class:`PolarsScan`: a context manager yielding a ``polars.LazyFrame``;
past one machine, ``engine="dask"`` gives a Dask DataFrame and ``engine="ray"`` a Ray
Dataset over the same files and storage settings (computed on whatever cluster the caller
started: lamin-io starts none).
``load()`` gives a pandas DataFrame. Which engine reads which format is the data in
:data:`TABLE_FORMATS` and :data:`ENGINES`, not a chain of branches.

Folders
-------
A folder is one table made of its *data files*: every file below it except those with a
path component (relative to the folder) that starts with ``.`` or ``_`` (``_SUCCESS``,
``_metadata``, ``_common_metadata``, ``.crc`` files, ``_temporary/``), as Spark, Hive and
pyarrow agree. A folder named with a table suffix (``sales.parquet/``) holds that format;
its data files carry one of that format's suffixes or none. A folder without a suffix
(``sales/``) takes the one format its data files name by their suffixes (the format table
routes suffix ``""`` here through the :func:`is_table_folder` probe). Directories named
``key=value`` make a folder hive-partitioned: each key comes back as a column.

Engines get the explicit, sorted list of data files, never a directory to list again, so
both see the same files; on S3 pyarrow reads through its native ``S3FileSystem`` and polars
through its native object store, both configured from the path's storage settings (see
:mod:`lamin_io.storage._engines`), so scans fetch byte ranges with predicate and projection
pushdown.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamin_io.accessors._formats import parameters
from lamin_io.errors import (
    InvalidArgumentError,
    LaminIOError,
    MissingDependencyError,
    UnsupportedFormatError,
    WriteNotSupportedError,
)
from lamin_io.storage import (
    is_local,
    missing_path,
    polars_credential_provider,
    polars_storage_options,
    pyarrow_filesystem,
    storage_error,
    storage_errors,
    suffix_of,
    to_upath,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds
    from upath import UPath

    from lamin_io.accessors._formats import Format
    from lamin_io.storage import PathLike

__all__ = [
    "ENGINES",
    "TABLE_FORMATS",
    "Engine",
    "PolarsScan",
    "TableFormat",
    "TableSource",
    "is_table_folder",
    "load_table",
    "open_many",
    "open_table",
    "resolve_table",
    "table_keywords",
]

#: Path components starting with these are not data (``_SUCCESS``, ``.crc``, ``_metadata``).
HIDDEN_PREFIXES = (".", "_")


@dataclass(frozen=True)
class TableFormat:
    """How each engine reads one table format: one row of the support matrix.

    Parameters
    ----------
    name
        The format's name in the format table (``"parquet"``); its suffixes live there.
    pandas
        ``pandas`` reader that :func:`load_table` uses for a single file.
    pyarrow
        ``pyarrow.dataset`` format name, or ``None`` if pyarrow cannot read it.
    polars
        ``polars`` scan function, or ``None`` if polars cannot scan it.
    dask
        ``dask.dataframe`` reader, or ``None`` if Dask cannot read it.
    ray
        ``ray.data`` reader, or ``None`` if Ray cannot read it.
    delimiter
        Field separator of delimited text, given to every engine in its own spelling.
    hive
        Engines that read hive partitions of this format.
    polars_options
        Options always given to the polars scan (user keywords override them).
    pandas_options
        Options always given to the pandas reader (user keywords override them).
    pandas_remote
        How the pandas reader reads a remote file: given its URL and ``storage_options``
        (``"storage_options"``), or an open fsspec file (``"file"``).
    """

    name: str
    pandas: str
    pyarrow: str | None = None
    polars: str | None = None
    dask: str | None = None
    ray: str | None = None
    delimiter: str | None = None
    hive: tuple[str, ...] = ("pyarrow",)
    polars_options: Mapping[str, Any] = field(default_factory=dict)
    pandas_options: Mapping[str, Any] = field(default_factory=dict)
    pandas_remote: str = "storage_options"


@dataclass(frozen=True)
class Engine:
    """A library that opens tables lazily.

    Parameters
    ----------
    name
        What users pass as ``engine=``.
    module
        Imported when the engine is first used.
    extra
        The ``lamin-io[...]`` extra that installs it, if it is optional.
    open
        ``(sources, *, use_fsspec, kwargs, after)`` returning the opened table; ``after``
        (or ``None``) is to be called once a scan of it has finished.
    reader
        ``"module:function"`` that receives the user's keywords; ``{reader}`` stands for
        the format's reader of this engine (its :class:`TableFormat` field of that name).
    fsspec_hive
        Whether it still reads hive partitions with ``use_fsspec=True``.
    decodes
        Whether opening reads the files (a schema, a footer), so that a reader's failure
        then means damage; engines that only plan (Dask, Ray) decode later, on their
        workers, and their errors at open are about the call.
    """

    name: str
    module: str
    extra: str | None
    open: Callable[..., Any]
    reader: str
    fsspec_hive: bool = True
    decodes: bool = True


def _formats_of(engine: str) -> list[str]:
    return [f.name for f in TABLE_FORMATS.values() if getattr(f, engine) is not None]


def _engines_of(fmt: TableFormat) -> list[str]:
    return [e for e in ENGINES if getattr(fmt, e) is not None]


def _import_engine(engine: str) -> Any:
    spec = ENGINES.get(engine) if isinstance(engine, str) else None
    if spec is None:
        msg = (f"unknown engine {engine!r}; engines: "
               + "; ".join(f"{e.name!r} ({', '.join(_formats_of(e.name))})"
                           for e in ENGINES.values()))
        raise InvalidArgumentError(msg)
    try:
        return importlib.import_module(spec.module)
    except ImportError as exc:
        hint = f"pip install 'lamin-io[{spec.extra}]'" if spec.extra else "reinstall lamin-io"
        msg = f"engine {engine!r} needs {exc.name or spec.module}: {hint}"
        raise MissingDependencyError(msg) from exc


# -- what a path holds -----------------------------------------------------------------------


@dataclass(frozen=True)
class TableSource:
    """One table file or folder, resolved: its format and its data files.

    Parameters
    ----------
    path
        The file or folder as given.
    format
        Its table format.
    files
        Data files, as ``path.fs`` spells them (``bucket/key`` on S3), sorted.
    folder
        Whether ``path`` is a folder.
    hive
        Whether the folder is hive-partitioned (``key=value`` directories).
    """

    path: UPath
    format: TableFormat
    files: tuple[str, ...]
    folder: bool
    hive: bool

    @property
    def root(self) -> str:
        """The folder (or file) as ``path.fs`` spells it."""
        return str(self.path.path).rstrip("/")


def _table_format(suffix: str) -> TableFormat | None:
    """Return the table format the format table gives ``suffix``, if it is a table."""
    from lamin_io.accessors._formats import format_for

    try:
        fmt = format_for(suffix, what="open")
    except UnsupportedFormatError:
        return None
    return TABLE_FORMATS.get(fmt.name)


def _table_suffixes() -> str:
    from lamin_io.accessors._formats import formats

    return ", ".join(s for f in formats() if f.name in TABLE_FORMATS for s in f.suffixes)


def _data_files(path: UPath) -> dict[str, str]:
    """Return ``{relative path: fs path}`` of the data files below a folder."""
    root = str(path.path).rstrip("/")
    out = {}
    for found in path.fs.find(root, withdirs=False):
        rel = str(found)[len(root) + 1:]
        if rel and not any(part.startswith(HIDDEN_PREFIXES) for part in rel.split("/")):
            out[rel] = str(found)
    return dict(sorted(out.items()))


def _shown(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _folder_format(path: UPath, files: dict[str, str]) -> TableFormat:
    """Return the one format of a folder's data files (the folder's suffix, if it has one)."""
    named = _table_format(suffix_of(path.name)) if suffix_of(path.name) else None
    by_format: dict[str, list[str]] = {}
    for rel in files:
        suffix = suffix_of(rel.rsplit("/", 1)[-1])
        fmt = named if (named is not None and not suffix) else _table_format(suffix)
        name = fmt.name if fmt is not None else f"not a table ({suffix or 'no suffix'})"
        by_format.setdefault(name, []).append(rel)
    tables = [name for name in by_format if name in TABLE_FORMATS]
    if len(by_format) == 1 and tables:
        return TABLE_FORMATS[tables[0]]
    listing = "; ".join(f"{name}: {_shown(rels)}" for name, rels in by_format.items())
    if named is not None:
        msg = (f"folder {path} is named as {named.name} but holds other files ({listing}); "
               f"a table folder holds files of one format (files starting with '.' or '_' "
               f"are skipped)")
    elif len(tables) > 1:
        msg = (f"folder {path} mixes table formats ({listing}); a table folder holds files "
               f"of one format: open each format separately")
    elif "not a table (no suffix)" in by_format:
        msg = (f"cannot tell the table format of folder {path}: some files have no suffix "
               f"({listing}); name the folder with its format's suffix, e.g. 'name.parquet'")
    else:
        msg = (f"folder {path} holds files that are not tables ({listing}); table suffixes: "
               f"{_table_suffixes()}")
    raise UnsupportedFormatError(msg)


def resolve_table(path: UPath) -> TableSource:
    """Find what a table path holds: its format and data files.

    Parameters
    ----------
    path
        A normalized table file or folder.

    Raises
    ------
    PathNotFoundError
        Nothing is stored at ``path``.
    UnsupportedFormatError
        It is not a table, a folder mixes formats, or a folder holds no data files.
    """
    with storage_errors(str(path), dict(path.storage_options).get("endpoint_url")):
        try:
            info = path.fs.info(path.path)
        except FileNotFoundError as exc:
            raise missing_path(path) from exc
        folder = info.get("type") == "directory"
        files = _data_files(path) if folder else {path.name: str(path.path)}
    if not folder:
        fmt = _table_format(suffix_of(path.name))
        if fmt is None and not suffix_of(path.name):
            from lamin_io.accessors._formats import supported_suffixes

            msg = (f"cannot open {path}: a file without a suffix; supported suffixes: "
                   f"{', '.join(s for s in supported_suffixes() if s)}")
            raise UnsupportedFormatError(msg)
        if fmt is None:
            msg = (f"cannot open {path} ({suffix_of(path.name)!r}) as a table; table "
                   f"suffixes: {_table_suffixes()}, or a folder of such files")
            raise UnsupportedFormatError(msg)
        return TableSource(path, fmt, tuple(files.values()), folder=False, hive=False)
    suffix = suffix_of(path.name)
    if suffix and _table_format(suffix) is None:
        msg = (f"cannot open folder {path} ({suffix!r}) as a table; table suffixes: "
               f"{_table_suffixes()}, or a folder without a suffix")
        raise UnsupportedFormatError(msg)
    if not files:
        msg = (f"folder {path} holds no data files (files starting with '.' or '_' are "
               f"skipped); table suffixes: {_table_suffixes()}")
        raise UnsupportedFormatError(msg)
    fmt = _folder_format(path, files)
    hive = any("=" in part for rel in files for part in rel.split("/")[:-1])
    return TableSource(path, fmt, tuple(files.values()), folder=True, hive=hive)


@contextlib.contextmanager
def _decoding(path: UPath, what: str, keywords: Mapping[str, Any]) -> Iterator[None]:
    """Report a reader's failure to decode a table as :class:`CorruptArtifactError`.

    Storage failures are translated first (:func:`storage_errors`); a file gone meanwhile
    is a missing path; an error raised by lamin-io's own code surfaces as itself. With
    ``keywords`` given by the caller, a reader's ``ValueError`` (a column that is not
    there, a wrong type) is most likely about them: an :class:`InvalidArgumentError`.
    """
    from lamin_io.accessors.readpath.source import reader_error

    try:
        with storage_errors(str(path), dict(path.storage_options).get("endpoint_url")):
            yield
    except LaminIOError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError) and not path.exists():
            raise missing_path(path) from exc
        if keywords and isinstance(exc, ValueError) and not isinstance(exc, OSError):
            msg = (f"reading {what} with {', '.join(f'{k}=' for k in sorted(keywords))} "
                   f"failed: {exc}; check those keywords")
            raise InvalidArgumentError(msg) from exc
        typed = reader_error(exc, what, "")
        if typed is None:
            raise
        raise typed from exc


def is_table_folder(path: UPath) -> bool:
    """Probe for suffix ``""``: whether ``path`` is a folder holding table files."""
    try:
        if path.fs.info(path.path).get("type") != "directory":
            return False
        return any(_table_format(suffix_of(rel.rsplit("/", 1)[-1])) is not None
                   for rel in _data_files(path))
    except (OSError, ValueError):
        return False


# -- engines ---------------------------------------------------------------------------------


def _store_key(path: UPath) -> tuple[str, str]:
    """Return what identifies a filesystem: protocol and options (compared, never shown)."""
    if is_local(path):
        return ("file", "")
    return (path.protocol, json.dumps(dict(path.storage_options), sort_keys=True, default=repr))


def _batches(sources: list[TableSource]) -> list[list[TableSource]]:
    """Group neighbouring sources that one engine call reads: one filesystem, no hive."""
    batches: list[list[TableSource]] = []
    for s in sources:
        last = batches[-1] if batches else None
        if (last is not None and not s.hive and not last[0].hive
                and _store_key(last[0].path) == _store_key(s.path)):
            last.append(s)
        else:
            batches.append([s])
    return batches


def _pyarrow_format(fmt: TableFormat) -> Any:
    import pyarrow.dataset as ds

    if fmt.delimiter is not None:
        import pyarrow.csv

        return ds.CsvFileFormat(parse_options=pyarrow.csv.ParseOptions(delimiter=fmt.delimiter))
    return fmt.pyarrow


def _open_pyarrow(sources: list[TableSource], *, use_fsspec: bool, kwargs: dict[str, Any],
                  after: Callable[[], Any] | None = None) -> ds.Dataset:
    """Open the sources as one pyarrow dataset (``after``: no scan here to follow)."""
    import pyarrow.dataset as ds

    def one(batch: list[TableSource]) -> ds.Dataset:
        first = batch[0]
        options: dict[str, Any] = {
            "format": _pyarrow_format(first.format),
            "filesystem": pyarrow_filesystem(first.path, use_fsspec=use_fsspec)}
        if first.hive:
            options.update(partitioning="hive", partition_base_dir=first.root)
        options.update(kwargs)
        return ds.dataset([f for s in batch for f in s.files], **options)

    batches = _batches(sources)
    if len(batches) == 1:
        return one(batches[0])
    return ds.dataset([one(b) for b in batches], schema=kwargs.get("schema"))


def _polars_scan(sources: list[TableSource], *, use_fsspec: bool, kwargs: dict[str, Any],
                 stack: contextlib.ExitStack) -> pl.LazyFrame:
    import polars as pl

    fmt = sources[0].format
    scan = getattr(pl, str(fmt.polars))

    def one(batch: list[TableSource]) -> pl.LazyFrame:
        first = batch[0]
        options: dict[str, Any] = dict(fmt.polars_options)
        if fmt.delimiter is not None:
            options["separator"] = fmt.delimiter
        if first.hive:  # polars reads ``key=value`` components of the paths it is given
            options["hive_partitioning"] = True
        if is_local(first.path):
            files: list[Any] = [f for s in batch for f in s.files]
        elif use_fsspec:
            files = [stack.enter_context(first.path.fs.open(f, "rb"))
                     for s in batch for f in s.files]
        else:
            storage = polars_storage_options(first.path)
            if storage is not None:
                options["storage_options"] = storage
            provider = polars_credential_provider(first.path)  # the chain's, kept current
            if provider is not None:
                options["credential_provider"] = provider
            files = [first.path.fs.unstrip_protocol(f) for s in batch for f in s.files]
        options.update(kwargs)
        return scan(files, **options)

    frames = [one(b) for b in _batches(sources)]
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")


def _open_dask(sources: list[TableSource], *, use_fsspec: bool, kwargs: dict[str, Any],
               after: Callable[[], Any] | None = None) -> Any:
    """Open the sources as one Dask DataFrame (lazy: each worker reads its own files).

    Remote files are read by URL through fsspec with the path's storage options (the same
    timeouts, retries and credentials as every other read; workers that find no keys in
    them resolve the AWS chain themselves). Columns and filters are pushed down by Dask's
    own optimizer (``df[df.x > 1][["x"]]``) or given as ``columns=`` / ``filters=``.
    ``use_fsspec`` changes nothing: Dask always reads through fsspec.
    """
    import dask.dataframe as dd

    fmt = sources[0].format
    reader = getattr(dd, str(fmt.dask))

    def one(batch: list[TableSource]) -> Any:
        first = batch[0]
        options: dict[str, Any] = {}
        if fmt.delimiter is not None:
            options["sep"] = fmt.delimiter
        files = [f for s in batch for f in s.files]
        if not is_local(first.path):
            files = [first.path.fs.unstrip_protocol(f) for f in files]
            options["storage_options"] = dict(first.path.storage_options)
        options.update(kwargs)
        return reader(files, **options)

    frames = [one(b) for b in _batches(sources)]
    return frames[0] if len(frames) == 1 else dd.concat(frames)


def _open_ray(sources: list[TableSource], *, use_fsspec: bool, kwargs: dict[str, Any],
              after: Callable[[], Any] | None = None) -> Any:
    """Open the sources as one Ray Dataset (lazy: read by Ray's tasks when consumed).

    Ray is handed the explicit files and the pyarrow filesystem every pyarrow read uses
    (:func:`lamin_io.storage.pyarrow_filesystem`: native S3 with the storage settings'
    timeouts and retries, credentials from the AWS chain resolved by each worker). Columns
    and filters are pushed down by Ray's optimizer (``select_columns``, ``filter(expr=)``)
    or given as ``columns=`` (filters: ``.filter(expr=...)`` on the dataset, which Ray's
    optimizer moves into the read).
    """
    import ray.data

    fmt = sources[0].format
    reader = getattr(ray.data, str(fmt.ray))

    def one(batch: list[TableSource]) -> Any:
        first = batch[0]
        options: dict[str, Any] = {
            "filesystem": pyarrow_filesystem(first.path, use_fsspec=use_fsspec),
            "file_extensions": None}  # (the files are named already)
        if fmt.delimiter is not None:
            import pyarrow.csv

            options["parse_options"] = pyarrow.csv.ParseOptions(delimiter=fmt.delimiter)
        options.update(kwargs)
        return reader([f for s in batch for f in s.files], **options)

    datasets = [one(b) for b in _batches(sources)]
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def _raised_in_polars(exc: BaseException) -> bool:
    """Whether polars raised ``exc`` (its innermost frame is in the polars package)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and (
        f"{os.sep}polars{os.sep}" in tb.tb_frame.f_code.co_filename)


class PolarsScan:
    """What ``open(..., engine="polars")`` returns: a context manager yielding a LazyFrame.

    The scan is built on entering, with the storage settings translated into polars' own
    object-store options (or, with ``use_fsspec=True``, over file handles of our fsspec
    filesystem that are closed on exit). Collect inside the ``with`` block: a storage
    failure of polars' requests there leaves it as a typed error
    (:class:`~lamin_io.errors.StorageTimeoutError`, ``StorageServiceError``, ...).

    Examples
    --------
    >>> import polars as pl                                                # doctest: +SKIP
    >>> with ln.open("s3://bucket/sales.parquet", engine="polars") as lf:
    ...     df = lf.filter(pl.col("year") == 2024).select("id", "total").collect()
    """

    def __init__(self, sources: list[TableSource], *, use_fsspec: bool,
                 kwargs: dict[str, Any], after: Callable[[], Any] | None = None) -> None:
        self._sources = sources
        self._use_fsspec = use_fsspec
        self._kwargs = kwargs
        self._after = after
        self._stacks: list[contextlib.ExitStack] = []

    @property
    def n_files(self) -> int:
        """Number of data files scanned."""
        return sum(len(s.files) for s in self._sources)

    def __enter__(self) -> pl.LazyFrame:
        stack = contextlib.ExitStack()
        try:
            lf = _polars_scan(self._sources, use_fsspec=self._use_fsspec,
                              kwargs=self._kwargs, stack=stack)
        except BaseException:
            stack.close()
            raise
        self._stacks.append(stack)
        return lf

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if self._stacks:
            self._stacks.pop().close()
        if exc is not None and _raised_in_polars(exc):
            # polars' own requests, sent by a collect in the block (not the caller's errors)
            first = self._sources[0].path
            typed = storage_error(exc, str(first),
                                  dict(first.storage_options).get("endpoint_url"))
            if typed is not None:
                raise typed from exc
        if exc_type is None and self._after is not None:
            # polars sent its own requests, with no version pinned: the registry's check
            # (the objects' ETags, or files' states, against the record) says whether what
            # was collected in the block came from the registered version
            self._after()

    def __repr__(self) -> str:
        first = self._sources[0]
        where = str(first.path) + (f" and {len(self._sources) - 1} more"
                                   if len(self._sources) > 1 else "")
        return (f"PolarsScan({where}, format={first.format.name!r}, n_files={self.n_files}"
                f"{', use_fsspec=True' if self._use_fsspec else ''})")


def _check_engine(engine: str, sources: list[TableSource], *, use_fsspec: bool) -> None:
    """Raise unless ``engine`` reads every source (one format, hive where it can)."""
    names = sorted({s.format.name for s in sources})
    if len(names) > 1:
        by_format = "; ".join(
            f"{n}: {_shown(str(s.path) for s in sources if s.format.name == n)}" for n in names)
        msg = f"cannot open mixed formats as one table ({by_format}); open each format separately"
        raise UnsupportedFormatError(msg)
    fmt = sources[0].format
    if getattr(fmt, engine) is None:
        msg = (f"engine {engine!r} cannot open {fmt.name} tables; {fmt.name} opens with "
               f"engine={', '.join(map(repr, _engines_of(fmt)))}, and {engine!r} opens: "
               f"{', '.join(_formats_of(engine))}")
        raise UnsupportedFormatError(msg)
    if any(s.hive for s in sources):
        if engine not in fmt.hive:
            msg = (f"engine {engine!r} cannot read hive-partitioned {fmt.name} folders; "
                   f"use engine={', '.join(map(repr, fmt.hive))}")
            raise UnsupportedFormatError(msg)
        if use_fsspec and not ENGINES[engine].fsspec_hive:
            msg = (f"use_fsspec=True cannot read hive partitions with engine {engine!r} (it "
                   f"gets file handles, which carry no 'key=value' paths): drop use_fsspec, "
                   f"or use engine='pyarrow', use_fsspec=True")
            raise InvalidArgumentError(msg)


# -- the format table's entry points -----------------------------------------------------------


def table_keywords(what: str, suffix: str, kwargs: Mapping[str, Any], *,
                   folder: bool | None = None) -> frozenset[str] | None:
    """Return the keywords ``load()``/``open()`` of a table hands on (the format table's hook).

    ``open()``: those of the engine's reader (``pyarrow.dataset.dataset``, the format's polars
    scan). ``load()``: those of the format's pandas reader for a file, of
    ``pyarrow.dataset.dataset`` for a folder; both where ``folder`` is not known yet
    (:func:`load_table` then checks again against the one it uses). ``None`` (any) where the
    reader takes ``**kwargs`` or cannot be told before the files are listed: an unknown
    engine (reported by the opener), polars on a folder without a suffix.
    """
    fmt = _table_format(suffix) if suffix else None
    if what == "open":
        engine = ENGINES.get(kwargs.get("engine", next(iter(ENGINES))))
        if engine is None:
            return None
        if "{reader}" in engine.reader:
            reader = getattr(fmt, engine.name, None)
            if reader is None:
                return None
            return parameters(engine.reader.format(reader=reader))
        return parameters(engine.reader)
    in_folder = parameters(ENGINES["pyarrow"].reader)
    if folder or fmt is None:
        return in_folder
    file = parameters(f"pandas:{fmt.pandas}", skip=("storage_options",))
    if folder is not None:
        return file
    return None if file is None or in_folder is None else file | in_folder


def _entry(fmt: TableFormat) -> Format:
    """Return the format table's entry of a table format (for its keyword checks)."""
    from lamin_io.accessors._formats import formats

    return next(f for f in formats() if f.name == fmt.name)


def open_many(paths: Iterable[PathLike], *, engine: str = "pyarrow", use_fsspec: bool = False,
              storage_options: Mapping[str, Any] | None = None,
              after_scan: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
    """Open table files and folders of one format as one table, lazily.

    Neighbouring paths on one filesystem become one scan over all their files; paths on
    different filesystems (local and S3, two endpoints) or hive-partitioned folders are
    opened one by one and combined (a pyarrow ``UnionDataset``, ``polars.concat``).

    Parameters
    ----------
    paths
        Table files or folders (see :mod:`lamin_io.accessors._tables` for folders), in the
        order their rows come back.
    engine
        ``"pyarrow"`` (default): return a ``pyarrow.dataset.Dataset``; ``"polars"``: return a
        :class:`PolarsScan`, a context manager yielding a ``polars.LazyFrame``; ``"dask"``: a
        ``dask.dataframe.DataFrame``; ``"ray"``: a ``ray.data.Dataset`` (parquet, csv and tsv;
        no hive folders).
    use_fsspec
        Read remote files through our fsspec filesystem instead of the engine's native
        object-store client (for stores the engine cannot reach); ignored for local files.
    storage_options
        fsspec options for paths given as URL strings.
    after_scan
        Called when a polars scan's ``with`` block ends without an error (the registry
        checks there that the stored objects still match their records: polars sends its
        own requests, which no version pins). A pyarrow ``Dataset`` scans whenever it is
        asked, after this function returned: nothing is checked after its scans (call
        :meth:`lamin_io.Artifact.verify` after one to confirm).
    **kwargs
        Passed to ``pyarrow.dataset.dataset`` (``schema``, ``partitioning``, ``format``) or
        the polars scan (``schema``, ``n_rows``, ``infer_schema_length``...).

    Raises
    ------
    InvalidArgumentError
        Unknown engine, no paths, or an option the engine cannot honour.
    UnsupportedFormatError
        Not tables, mixed formats, or a format the engine cannot read.
    MissingDependencyError
        The engine is not installed.

    Examples
    --------
    >>> dataset = open_many(["a.parquet", "b.parquet"])                   # doctest: +SKIP
    >>> with open_many(["a.parquet", "b.parquet"], engine="polars") as lf:
    ...     lf.select("id").collect()
    """
    _import_engine(engine)
    if not isinstance(use_fsspec, bool):
        msg = f"use_fsspec must be True or False, got {use_fsspec!r}"
        raise InvalidArgumentError(msg)
    upaths = [to_upath(p, storage_options) for p in paths]
    if not upaths:
        msg = "no tables to open: give at least one path"
        raise InvalidArgumentError(msg)
    sources = [resolve_table(p) for p in upaths]
    _check_engine(engine, sources, use_fsspec=use_fsspec)
    if kwargs:  # the format table says what the engine's reader takes
        fmt = _entry(sources[0].format)
        fmt.check_keywords("open", fmt.suffixes[0], {"engine": engine, **kwargs})
    first = sources[0].path
    more = f" and {len(sources) - 1} more" if len(sources) > 1 else ""
    spec = ENGINES[engine]
    if spec.decodes:
        with _decoding(first, f"{first}{more} as a {sources[0].format.name} table", kwargs):
            return spec.open(sources, use_fsspec=use_fsspec, kwargs=kwargs, after=after_scan)
    try:  # (only plans: what fails here is the call, or reaching the storage)
        with storage_errors(str(first), dict(first.storage_options).get("endpoint_url")):
            return spec.open(sources, use_fsspec=use_fsspec, kwargs=kwargs, after=after_scan)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, LaminIOError):
            raise
        msg = f"engine {engine!r} refused to open {first}{more}: {exc}"
        raise InvalidArgumentError(msg) from exc


def open_table(path: UPath, *, mode: str = "r", on_close: Callable[[], Any] | None = None,
               engine: str = "pyarrow", use_fsspec: bool = False, **kwargs: Any) -> Any:
    """Open a table file or folder lazily (the format table's opener for tables).

    Parameters
    ----------
    path
        A normalized table file or folder.
    mode
        ``"r"`` only: tables are read-only.
    on_close
        Called when a polars scan's ``with`` block ends (see ``after_scan`` of
        :func:`open_many`); tables are never written back.
    engine
        ``"pyarrow"`` (default) or ``"polars"``; see :func:`open_many`.
    use_fsspec
        See :func:`open_many`.
    **kwargs
        Passed to the engine; see :func:`open_many`.
    """
    if mode != "r":
        msg = f"tables open read-only (mode='r'), got mode={mode!r}: write a new file instead"
        raise WriteNotSupportedError(msg)
    return open_many([path], engine=engine, use_fsspec=use_fsspec, after_scan=on_close,
                     **kwargs)


def load_table(path: UPath, **kwargs: Any) -> pd.DataFrame:
    """Read a whole table file or folder into a pandas DataFrame.

    A file goes through pandas' own reader (``read_parquet``, ``read_csv``,
    ``read_feather``, ``read_json(lines=True)``, ``read_orc``; keywords go to it). A folder
    goes through the pyarrow dataset (keywords go to ``pyarrow.dataset.dataset``), so hive
    partitions come back as columns. A keyword the reader used does not take is an
    :class:`UnsupportedFormatError`, raised before anything is read.
    """
    import pandas as pd

    source = resolve_table(path)
    if kwargs:
        entry = _entry(source.format)
        entry.check_keywords("load", entry.suffixes[0], kwargs, folder=source.folder)
    with _decoding(path, f"{path} as a {source.format.name} table", kwargs):
        if source.folder:
            return open_many([path], engine="pyarrow", **kwargs).to_table().to_pandas()
        fmt = source.format
        options: dict[str, Any] = dict(fmt.pandas_options)
        if fmt.delimiter is not None:
            options["sep"] = fmt.delimiter
        options.update(kwargs)
        reader = getattr(pd, fmt.pandas)
        if is_local(path):
            return reader(str(path.path), **options)
        if fmt.pandas_remote == "file":
            with path.fs.open(path.path, "rb") as f:
                return reader(f, **options)
        return reader(str(path), storage_options=dict(path.storage_options), **options)


# -- the support matrix -------------------------------------------------------------------

_GLOB_OFF = {"glob": False}  # we hand polars explicit file names, never patterns

#: The support matrix: a format's engines are the ``Engine`` names it gives a reader for.
TABLE_FORMATS: dict[str, TableFormat] = {f.name: f for f in (
    TableFormat("parquet", pyarrow="parquet", polars="scan_parquet", pandas="read_parquet",
                dask="read_parquet", ray="read_parquet", hive=("pyarrow", "polars"),
                polars_options=_GLOB_OFF),
    TableFormat("csv", pyarrow="csv", polars="scan_csv", pandas="read_csv", dask="read_csv",
                ray="read_csv", delimiter=",", polars_options=_GLOB_OFF),
    TableFormat("tsv", pyarrow="csv", polars="scan_csv", pandas="read_csv", dask="read_csv",
                ray="read_csv", delimiter="\t", polars_options=_GLOB_OFF),
    TableFormat("ipc", pyarrow="ipc", polars="scan_ipc", pandas="read_feather",
                hive=("pyarrow", "polars"), polars_options=_GLOB_OFF),
    TableFormat("json", pyarrow="json", polars="scan_ndjson", pandas="read_json",
                pandas_options={"lines": True}),
    TableFormat("orc", pyarrow="orc", pandas="read_orc", pandas_remote="file"),
)}

#: Engines by name; the first is the default. polars reads partition values from paths, so it
#: cannot read hive partitions from the file handles ``use_fsspec=True`` gives it.
ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("pyarrow", "pyarrow.dataset", None, open=_open_pyarrow,
           reader="pyarrow.dataset:dataset"),
    Engine("polars", "polars", "polars", open=PolarsScan, reader="polars:{reader}",
           fsspec_hive=False),
    Engine("dask", "dask.dataframe", "dask", open=_open_dask,
           reader="dask.dataframe:{reader}", decodes=False),
    Engine("ray", "ray.data", "ray", open=_open_ray, reader="ray.data:{reader}",
           decodes=False),
)}
