"""The interface a store's backend implements, and the one that reads through the library.

A backend executes plans (:mod:`lamin_io.accessors.readpath.plan`) for the arrays of one
open store. :class:`Backend` itself reads through the array library (h5py, zarr), which
works for every array; :class:`~lamin_io.accessors.readpath.hdf5.Hdf5Backend` and
:class:`~lamin_io.accessors.readpath.zarr.ZarrBackend` read what they can faster and
leave the rest to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors.readpath.pipeline import Pending
from lamin_io.accessors.readpath.plan import PAGE_BYTES, Layout

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Backend", "Runs", "read_runs"]

#: ``(1-D on-disk array, run starts, run stops)``: the runs of one array a batch reads.
Runs = tuple[Any, np.ndarray, np.ndarray]


class Backend:
    """Reads runs of 1-D arrays and row blocks of dense ones, through the array library.

    Subclasses override what they do better; every method has a working default, so a
    caller needs nothing but this interface.
    """

    #: Whether the store is remote: requests cost a round trip each, so gaps are not
    #: read through for free.
    remote: bool = False
    #: Whether chunks are read whole even where they could be read in part (unfiltered
    #: HDF5 on a remote store: a request costs more than a chunk's bytes), and merged
    #: across chunks holding nothing (see :attr:`Layout.bridge_chunks`).
    whole_chunks: bool = False
    #: Batches started while one is processed.
    ahead: int = 1

    def layout(self, arr: Any, itemsize: int | None = None) -> Layout:
        """Return how ``arr``'s rows are stored, for planning.

        ``itemsize``: the bytes planned per element (default: a row of ``arr``). Chunks
        count (:attr:`Layout.chunk`) where they must be read whole: zarr's always, HDF5's
        when a filter is set or the backend reads :attr:`whole_chunks`.
        """
        if itemsize is None:
            itemsize = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
        chunk = None
        chunks = getattr(arr, "chunks", None)
        if chunks:
            plist = getattr(getattr(arr, "id", None), "get_create_plist", None)
            if self.whole_chunks or plist is None or plist().get_nfilters() > 0:
                chunk = int(chunks[0])
        return Layout(itemsize, chunk=chunk, bridge_chunks=self.whole_chunks,
                      slack_bytes=0 if self.remote else PAGE_BYTES,
                      gathered=chunk is not None and self.gathers(arr))

    def gathers(self, arr: Any) -> bool:
        """Whether the backend decodes ``arr``'s chunks itself (exact ranges, any rows)."""
        return False

    def start_runs(self, items: list[Runs], *, advised: bool = False
                   ) -> Pending[list[np.ndarray]]:
        """Start reading every run of every array; called, the result is each one's runs.

        ``advised``: :meth:`advise` told the store about these runs already. Here the
        runs are read when the result is called, an array at a time.
        """
        self.prefetch(items)
        return Pending(lambda: [read_runs(*item) for item in items])

    def start_block(self, arr: Any, rows: np.ndarray, cols: np.ndarray | None,
                    out: np.ndarray) -> Pending[None]:
        """Start reading ``arr[rows][:, cols]`` (sorted, unique; ``None``: all) into ``out``.

        Only for 2-D arrays :meth:`gathers` accepts.
        """
        msg = f"{type(self).__name__} does not gather {arr.name}: read it by blocks"
        raise ValueError(msg)

    def advise(self, items: list[Runs]) -> Callable[[], None] | None:
        """Have the store read ahead runs a request reads later; return what ends it.

        ``None`` when nothing was advised (a cached or remote file; the default).
        """
        return None

    def release_metadata(self) -> None:
        """Drop what was kept for reading metadata, before a matrix's batches (default: none)."""

    def prefetch(self, items: list[Runs]) -> None:
        """Fetch ranges the array library is about to read (a remote file); default none."""

    def read_whole(self, arr: Any) -> np.ndarray | None:
        """Read a whole 1-D array faster than its library would, or ``None`` (it must)."""
        return None

    def strings(self, ds: Any) -> np.ndarray | None:
        """Read a string array faster than its library would, or ``None`` (it must)."""
        return None

    def read_block(self, arr: Any, start: int, stop: int, cols: Any) -> np.ndarray:
        """Read rows ``[start, stop)`` and columns ``cols`` of a dense array.

        ``cols``: a slice, or sorted unique positions where the library selects them
        (zarr's ``oindex``); ``None`` for arrays other than 2-D.
        """
        if cols is None:
            return np.asarray(arr[start:stop])
        if isinstance(cols, np.ndarray):
            return np.asarray(arr.oindex[start:stop, cols])
        return np.asarray(arr[start:stop, cols])

    def close(self) -> None:
        """Release what the backend opened (descriptors); the store's handles stay."""


def read_runs(arr: Any, run_starts: np.ndarray, run_stops: np.ndarray) -> np.ndarray:
    """Read every run of one 1-D on-disk array through the array library, concatenated."""
    direct = getattr(arr, "read_direct", None)
    if len(run_starts) == 1 and direct is None:
        return np.asarray(arr[int(run_starts[0]):int(run_stops[0])])  # no extra copy
    sizes = run_stops - run_starts
    out = np.empty(int(sizes.sum()), dtype=arr.dtype)
    offset = 0
    for s, e in zip(run_starts.tolist(), run_stops.tolist(), strict=True):
        n = e - s
        if direct is not None:
            direct(out, np.s_[s:e], np.s_[offset:offset + n])
        else:
            out[offset:offset + n] = arr[s:e]
        offset += n
    return out
