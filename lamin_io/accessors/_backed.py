"""Generic HDF5 and zarr stores that hold no AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamin_io.errors import AccessorClosedError, CorruptArtifactError, WriteNotSupportedError
from lamin_io.storage import is_local, suffix_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from upath import UPath

__all__ = ["BackedAccessor", "open_backed"]


class BackedAccessor:
    """An open ``h5py.File`` or ``zarr.Group`` and the file handle under it, closed together.

    ``accessor["group/array"]`` reaches into the store. As in lamindb's ``BackedAccessor``,
    HDF5 is always read through a file object (an fsspec file handle for a local file, a
    ranged-read handle for an object store), so an HDF5 store always has a connection; a
    zarr store is a folder of objects, never one file, so it has none.

    Attributes
    ----------
    storage
        The ``h5py.File`` or ``zarr.Group``.
    connection
        The file object the ``h5py.File`` reads through, local or remote (it has a
        ``closed`` attribute); ``None`` for zarr, local or remote.
    path
        The path or URL that was opened.
    closed
        Whether :meth:`close` was called; any use of the accessor afterwards raises
        :class:`~lamin_io.errors.AccessorClosedError`.

    Examples
    --------
    >>> import lamin_io as ln                                              # doctest: +SKIP
    >>> with ln.open("s3://bucket/raw.h5") as acc:
    ...     first = acc["counts"][:100]
    ...     acc.connection.closed
    False
    """

    def __init__(self, storage: Any, connection: Any, path: str) -> None:
        self.storage = storage
        self.connection = connection
        self.path = path
        self.closed = False

    def _check(self) -> None:
        if self.closed:
            msg = f"the accessor of {self.path} is closed: open it again with lamin_io.open()"
            raise AccessorClosedError(msg)

    def __getitem__(self, key: str) -> Any:
        self._check()
        return self.storage[key]

    def __contains__(self, key: str) -> bool:
        self._check()
        return key in self.storage

    def keys(self) -> list[str]:
        """Names of the top-level members."""
        self._check()
        return list(self.storage.keys())

    def close(self) -> None:
        """Close the store, then the file handle under it (a second call does nothing)."""
        if self.closed:
            return
        self.closed = True
        close = getattr(self.storage, "close", None)
        try:
            if close is not None:
                close()
        finally:
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
    """Open any HDF5 file or zarr group (the format table's fallback opener).

    Parameters
    ----------
    path
        A ``.h5``/``.hdf5`` file or a ``.zarr`` folder, local or remote.
    mode
        Only ``"r"``: generic stores open read-only.
    on_close
        Unused (nothing is ever written back); accepted as every opener does.

    Returns
    -------
    BackedAccessor
        The open store; HDF5 with its file handle as ``.connection``.
    """
    from lamin_io.accessors.readpath.zarr_store import open_zarr_group

    if mode != "r":
        msg = (f"cannot open {path} in mode {mode!r}: generic HDF5 and zarr stores open "
               f"read-only (mode 'r')")
        raise WriteNotSupportedError(msg)
    if suffix_of(path.name).lower() == ".zarr":
        return BackedAccessor(open_zarr_group(path, "r"), None, str(path))
    file, connection = _open_hdf5_with_handle(path)
    return BackedAccessor(file, connection, str(path))


def _open_hdf5_with_handle(path: UPath) -> tuple[Any, Any]:
    """Return ``(h5py.File, the file object it reads through)``."""
    from lamin_io.accessors.readpath.source import open_hdf5

    if not is_local(path):
        file, handles, _ = open_hdf5(path, "r")
        return file, handles[0] if len(handles) == 1 else _Handles(handles)
    import h5py

    # through fsspec's local file object rather than HDF5's own driver, so that a local
    # file has a handle too (lamindb gives the same); h5py's file-object driver reads it
    handle = path.fs.open(path.path, "rb")
    try:
        return h5py.File(handle, "r"), handle
    except OSError as exc:
        handle.close()
        msg = f"{path} is not a readable HDF5 file (truncated or damaged?): {exc}"
        raise CorruptArtifactError(msg) from exc


class _Handles:
    """Several file objects closed as one connection (the outermost first)."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    @property
    def closed(self) -> bool:
        """Whether every handle is closed."""
        return all(h.closed for h in self.handles)

    def close(self) -> None:
        """Close every handle."""
        for handle in self.handles:
            handle.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handles[-1], name)
