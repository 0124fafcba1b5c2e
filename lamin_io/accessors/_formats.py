"""The format table: the one place that maps suffixes to readers.

Every format registers itself once with :func:`register_format`; ``open()``, ``load()`` and
the command line all ask this table, never a chain of ``if suffix == ...`` branches.
Readers are named by dotted path (``"module:function"``) and imported only when used, so a
missing optional dependency surfaces as :class:`MissingDependencyError` naming its extra.
Third-party formats may plug in through the entry-point group ``lamin_io.formats``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lamin_io.errors import MissingDependencyError, UnsupportedFormatError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "Format",
    "format_for",
    "formats",
    "parameters",
    "register_format",
    "supported_suffixes",
]

#: Arguments the callers of a loader or opener give themselves: never the user's keywords.
_GIVEN = {"load": frozenset(), "open": frozenset({"mode", "on_close", "versions"})}


def _signature(target: str | Callable[..., Any],
               skip: Iterable[str]) -> tuple[frozenset[str], bool] | None:
    """Return ``(named keywords after the first argument, whether it takes **kwargs)``."""
    fn: Callable[..., Any]
    if isinstance(target, str):
        module, _, name = target.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except ImportError:
            return None
    else:
        fn = target
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    if params and params[0].kind in (params[0].POSITIONAL_ONLY,
                                     params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]
    skipped = set(skip)
    names = frozenset(p.name for p in params
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                      and not p.name.startswith("_") and p.name not in skipped)
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def parameters(target: str | Callable[..., Any], *,
               skip: Iterable[str] = ()) -> frozenset[str] | None:
    """Return the keyword arguments a function takes after its first argument.

    Parameters
    ----------
    target
        A function, or ``"module:function"`` (imported here).
    skip
        Names to leave out: those the caller passes itself.

    Returns
    -------
    frozenset[str] | None
        The names, private ones (``_name``) left out; ``None`` when the function takes any
        keyword (``**kwargs``), or when it cannot be imported or inspected (its reader then
        reports the missing dependency itself).
    """
    found = _signature(target, skip)
    return None if found is None or found[1] else found[0]


@dataclass(frozen=True)
class Format:
    """One readable format.

    Parameters
    ----------
    name
        Short name, e.g. ``"h5ad"``.
    suffixes
        Lower-case suffixes it claims, e.g. ``(".h5ad", ".h5ad.gz")``.
    load
        ``"module:function"`` taking ``(path, **kwargs)`` and returning an in-memory object.
    open
        ``"module:function"`` taking ``(path, *, mode, on_close, **kwargs)`` and returning a
        lazy accessor; ``None`` if the format cannot be opened lazily.
    can_open
        ``"module:function"`` taking ``(path)`` and returning whether this format owns the
        stored object, for suffixes several formats share (``.zarr``, ``.h5``). Formats with a
        probe are asked first, in registration order; one without a probe is the fallback.
    extra
        The ``lamin-io[...]`` extra that provides the reader's dependencies, if any.
    modes
        The modes its opener accepts. :meth:`lamin_io.Artifact.open` checks a write mode
        here before it copies a registered folder to write on (the registered version
        stays as it was; closing saves the copy as a new version).
    n_observations
        ``"module:function"`` taking ``(path)`` and returning the number of observations
        (cells, rows) stored, or ``None``; recorded on an artifact when it is saved.
    keywords
        ``"module:function"`` taking ``(what, suffix, kwargs, *, folder)``, where ``what``
        is ``"load"`` or ``"open"`` and ``folder`` whether the path is a folder (``None``:
        not known yet), and returning the keyword arguments that call hands on to a
        library (``anndata.read_h5ad``, a polars scan), or ``None`` for any. Needed only
        where the loader or opener takes ``**kwargs``; its own named arguments count
        anyway (see :meth:`check_keywords`).
    pinned
        Whether its opener takes ``versions=`` (the stored versions the registry recorded:
        an S3 object's ETag, or each file's of a folder) and pins its reads to them, so an
        object overwritten while it is read raises ``StorageModifiedError``.
    """

    name: str
    suffixes: tuple[str, ...]
    load: str | None = None
    open: str | None = None
    can_open: str | None = None
    extra: str | None = None
    modes: tuple[str, ...] = ("r",)
    n_observations: str | None = None
    keywords: str | None = None
    pinned: bool = False

    def resolve(self, what: str) -> Callable[..., Any]:
        """Import and return the function named by attribute ``what``."""
        target = getattr(self, what)
        if target is None:
            supported = ", ".join(f.name for f in formats() if getattr(f, what))
            msg = f"format {self.name!r} does not support {what}(); formats that do: {supported}"
            raise UnsupportedFormatError(msg)
        module, _, func = target.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            hint = f"pip install 'lamin-io[{self.extra}]'" if self.extra else "reinstall lamin-io"
            msg = f"reading {self.name} needs {exc.name or module}: {hint}"
            raise MissingDependencyError(msg) from exc
        fn: Callable[..., Any] = getattr(mod, func)
        return fn

    def takes(self, what: str, suffix: str, kwargs: Mapping[str, Any] | None = None, *,
              folder: bool | None = None) -> frozenset[str] | None:
        """Return the keyword arguments ``load()`` or ``open()`` of this format takes.

        Those its loader or opener names (beside the path, ``mode`` and ``on_close``), and,
        where it takes ``**kwargs``, those the :attr:`keywords` hook says it hands on;
        ``None`` when it takes any.

        Parameters
        ----------
        what
            ``"load"`` or ``"open"``.
        suffix
            The path's suffix (``".zarr"`` and ``".h5ad"`` load through different readers).
        kwargs
            The keywords of the call, for hooks whose answer depends on one (``engine=``).
        folder
            Whether the path is a folder (``None``: not known), for formats that read a
            file and a folder through different readers (tables).
        """
        found = _signature(self.resolve(what), _GIVEN[what])
        if found is None:
            return None
        own, takes_any = found
        if not takes_any:
            return own
        if self.keywords is None:
            return None
        passed = self.resolve("keywords")(what, suffix, dict(kwargs or {}), folder=folder)
        return None if passed is None else own | frozenset(passed)

    def check_keywords(self, what: str, suffix: str, kwargs: Mapping[str, Any], *,
                       folder: bool | None = None) -> None:
        """Refuse keyword arguments that ``load()``/``open()`` of this format does not take.

        Checked before anything is read or downloaded, so a wrong keyword never surfaces
        as a ``TypeError`` from a reader deep inside. ``folder``: whether the path is a
        folder, where known (see :meth:`takes`).

        Raises
        ------
        UnsupportedFormatError
            A keyword is not taken; the message names the format, what it takes, and which
            formats take the keyword.
        """
        if not kwargs:
            return
        taken = self.takes(what, suffix, kwargs, folder=folder)
        if taken is None:
            return
        unknown = sorted(set(kwargs) - taken)
        if not unknown:
            return
        shown = ", ".join(f"{k}=" for k in unknown)
        accepted = ", ".join(f"{k}=" for k in sorted(taken)) or "no keyword arguments"
        if what == "open":
            accepted += " (besides mode=)"
        where = f"{suffix or 'no suffix'}{', a folder' if folder else ''}"
        msg = f"{what}() of {self.name} ({where}) does not take {shown}; it takes {accepted}"
        for key in unknown:
            others = _formats_taking(what, key)
            if others:
                msg += f"; {key}= is taken by {what}() of {', '.join(others)}"
        raise UnsupportedFormatError(msg)


_BY_NAME: dict[str, Format] = {}
_BY_SUFFIX: dict[str, list[Format]] = {}
_entry_points_loaded = False


def register_format(fmt: Format, *, override: bool = False) -> None:
    """Add a format to the table.

    Several formats may share a suffix when all but one carry a ``can_open`` probe; two
    formats without a probe claiming the same suffix is an error (unless ``override``).
    """
    if fmt.name in _BY_NAME and not override:
        msg = f"format {fmt.name!r} is already registered"
        raise ValueError(msg)
    if fmt.can_open is None and not override:
        for s in fmt.suffixes:
            for owner in _BY_SUFFIX.get(s, []):
                if owner.can_open is None and owner.name != fmt.name:
                    msg = f"suffix {s!r} is already registered by format {owner.name!r}"
                    raise ValueError(msg)
    _BY_NAME[fmt.name] = fmt
    for s in fmt.suffixes:
        owners = [f for f in _BY_SUFFIX.get(s, []) if f.name != fmt.name]
        owners.append(fmt)
        # probed formats first, in registration order; the probe-less fallback last
        _BY_SUFFIX[s] = sorted(owners, key=lambda f: f.can_open is None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="lamin_io.formats"):
        fmt = ep.load()
        register_format(fmt() if callable(fmt) and not isinstance(fmt, Format) else fmt)


def formats() -> list[Format]:
    """Return every registered format."""
    _load_entry_points()
    return list(_BY_NAME.values())


def supported_suffixes() -> list[str]:
    """Return every suffix some format claims."""
    _load_entry_points()
    return sorted(_BY_SUFFIX)


def format_for(suffix: str, path: Any = None, *, what: str = "load") -> Format:
    """Return the format for ``suffix``, probing ``path`` where several formats share it.

    Raises :class:`UnsupportedFormatError` listing the supported suffixes.
    """
    _load_entry_points()
    candidates = [f for f in _BY_SUFFIX.get(suffix.lower(), []) if getattr(f, what)]
    if not candidates:
        shown = repr(suffix) if suffix else "no suffix"
        able = sorted(s for s, fs in _BY_SUFFIX.items()
                      if s and any(getattr(f, what) for f in fs))
        msg = f"cannot {what} {shown}; supported suffixes: {', '.join(able)}"
        raise UnsupportedFormatError(msg)
    if len(candidates) == 1:  # nothing to tell apart: no probe (it may read the file)
        return candidates[0]
    for fmt in candidates:
        if fmt.can_open is None or path is None or fmt.resolve("can_open")(path):
            return fmt
    return candidates[-1]


def _formats_taking(what: str, key: str) -> list[str]:
    """Return the formats whose ``what`` takes keyword ``key`` (for an error message)."""
    out = []
    for fmt in formats():
        if getattr(fmt, what) is None:
            continue
        try:
            taken = fmt.takes(what, fmt.suffixes[0])
        except (UnsupportedFormatError, MissingDependencyError):
            continue
        if taken is not None and key in taken:
            out.append(fmt.name)
    return out


_A = "lamin_io.accessors._anndata"
_B = "lamin_io.accessors._backed"
_S = "lamin_io.accessors._spatialdata"
_SO = "lamin_io.accessors._soma"
_T = "lamin_io.accessors._tables"
for _fmt in (
    Format("spatialdata", (".zarr",), open=f"{_S}:open_spatialdata",
           can_open=f"{_S}:is_spatialdata"),
    Format("anndata", (".h5ad", ".h5ad.gz", ".h5ad.tar.gz", ".h5", ".hdf5", ".zarr"),
           load=f"{_A}:load_anndata", open=f"{_A}:open_anndata", can_open=f"{_A}:is_anndata",
           modes=("r", "r+"), n_observations=f"{_A}:count_observations",
           keywords=f"{_A}:anndata_keywords", pinned=True),
    Format("tiledbsoma", (".tiledbsoma",), load=f"{_SO}:load_soma", open=f"{_SO}:open_soma",
           extra="soma", modes=("r", "w"), n_observations=f"{_SO}:count_observations",
           keywords=f"{_SO}:soma_keywords"),
    Format("hdf5", (".h5", ".hdf5"), open=f"{_B}:open_backed"),
    Format("zarr", (".zarr",), open=f"{_B}:open_backed"),
    # tables: one reader pair for every format; _tables.TABLE_FORMATS says which engine
    # reads which (the names match); a folder without a suffix is probed for its part files
    Format("parquet", (".parquet", ".pq"), load=f"{_T}:load_table", open=f"{_T}:open_table",
           keywords=f"{_T}:table_keywords"),
    Format("csv", (".csv", ".csv.gz"), load=f"{_T}:load_table", open=f"{_T}:open_table",
           keywords=f"{_T}:table_keywords"),
    Format("tsv", (".tsv", ".tsv.gz"), load=f"{_T}:load_table", open=f"{_T}:open_table",
           keywords=f"{_T}:table_keywords"),
    Format("ipc", (".ipc", ".arrow", ".feather"), load=f"{_T}:load_table",
           open=f"{_T}:open_table", keywords=f"{_T}:table_keywords"),
    Format("json", (".json", ".ndjson", ".jsonl"), load=f"{_T}:load_table",
           open=f"{_T}:open_table", keywords=f"{_T}:table_keywords"),
    Format("orc", (".orc",), load=f"{_T}:load_table", open=f"{_T}:open_table",
           keywords=f"{_T}:table_keywords"),
    Format("table-folder", ("",), load=f"{_T}:load_table", open=f"{_T}:open_table",
           can_open=f"{_T}:is_table_folder", keywords=f"{_T}:table_keywords"),
):
    register_format(_fmt)
