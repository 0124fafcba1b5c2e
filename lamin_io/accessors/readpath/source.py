"""One AnnData store to read blocks from: the interface the accessors and loaders share.

A :class:`Source` names an ``.h5ad`` (plain, ``.gz``, ``.tar.gz``) or ``.zarr`` store,
local or remote, and answers "these rows (and columns) of this element" with a CSR or
dense block (:meth:`Source.read`), and an obs column's codes for some rows
(:meth:`Source.codes`). It opens its file, client and backend on first use in the process
that reads, drops them when pickled, and opens them anew in a forked child (a handle
opened before a fork is never used after it), so datasets of torch's ``DataLoader``
workers can hold one. What it saw at its first open (a local file's size, mtime and
inode; a remote object's ETag) pins every later open: a store that changed in between
raises :class:`~lamin_io.errors.StorageModifiedError`.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors._attrs import is_group
from lamin_io.accessors._index import positions
from lamin_io.accessors.readpath.dense import read_dense
from lamin_io.accessors.readpath.plan import DEFAULT_BUDGET, Budget, unique_sorted
from lamin_io.accessors.readpath.sparse import SparseParts, read_sparse
from lamin_io.errors import (
    AccessorClosedError,
    CorruptArtifactError,
    LaminIOError,
    NameNotFoundError,
    StorageModifiedError,
    UnsupportedFormatError,
    UnsupportedLayoutError,
)
from lamin_io.storage import is_local, storage_errors, suffix_of

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd
    from upath import UPath

    from lamin_io.accessors._index import Selection
    from lamin_io.accessors.readpath.backend import Backend

__all__ = ["Source", "factorize", "file_state", "h5ad_member", "open_hdf5", "reader_error"]


# -- opening an HDF5 file ------------------------------------------------------------------

def h5ad_member(fileobj: Any, path: UPath) -> tuple[Any, Any]:
    """Return ``(tar archive, its first .h5ad file)`` of a ``.h5ad.tar.gz`` (lamindb's suffix).

    The archive is read as a stream: what lies before the member is decompressed once,
    and going back in the member decompresses again from the start (as for ``.h5ad.gz``).
    """
    import tarfile

    damaged = (tarfile.TarError, OSError, EOFError)
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:gz")  # closes what it opened on failure
    except damaged as exc:
        raise _damaged_archive(path, exc) from exc
    try:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name.endswith(".h5ad") and not name.startswith("._"):
                return tar, tar.extractfile(member)
    except BaseException as exc:
        tar.close()  # and the GzipFile it reads through (not ``fileobj``: the caller's)
        if isinstance(exc, damaged):
            raise _damaged_archive(path, exc) from exc
        raise
    tar.close()
    msg = f"{path} holds no .h5ad file: a .h5ad.tar.gz archive must hold one"
    raise UnsupportedFormatError(msg)


def _damaged_archive(path: UPath, exc: BaseException) -> CorruptArtifactError:
    msg = f"{path} is not a readable .tar.gz archive (truncated or damaged?): {exc}"
    return CorruptArtifactError(msg)


def open_hdf5(path: UPath, mode: str, *, prime: bool = True,
              etag: str | None = None) -> tuple[Any, list[Any], Any]:
    """Return ``(h5py.File, handles to close, local path or RangeFile or None)``.

    The third is where HDF5 bytes can be read directly: a plain local file's path, a
    remote file's :class:`RangeFile`; ``None`` for a compressed file (``.gz``,
    ``.tar.gz``). ``prime``: a remote file reads its first blocks and its tail up front
    (:meth:`RangeFile.prime`); a format probe, which reads the root group alone, skips it.
    ``etag``: the S3 version every read of a remote file must see (see :class:`RangeFile`).
    """
    import h5py

    from lamin_io.storage._rangefile import RangeFile

    suffix = suffix_of(path.name).lower()
    tarred = suffix.endswith(".tar.gz")
    gz = suffix.endswith(".gz")
    # No raw-chunk cache: HDF5 then reads unfiltered chunks in part (exactly the rows asked
    # for) instead of pulling whole chunks; filtered chunks are still decoded once per
    # request, because the read path merges ranges that share such a chunk.
    options = {"rdcc_nbytes": 0}
    if is_local(path) and not gz:
        try:
            return h5py.File(path.path, mode, **options), [], path.path
        except OSError as exc:
            msg = f"{path} is not a readable HDF5 file (truncated or damaged?): {exc}"
            raise CorruptArtifactError(msg) from exc
    raw: Any = path.fs.open(path.path, "rb") if is_local(path) else RangeFile(path, etag=etag)
    handles = [raw]
    fileobj = raw
    if tarred:
        try:
            tar, fileobj = h5ad_member(raw, path)
        except LaminIOError:
            raw.close()
            raise
        handles[:0] = [fileobj, tar]
    elif gz:
        fileobj = gzip.GzipFile(fileobj=raw, mode="rb")
        handles.insert(0, fileobj)
    try:
        if prime and isinstance(raw, RangeFile) and not gz:
            raw.prime()  # the metadata HDF5 reads first, in one round of requests
        return h5py.File(fileobj, mode, **options), handles, None if gz else raw
    except OSError as exc:
        for h in handles:
            h.close()
        msg = f"{path} is not a readable HDF5 file (truncated or damaged?): {exc}"
        raise CorruptArtifactError(msg) from exc


# -- what a failure means -------------------------------------------------------------------

_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep


def _our_bug(exc: BaseException) -> bool:
    """Whether ``exc`` (not an I/O error) was raised by lamin-io's own code.

    Its innermost frame is in this package: a bug of ours, which must surface as itself,
    never as "the store is damaged" or "a layout lamin-io cannot read". I/O errors are the
    store's, wherever they surface.
    """
    if isinstance(exc, OSError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE)


def file_state(path: str | None) -> tuple[int, int, int] | None:
    """Return a local file's ``(size, mtime_ns, inode)``; ``None`` if it is gone."""
    try:
        st = os.stat(str(path))
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def reader_error(exc: Exception, what: str, layout_hint: str) -> LaminIOError | None:
    """Return the typed error for a reading library's failure on ``what``.

    ``None`` for a bug of ours (its innermost frame is in lamin-io), which the caller
    re-raises as itself. Errors of I/O and decoding say the store is damaged
    (:class:`CorruptArtifactError`); any other (an encoding anndata does not know) that
    the layout cannot be read (:class:`UnsupportedLayoutError`, with ``layout_hint`` on
    what to do).
    """
    if _our_bug(exc):
        return None
    if isinstance(exc, OSError | RuntimeError | ValueError | KeyError | EOFError):
        msg = (f"{what} cannot be read ({type(exc).__name__}: {exc}); the store is damaged "
               f"or incomplete: restore it from its source")
        return CorruptArtifactError(msg)
    msg = (f"{what} is stored in a layout lamin-io cannot read ({type(exc).__name__}: "
           f"{exc}); {layout_hint}")
    return UnsupportedLayoutError(msg)


def factorize(values: Any) -> tuple[np.ndarray, pd.Index]:
    """Return ``(codes, categories)`` of a column: a categorical's own, else sorted values.

    Codes are ``int64``; ``-1`` marks a missing value.
    """
    import pandas as pd

    if isinstance(values, pd.Categorical):
        return values.codes.astype(np.int64), pd.Index(values.categories)
    codes, categories = pd.factorize(values, sort=True)
    return codes.astype(np.int64), pd.Index(categories)


# -- the source -------------------------------------------------------------------------------

class _Opened:
    """What one process opened of a source: the group, handles to close, the backend."""

    def __init__(self, group: Any, handles: list[Any], backend: Backend,
                 local_path: str | None) -> None:
        self.group, self.handles, self.backend = group, handles, backend
        self.local_path = local_path
        self.pid = os.getpid()

    def close(self) -> None:
        import logging

        self.backend.close()
        for handle in self.handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 (closing must go on)
                logging.getLogger(__name__).debug("closing %r failed", handle, exc_info=True)


class Source:
    """An ``.h5ad`` or ``.zarr`` store, opened lazily in the process that reads it.

    Parameters
    ----------
    path
        The store (local or remote, with its storage options).
    mode
        ``"r"``, or ``"r+"`` for a zarr store (the accessor adds columns).
    versions
        The stored versions every read must see, as a registry recorded them: an h5ad's
        ETag, or each file's ETag of a zarr store by relative path. Without them a remote
        h5ad is pinned to the version found at its first open.
    budget
        How much a read may hold and read through (:class:`Budget`); the default was
        measured on the subset benchmark.

    Examples
    --------
    >>> src = Source(to_upath("pbmc.h5ad"))                                 # doctest: +SKIP
    >>> block = src.read("X", np.array([3, 10, 11]))  # a CSR matrix of 3 rows
    >>> codes, categories = src.codes("obs/cell_type", np.array([3, 10, 11]))
    """

    #: The budget of reads that name none (the class's: sources made without one).
    budget: Budget = DEFAULT_BUDGET
    #: Whether a remote HDF5 file's unfiltered chunks are read whole (``None``: the
    #: backend's choice; see :meth:`read_exact_ranges`).
    whole_chunks: bool | None = None

    def __init__(self, path: UPath, *, mode: str = "r",
                 versions: str | Mapping[str, str] | None = None,
                 budget: Budget | None = None) -> None:
        self.upath = path
        if budget is not None:
            self.budget = budget
        self.path = str(path)
        self.mode = mode
        self.versions = versions
        self.remote = not is_local(path)
        self.endpoint = dict(path.storage_options).get("endpoint_url") if self.remote else None
        self.is_zarr = suffix_of(path.name).lower() == ".zarr"
        self.closed = False
        self._state: tuple[int, int, int] | None = None  # a local h5ad's, at first open
        self._opened: _Opened | None = None
        self._cache: dict[str, Any] = {}

    # -- handles of this process --------------------------------------------------------

    def _handles(self) -> _Opened:
        self.check()
        opened = self._opened
        if opened is not None and opened.pid == os.getpid():
            return opened
        if opened is not None:  # opened before a fork: never used here, never closed here
            self._opened = None
            self._cache.clear()
        self._opened = self._open()
        return self._opened

    def _open(self) -> _Opened:
        from lamin_io.accessors.readpath.backend import Backend
        from lamin_io.accessors.readpath.hdf5 import Hdf5Backend

        if self.is_zarr:
            from lamin_io.accessors.readpath.zarr import ZarrBackend
            from lamin_io.accessors.readpath.zarr_store import open_zarr_group

            group = open_zarr_group(self.upath, "r+" if self.mode == "r+" else "r",
                                    versions=self.versions if isinstance(self.versions, Mapping)
                                    else None)
            return _Opened(group, [], ZarrBackend(remote=self.remote), None)
        file, handles, where = open_hdf5(self.upath, "r", etag=self.versions
                                         if isinstance(self.versions, str) else None)
        if isinstance(where, str):
            opened = _Opened(file, [file], Hdf5Backend(file, local_path=where), where)
            state = file_state(where)
            if self._state is None:
                self._state = state
            elif state != self._state:
                opened.close()
                raise self._changed()
            return opened
        if where is not None and self.versions is None:
            self.versions = where.etag  # a later open (another process) reads this version
        backend = Backend() if where is None else Hdf5Backend(file, rangefile=where)
        if self.whole_chunks is not None and isinstance(backend, Hdf5Backend):
            backend.whole_chunks = self.whole_chunks
        return _Opened(file, [file, *handles], backend, None)

    def read_exact_ranges(self) -> None:
        """Read the rows' own byte ranges of a remote HDF5 file, never whole chunks.

        For reads of neighbouring rows in blocks (a block loader's): a request a block
        then costs less than the rest of the chunks it lies in. Kept in this process and in
        those the source is sent to.
        """
        from lamin_io.accessors.readpath.hdf5 import Hdf5Backend

        self.whole_chunks = False
        opened = self._opened
        if opened is not None and opened.pid == os.getpid() and isinstance(
                opened.backend, Hdf5Backend):
            opened.backend.whole_chunks = False

    @property
    def group(self) -> Any:
        """The open root group (``h5py.File`` or ``zarr.Group``) of this process."""
        return self._handles().group

    @property
    def backend(self) -> Backend:
        """The backend that executes this process's read plans."""
        return self._handles().backend

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_opened"] = None  # handles belong to the process that opened them
        state["_cache"] = {}
        return state

    # -- errors -------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`AccessorClosedError` once the source is closed."""
        if self.closed:
            msg = f"the accessor of {self.path} is closed"
            raise AccessorClosedError(msg)

    @contextlib.contextmanager
    def reading(self, key: str) -> Iterator[None]:
        """Give a failure to read element ``key`` a typed error naming the store and key.

        Unreachable storage becomes :class:`StorageUnreachableError`; bytes or metadata the
        libraries cannot decode (damaged chunks, invalid JSON, truncated datasets) become
        :class:`CorruptArtifactError`; any other failure (an encoding anndata does not know,
        a layout no reader expects) :class:`UnsupportedLayoutError`. Our own errors, typed
        or not (a bug), pass through unchanged. A local file that changed meanwhile
        raises :class:`StorageModifiedError`.
        """
        self.check()
        try:
            with storage_errors(self.path, self.endpoint):
                yield
        except LaminIOError as exc:
            if isinstance(exc, CorruptArtifactError) and str(self.path) not in str(exc):
                exc.add_note(f"while reading element {key!r} of {self.path}")
            raise
        except Exception as exc:
            self._check_unchanged()  # a file changed under the read explains its failure
            typed = reader_error(exc, f"{self.path}: element {key!r}",
                                 "read the file with anndata (anndata.read_h5ad or "
                                 "read_zarr) and write it again")
            if typed is None:
                raise
            raise typed from exc
        self._check_unchanged()

    def _check_unchanged(self) -> None:
        opened = self._opened
        if opened is None or opened.local_path is None:
            return
        if file_state(opened.local_path) != self._state:
            raise self._changed()

    def _changed(self) -> StorageModifiedError:
        msg = (f"{self.path} changed while it was open (its size, modification time or inode "
               f"moved): what was read may mix two versions and is dropped; open it again to "
               f"read the new content")
        return StorageModifiedError(msg)

    # -- elements -----------------------------------------------------------------------

    def has(self, key: str) -> bool:
        """Whether the store holds element ``key``."""
        with self.reading(key):
            return key in self.group

    def get(self, key: str) -> Any:
        """Return the stored element ``key`` (an array or a group), unread."""
        with self.reading(key):
            if key not in self.group:
                msg = f"{self.path} has no element {key!r}"
                raise NameNotFoundError(msg)
            return self.group[key]

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """Return what ``make()`` returns, made once per process (``key``: ``kind:element``)."""
        self._handles()  # a fork empties the cache before it is looked at
        if key not in self._cache:
            with self.reading(key.split(":", 1)[-1]):
                self._cache[key] = make()
        return self._cache[key]

    def invalidate(self) -> None:
        """Forget what was read (after the store was written to)."""
        self._cache.clear()

    def matrix(self, key: str, expected: tuple[int | None, int | None] | None = None) -> Any:
        """Return the on-disk matrix at ``key``: a dense array or :class:`SparseParts`.

        ``expected``: its ``(rows, columns)`` as its axes say, for a sparse group stored
        without its shape (see :func:`lamin_io.accessors._elements.matrix`).
        """
        from lamin_io.accessors import _elements as el

        return self.cached(f"matrix:{key}", lambda: el.matrix(
            self.get(key), self.backend.read_whole, expected=expected))

    def read(self, key: str, rows: Selection | None, cols: Selection | None = None, *,
             expected: tuple[int | None, int | None] | None = None,
             budget: Budget | None = None) -> Any:
        """Read ``key[rows, cols]``: a scipy CSR/CSC matrix or a numpy array.

        ``rows``/``cols``: positions (any order, repeats kept), a slice or a boolean mask;
        ``None`` for all (a bad one raises :class:`~lamin_io.errors.IndexOutOfRangeError`
        or :class:`~lamin_io.errors.InvalidArgumentError`). Rows are sorted and
        de-duplicated, planned into coalesced runs and read batch by batch
        (:mod:`lamin_io.accessors.readpath.plan`), the requested order restored at the end.
        ``expected``: see :meth:`matrix`; ``budget``: the source's unless given.
        """
        budget = budget or self.budget
        matrix = self.matrix(key, expected)
        backend = self.backend
        backend.release_metadata()  # what served the metadata does not stay beside batches
        shape = matrix.shape
        rows = positions(rows, int(shape[0]), "obs") if rows is not None else None
        if cols is not None and len(shape) > 1:
            cols = positions(cols, int(shape[1]), "var")
        with self.reading(key):
            if isinstance(matrix, SparseParts):
                csr = matrix.format == "csr"
                major, minor = (rows, cols) if csr else (cols, rows)
                n_major = shape[0 if csr else 1]
                at, inverse = unique_sorted(major if major is not None
                                            else slice(0, n_major), n_major)
                return read_sparse(backend, matrix, at, inverse, minor, budget)
            at, inverse = unique_sorted(rows if rows is not None else slice(0, shape[0]),
                                        int(shape[0]))
            return read_dense(backend, matrix, at, inverse, cols, budget)

    def codes(self, key: str, rows: Selection | None = None) -> tuple[np.ndarray, pd.Index]:
        """Return the codes of a 1-D column for ``rows`` and the categories they index.

        A categorical column (``codes`` and ``categories``, anndata >= 0.8) reads only the
        codes of the rows asked for (``-1``: missing); any other column is read whole once
        per process and factorized (categories sorted), for labels of a training loader.
        """
        import pandas as pd

        column = self.cached(f"column:{key}", lambda: self._column(key))
        if isinstance(column, pd.Index):  # categorical: the rows' codes alone are read
            codes = self.read(f"{key}/codes", rows)
            return np.asarray(codes).astype(np.int64, copy=False), column
        all_codes, categories = column
        if rows is None:
            return all_codes, categories
        axis = key.rpartition("/")[0][-3:]
        return all_codes[positions(rows, len(all_codes), axis if axis == "var" else "obs")], \
            categories

    def _column(self, key: str) -> pd.Index | tuple[np.ndarray, pd.Index]:
        """Return what :meth:`codes` keeps of a column (once per process).

        A categorical's categories, or the codes and categories of the whole column.
        """
        import pandas as pd

        from lamin_io.accessors import _elements as el

        elem = self.get(key)
        if is_group(elem) and "codes" in elem and "categories" in elem:
            return pd.Index(el.read_element(elem["categories"], self.backend.strings))
        values = el.read_element(elem, self.backend.strings)  # nullable ones: pandas'
        if not isinstance(values, np.ndarray | pd.api.extensions.ExtensionArray) or (
                values.ndim != 1):
            msg = (f"{self.path}: element {key!r} is not a 1-D column "
                   f"({type(values).__name__}); give a column of obs")
            raise UnsupportedLayoutError(msg)
        return factorize(values)

    def close(self) -> None:
        """Close what this process opened; later reads raise :class:`AccessorClosedError`."""
        if self.closed:
            return
        self.closed = True
        opened, self._opened = self._opened, None
        self._cache.clear()
        if opened is not None and opened.pid == os.getpid():
            opened.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
