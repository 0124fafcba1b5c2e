"""Tables: parquet, csv and tsv files."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamin_io.storage import is_local, suffix_of

if TYPE_CHECKING:
    import pandas as pd
    from upath import UPath

__all__ = ["load_table"]


def load_table(path: UPath, **kwargs: Any) -> pd.DataFrame:
    """Read a whole table into a pandas DataFrame."""
    import pandas as pd

    suffix = suffix_of(path.name).lower()
    target: Any = path.path if is_local(path) else str(path)
    options = None if is_local(path) else dict(path.storage_options)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(target, storage_options=options, **kwargs)
    if suffix.startswith(".tsv"):
        kwargs.setdefault("sep", "\t")
    return pd.read_csv(target, storage_options=options, **kwargs)


def _pyarrow_format(suffix: str) -> str:
    from lamin_io.errors import UnsupportedFormatError

    formats = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}
    fmt = formats.get(suffix.lower())
    if fmt is None:
        msg = f"pyarrow cannot open {suffix!r} as a dataset; supported: {', '.join(formats)}"
        raise UnsupportedFormatError(msg)
    return fmt


def open_many(paths: list[UPath], *, engine: str = "pyarrow", **kwargs: Any) -> Any:
    """Open several table files of one format as one ``pyarrow.dataset.Dataset``."""
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from lamin_io.errors import InvalidArgumentError, UnsupportedFormatError

    if engine != "pyarrow":
        msg = f"engine {engine!r} is not supported; engines: 'pyarrow'"
        raise InvalidArgumentError(msg)
    suffixes = {suffix_of(p.name).lower() for p in paths}
    if len(suffixes) != 1:
        msg = f"cannot open mixed formats {sorted(suffixes)} as one dataset"
        raise UnsupportedFormatError(msg)
    fs = PyFileSystem(FSSpecHandler(paths[0].fs))
    return ds.dataset([p.path for p in paths], format=_pyarrow_format(suffixes.pop()),
                      filesystem=fs, **kwargs)
