"""The one entry point that opens any supported path lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamin_io.accessors._formats import format_for
from lamin_io.errors import InvalidArgumentError, PathNotFoundError
from lamin_io.storage import storage_errors, suffix_of, to_upath

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from lamin_io.storage import PathLike

__all__ = ["MODES", "open"]

MODES = ("r", "r+", "w")


def open(  # noqa: A001 (mirrors the builtin on purpose, like zarr.open and h5py.File)
    path: PathLike,
    mode: str = "r",
    *,
    storage_options: Mapping[str, Any] | None = None,
    on_close: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Open a file or folder lazily, locally or on S3, without downloading it.

    Dispatches by suffix through the format table and, where several formats share a
    suffix (``.zarr``, ``.h5``), by what is stored: an AnnData store gives an
    :class:`AnnDataAccessor`, a SpatialData store a :class:`SpatialDataAccessor`, any other
    HDF5 or zarr store a :class:`BackedAccessor`.

    Parameters
    ----------
    path
        Local path or URL (``s3://bucket/key.h5ad``).
    mode
        ``"r"`` (default); ``"r+"`` where the format supports writing back (AnnData
        ``.zarr``).
    storage_options
        fsspec options for remote paths (``endpoint_url``, ``anon``, credentials).
    on_close
        Called once when a writable accessor is closed (the registry uses it to save a new
        artifact version).
    **kwargs
        Passed to the format's opener (e.g. ``engine="polars"`` for tables).

    Examples
    --------
    >>> import lamin_io as ln                                              # doctest: +SKIP
    >>> with ln.open("s3://bucket/pbmc.h5ad") as adata:
    ...     sub = adata[adata.obs["cell_type"] == "B", ["CD19", "MS4A1"]].to_memory()
    """
    if mode not in MODES:
        msg = f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
        raise InvalidArgumentError(msg)
    upath = to_upath(path, storage_options)
    endpoint = dict(upath.storage_options).get("endpoint_url")
    with storage_errors(str(upath), endpoint):
        exists = upath.exists()
    if not exists and mode == "r":
        msg = f"path {upath} does not exist: check the path, or the bucket and prefix"
        raise PathNotFoundError(msg)
    fmt = format_for(suffix_of(upath.name), upath if exists else None, what="open")
    opener = fmt.resolve("open")
    with storage_errors(str(upath), endpoint):
        return opener(upath, mode=mode, on_close=on_close, **kwargs)


