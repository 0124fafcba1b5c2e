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
