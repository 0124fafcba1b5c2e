"""The format table: the one place that maps suffixes to readers.

Every format registers itself once with :func:`register_format`; ``open()``, ``load()`` and
the command line all ask this table, never a chain of ``if suffix == ...`` branches.
Readers are named by dotted path (``"module:function"``) and imported only when used, so a
missing optional dependency surfaces as :class:`MissingDependencyError` naming its extra.
Third-party formats may plug in through the entry-point group ``lamin_io.formats``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lamin_io.errors import MissingDependencyError, UnsupportedFormatError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Format", "format_for", "formats", "register_format", "supported_suffixes"]


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
    """

    name: str
    suffixes: tuple[str, ...]
    load: str | None = None
    open: str | None = None
    can_open: str | None = None
    extra: str | None = None
    modes: tuple[str, ...] = ("r",)
    n_observations: str | None = None

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
           modes=("r", "r+"), n_observations=f"{_A}:count_observations"),
    Format("tiledbsoma", (".tiledbsoma",), load=f"{_SO}:load_soma", open=f"{_SO}:open_soma",
           extra="soma", modes=("r", "w"), n_observations=f"{_SO}:count_observations"),
    Format("hdf5", (".h5", ".hdf5"), open=f"{_B}:open_backed"),
    Format("zarr", (".zarr",), open=f"{_B}:open_backed"),
    # tables: one reader pair for every format; _tables.TABLE_FORMATS says which engine
    # reads which (the names match); a folder without a suffix is probed for its part files
    Format("parquet", (".parquet", ".pq"), load=f"{_T}:load_table", open=f"{_T}:open_table"),
    Format("csv", (".csv", ".csv.gz"), load=f"{_T}:load_table", open=f"{_T}:open_table"),
    Format("tsv", (".tsv", ".tsv.gz"), load=f"{_T}:load_table", open=f"{_T}:open_table"),
    Format("ipc", (".ipc", ".arrow", ".feather"), load=f"{_T}:load_table",
           open=f"{_T}:open_table"),
    Format("json", (".json", ".ndjson", ".jsonl"), load=f"{_T}:load_table",
           open=f"{_T}:open_table"),
    Format("orc", (".orc",), load=f"{_T}:load_table", open=f"{_T}:open_table"),
    Format("table-folder", ("",), load=f"{_T}:load_table", open=f"{_T}:open_table",
           can_open=f"{_T}:is_table_folder"),
):
    register_format(_fmt)
