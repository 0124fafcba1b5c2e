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

__all__ = ["Format", "format_for", "formats", "register_format"]


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
        ``"module:function"`` returning a lazy accessor, or ``None`` if not supported yet.
    extra
        The ``lamin-io[...]`` extra that provides the reader's dependencies, if any.
    """

    name: str
    suffixes: tuple[str, ...]
    load: str | None = None
    open: str | None = None
    extra: str | None = None

    def resolve(self, what: str) -> Callable[..., Any]:
        """Import and return the reader named by attribute ``what`` (``"load"``/``"open"``)."""
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
_BY_SUFFIX: dict[str, Format] = {}
_entry_points_loaded = False


def register_format(fmt: Format, *, override: bool = False) -> None:
    """Add a format to the table; claiming a suffix another format owns is an error."""
    if not override:
        for s in fmt.suffixes:
            owner = _BY_SUFFIX.get(s)
            if owner is not None and owner.name != fmt.name:
                msg = f"suffix {s!r} is already registered by format {owner.name!r}"
                raise ValueError(msg)
    _BY_NAME[fmt.name] = fmt
    for s in fmt.suffixes:
        _BY_SUFFIX[s] = fmt


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


def format_for(suffix: str) -> Format:
    """Return the format claiming ``suffix``, or raise :class:`UnsupportedFormatError`."""
    _load_entry_points()
    fmt = _BY_SUFFIX.get(suffix.lower())
    if fmt is None:
        supported = ", ".join(sorted(_BY_SUFFIX))
        shown = repr(suffix) if suffix else "no suffix"
        msg = f"no reader for {shown}; supported suffixes: {supported}"
        raise UnsupportedFormatError(msg)
    return fmt


_A = "lamin_io.accessors._anndata"
_T = "lamin_io.accessors._tables"
for _fmt in (
    Format("h5ad", (".h5ad", ".h5ad.gz", ".h5", ".hdf5"), load=f"{_A}:load_anndata"),
    Format("zarr", (".zarr",), load=f"{_A}:load_anndata"),
    Format("parquet", (".parquet", ".pq"), load=f"{_T}:load_table"),
    Format("csv", (".csv", ".csv.gz", ".tsv", ".tsv.gz"), load=f"{_T}:load_table"),
):
    register_format(_fmt)
