"""Generic HDF5 and zarr stores that hold no AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamin_io.errors import AccessorClosedError, WriteNotSupportedError
from lamin_io.storage import suffix_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from upath import UPath

__all__ = ["BackedAccessor", "open_backed"]


class BackedAccessor:
    """An open ``h5py.File`` or ``zarr.Group`` and the file handle under it, closed together.

    ``accessor["group/array"]`` reaches into the store; ``.storage`` is the group itself and
    ``.connection`` the file object (``None`` for local zarr).
    """

    def __init__(self, storage: Any, connection: Any, path: str) -> None:
        self.storage = storage
        self.connection = connection
        self.path = path
        self.closed = False

    def __getitem__(self, key: str) -> Any:
        if self.closed:
            msg = f"the accessor of {self.path} is closed"
            raise AccessorClosedError(msg)
        return self.storage[key]

    def keys(self) -> list[str]:
        """Names of the top-level members."""
        return list(self.storage.keys())

    def close(self) -> None:
        """Close the store and its file handle."""
        if self.closed:
            return
        self.closed = True
        close = getattr(self.storage, "close", None)
        if close is not None:
            close()
        if self.connection is not None:
            self.connection.close()

    def __enter__(self) -> BackedAccessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"keys: {', '.join(self.keys())}"
        return f"BackedAccessor of {self.path} ({type(self.storage).__name__}; {state})"


def open_backed(path: UPath, *, mode: str = "r",
                on_close: Callable[[], Any] | None = None) -> BackedAccessor:
    """Open any HDF5 file or zarr group (the format table's fallback opener)."""
    from lamin_io.accessors._anndata import _open_hdf5, open_zarr_group

    if mode != "r":
        msg = f"generic stores open read-only (mode 'r'), got {mode!r}"
        raise WriteNotSupportedError(msg)
    if suffix_of(path.name).lower() == ".zarr":
        return BackedAccessor(open_zarr_group(path, "r"), None, str(path))
    file, handles, _ = _open_hdf5(path, "r")
    return BackedAccessor(file, _Handles(handles) if handles else None, str(path))


class _Handles:
    """Several file objects closed as one connection."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def close(self) -> None:
        for handle in self.handles:
            handle.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handles[-1], name)
