"""What the zarr chunk tests share: AnnData written in a zarr format, and chunk files read."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import zarr

from lamin_io.accessors.readpath import zarr as zarr_backend

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import pytest


def write_in_format(adata: ad.AnnData, path: Path, fmt: int) -> zarr.Group:
    """Write ``adata`` as a zarr store of format ``fmt``; return its group, writable.

    anndata's ``zarr_write_format`` setting is back to what it was afterwards.
    """
    with warnings.catch_warnings(), ad.settings.override(zarr_write_format=fmt):
        warnings.simplefilter("ignore")
        adata.write_zarr(path)
    return zarr.open_group(path, mode="r+", use_consolidated=False)


def write_each(truth: ad.AnnData, folder: Path, codecs: dict[str, Any],
               write: Callable[[ad.AnnData, Path, str], None]) -> dict[str, Path]:
    """One store per codec under ``folder``, by name."""
    out = {}
    for codec in codecs:
        out[codec] = folder / f"{codec}.zarr"
        write(truth, out[codec], codec)
    return out


def record_chunk_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Return the list the paths of chunk files lamin-io reads itself are appended to."""
    read: list[str] = []
    real = zarr_backend._read_file  # noqa: SLF001

    def counting(path: str) -> Any:
        read.append(path)
        return real(path)

    monkeypatch.setattr(zarr_backend, "_read_file", counting)
    return read


def rewrite_array(group: zarr.Group, name: str, values: Any, *, fmt: int, compressors: Any,
                  serializer: Any, shards: Any, **kwargs: Any) -> zarr.Array:
    """Replace array ``name`` of ``group`` with ``values`` stored with these codecs.

    ``kwargs`` go to ``create_array`` (chunks, fill value, a format 2 memory order).
    """
    attrs = dict(group[name].attrs)
    del group[name]
    if fmt == 2:
        kwargs["filters"] = None
    if serializer is not None:
        kwargs["serializer"] = serializer
    if shards is not None:
        kwargs["shards"] = shards
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype,
                             compressors=compressors, **kwargs)
    arr[:] = values
    arr.attrs.update(attrs)
    return arr
