"""The one entry point that opens any supported path lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamin_io.accessors._formats import format_for
from lamin_io.errors import InvalidArgumentError
from lamin_io.storage import missing_path, storage_errors, suffix_of, to_upath

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from lamin_io.storage import PathLike

__all__ = ["MODES", "open"]

MODES = ("r", "r+", "w")

#: What to do when a write mode names a path that does not exist: no mode creates a store.
_CREATE_HINTS = {
    "r+": ("mode 'r+' edits an existing store in place and never creates one: write it first "
           "(e.g. AnnData.write_zarr)"),
    "w": ("mode 'w' writes into an existing store and never creates one: create it first "
          "(a TileDB-SOMA experiment with lamin_io.save_tiledbsoma_experiment or "
          "tiledbsoma.io.from_anndata)"),
}


def open(  # noqa: A001 (mirrors the builtin on purpose, like zarr.open and h5py.File)
    path: PathLike,
    mode: str = "r",
    *,
    storage_options: Mapping[str, Any] | None = None,
    on_close: Callable[[], Any] | None = None,
    versions: str | Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    """Open a file or folder lazily, locally or on S3, without downloading it.

    Dispatches by suffix through the format table and, where several formats share a
    suffix (``.zarr``, ``.h5``), by what is stored: an AnnData store gives an
    :class:`AnnDataAccessor`, a SpatialData store a :class:`SpatialDataAccessor`, any other
    HDF5 or zarr store a :class:`BackedAccessor`. A table (``.parquet``, ``.csv``, ``.tsv``,
    ``.ipc``/``.arrow``/``.feather``, ``.json``/``.ndjson`` as JSON Lines, ``.orc``, or a
    folder of one of them, sharded or hive-partitioned) gives a ``pyarrow.dataset.Dataset``,
    or with ``engine="polars"`` a context manager yielding a ``polars.LazyFrame``. A
    ``.tiledbsoma`` store gives the ``tiledbsoma.Experiment``, ``Measurement`` or
    ``Collection`` it holds.

    Parameters
    ----------
    path
        Local path or URL (``s3://bucket/key.h5ad``).
    mode
        ``"r"`` (default); ``"r+"`` where the format supports writing back (AnnData
        ``.zarr``); ``"w"`` for TileDB-SOMA stores. Every mode opens an existing path:
        a missing one raises :class:`~lamin_io.errors.PathNotFoundError`
        (:class:`~lamin_io.errors.BucketNotFoundError` when its S3 bucket is missing),
        after the suffix was checked: a suffix no format opens raises
        :class:`~lamin_io.errors.UnsupportedFormatError` first.
    storage_options
        fsspec options for remote paths (``endpoint_url``, ``anon``, credentials).
    versions
        The stored versions the reads must see (the registry passes what it recorded): an
        S3 object's ETag, or for a folder each file's ETag by relative path. Formats whose
        readers pin their requests (AnnData) refuse other versions with
        :class:`~lamin_io.errors.StorageModifiedError`; without it, an S3 h5ad's reads are
        pinned to the version found when it is opened.
    on_close
        Called once when a writable accessor is closed (the registry uses it to save a new
        artifact version).
    **kwargs
        Passed to the format's opener: for tables ``engine="pyarrow"|"polars"``,
        ``use_fsspec=True`` (read through fsspec instead of the engine's own S3 client) and
        the engine's own options. A keyword the format does not take raises
        :class:`~lamin_io.errors.UnsupportedFormatError` naming what it takes (see
        :meth:`Format.check_keywords`).

    Examples
    --------
    >>> import lamin_io as ln                                              # doctest: +SKIP
    >>> with ln.open("s3://bucket/pbmc.h5ad") as adata:
    ...     sub = adata[adata.obs["cell_type"] == "B", ["CD19", "MS4A1"]].to_memory()
    >>> with ln.open("s3://bucket/sales/", engine="polars") as lf:       # doctest: +SKIP
    ...     lf.filter(pl.col("year") == 2024).select("id", "total").collect()
    """
    if mode not in MODES:
        msg = f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
        raise InvalidArgumentError(msg)
    upath = to_upath(path, storage_options)
    suffix = suffix_of(upath.name)
    # a suffix no format opens is refused before storage is asked anything: "x.txt" is an
    # UnsupportedFormatError whether or not it exists (no probe here: nothing is read)
    format_for(suffix, what="open")
    endpoint = dict(upath.storage_options).get("endpoint_url")
    with storage_errors(str(upath), endpoint):
        exists = upath.exists()
    if not exists:
        # before the probing format table: without a stored object to probe, the first
        # format that claims the suffix would answer (e.g. "SpatialData opens read-only"
        # for a .zarr)
        raise missing_path(upath, _CREATE_HINTS.get(mode))
    fmt = format_for(suffix, upath, what="open")
    fmt.check_keywords("open", suffix, kwargs)
    opener = fmt.resolve("open")
    if versions is not None and fmt.pinned:
        kwargs["versions"] = versions
    with storage_errors(str(upath), endpoint):
        return opener(upath, mode=mode, on_close=on_close, **kwargs)
