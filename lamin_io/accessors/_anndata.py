"""AnnData stored as ``.h5ad`` (HDF5) or ``.zarr``."""

from __future__ import annotations

import gzip
from typing import TYPE_CHECKING, Any

from lamin_io.storage import is_local, suffix_of

if TYPE_CHECKING:
    import anndata as ad
    from upath import UPath

__all__ = ["load_anndata"]


def load_anndata(path: UPath, **kwargs: Any) -> ad.AnnData:
    """Read a whole AnnData from ``.h5ad`` (optionally gzipped) or ``.zarr`` into memory."""
    import anndata as ad

    suffix = suffix_of(path.name).lower()
    if suffix == ".zarr":
        store = path.path if is_local(path) else str(path)
        return ad.read_zarr(store, **kwargs)
    if suffix.endswith(".gz"):
        with path.open("rb") as raw, gzip.open(raw) as f:
            return ad.read_h5ad(f, **kwargs)
    if is_local(path):
        return ad.read_h5ad(path.path, **kwargs)
    with path.open("rb") as f:
        return ad.read_h5ad(f, **kwargs)
