"""AnnData stored as ``.h5ad`` (HDF5) or ``.zarr``: lazy access and whole loads.

:class:`AnnDataAccessor` mirrors AnnData's surface without reading anything until an
element is asked for. Subsets (``a[mask, genes]``) are cheap selections; their elements are
read through :func:`lamin_io.accessors._rows.read_matrix`, which reads only the rows that
hold the selection.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors import _elements as el
from lamin_io.accessors import _legacy
from lamin_io.accessors._attrs import attr, encoding, is_group
from lamin_io.accessors._formats import parameters
from lamin_io.accessors._hdf5_btree import IndexReader
from lamin_io.accessors._index import Selection, length, resolve, split_key
from lamin_io.accessors._rows import SLACK_BYTES, Pending, ReadHooks, read_matrix
from lamin_io.accessors._zarr import open_zarr_group, zarr_root_attrs
from lamin_io.errors import (
    AccessorClosedError,
    CorruptArtifactError,
    InvalidArgumentError,
    LaminIOError,
    NameNotFoundError,
    StorageModifiedError,
    UnsupportedFormatError,
    UnsupportedLayoutError,
    WriteNotSupportedError,
)
from lamin_io.storage import is_local, missing_path, storage_errors, suffix_of

if TYPE_CHECKING:
    from collections.abc import Callable

    import anndata as ad
    import pandas as pd
    from upath import UPath

__all__ = ["AnnDataAccessor", "anndata_keywords", "count_observations", "is_anndata",
           "load_anndata", "open_anndata"]

logger = logging.getLogger(__name__)

_ELEMENTS = ("X", "obs", "var", "layers", "obsm", "varm", "obsp", "varp", "uns", "raw")


# -- opening -------------------------------------------------------------------------------

def _h5ad_member(fileobj: Any, path: UPath) -> tuple[Any, Any]:
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


def _open_hdf5(path: UPath, mode: str, *, prime: bool = True,
               etag: str | None = None) -> tuple[Any, list[Any], Any]:
    """Return ``(h5py.File, handles to close, RangeFile or None)``.

    ``prime``: a remote file reads its first blocks and its tail up front
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
            tar, fileobj = _h5ad_member(raw, path)
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


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


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


def _file_state(path: str | None) -> tuple[int, int, int] | None:
    """Return a local file's ``(size, mtime_ns, inode)``; ``None`` if it is gone."""
    try:
        st = os.stat(str(path))
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _reader_error(exc: Exception, what: str, layout_hint: str) -> LaminIOError | None:
    """Return the typed error for a reading library's failure on ``what``.

    ``None`` for a bug of ours (:func:`_our_bug`), which the caller re-raises as itself.
    Errors of I/O and decoding say the store is damaged (:class:`CorruptArtifactError`);
    any other (an encoding anndata does not know) that the layout cannot be read
    (:class:`UnsupportedLayoutError`, with ``layout_hint`` on what to do).
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


def _is_anndata_group(group: Any, path: UPath) -> bool:
    try:
        if encoding(group) == "anndata":
            return True
        keys = set(group.keys())
    except (OSError, RuntimeError, KeyError, ValueError) as exc:  # attributes HDF5 cannot read
        msg = (f"{path}: the file's root metadata cannot be read ({exc}); the file is "
               f"damaged: restore it from its source")
        raise CorruptArtifactError(msg) from exc
    return "obs" in keys and "var" in keys


def is_anndata(path: UPath) -> bool:
    """Probe whether ``path`` holds an AnnData (encoding attribute, or obs and var)."""
    try:
        if suffix_of(path.name).lower() == ".zarr":
            attrs = zarr_root_attrs(path)
            if attrs is not None and attrs.get("encoding-type") == "anndata":
                return True
            return _is_anndata_group(open_zarr_group(path, "r"), path)
        file, handles, _ = _open_hdf5(path, "r", prime=False)
    except CorruptArtifactError:
        return suffix_of(path.name).lower().startswith(".h5ad")  # let the opener report it
    try:
        return _is_anndata_group(file, path)
    finally:
        file.close()
        for h in handles:
            h.close()


def open_anndata(path: UPath, *, mode: str = "r", on_close: Callable[[], Any] | None = None,
                 versions: str | Mapping[str, str] | None = None) -> AnnDataAccessor:
    """Open an AnnData ``.h5ad``/``.zarr`` lazily (the format table's opener).

    ``versions``: the stored versions every read must see, as the registry recorded them
    (an h5ad's ETag; each file's ETag of a zarr store, by relative path): a read of anything
    else raises :class:`StorageModifiedError`. Without them a remote h5ad is pinned to the
    version found at open.
    """
    suffix = suffix_of(path.name).lower()
    is_zarr = suffix == ".zarr"
    if mode != "r" and not (is_zarr and mode == "r+"):
        if is_zarr:
            msg = (f"cannot open AnnData store {path} in mode {mode!r}: use mode='r' to "
                   f"read, or mode='r+' to add obs/var columns")
        else:
            msg = (f"cannot open {path} in mode {mode!r}: {suffix or 'HDF5'} files open "
                   f"read-only (mode='r'); to add columns, store the AnnData as .zarr and "
                   f"open that with mode='r+'")
        raise WriteNotSupportedError(msg)
    remote = not is_local(path)
    endpoint = dict(path.storage_options).get("endpoint_url") if remote else None
    if is_zarr:
        group = open_zarr_group(path, "r+" if mode == "r+" else "r",
                                versions=versions if isinstance(versions, Mapping) else None)
        store = _Store(group, handles=[], path=str(path), mode=mode, on_close=on_close,
                       remote=remote, endpoint=endpoint)
    else:
        file, handles, source = _open_hdf5(path, "r", etag=versions
                                           if isinstance(versions, str) else None)
        store = _Store(file, handles=[file, *handles], path=str(path), mode="r",
                       source=source, remote=remote, endpoint=endpoint)
    try:
        holds_anndata = _is_anndata_group(store.group, path)
    except CorruptArtifactError:
        store.close()
        raise
    if not holds_anndata:
        store.close()
        msg = f"{path} holds no AnnData (no obs/var); open it with lamin_io.open() as generic"
        raise UnsupportedFormatError(msg)
    return AnnDataAccessor(store)


def load_anndata(path: UPath, **kwargs: Any) -> ad.AnnData:
    """Read a whole AnnData from ``.h5ad`` (plain, ``.gz``, ``.tar.gz``) or ``.zarr``.

    Bytes or metadata anndata cannot decode (a truncated file, a damaged chunk) raise
    :class:`CorruptArtifactError` naming the file, as :func:`open_anndata` does.
    """
    try:
        with storage_errors(str(path), dict(path.storage_options).get("endpoint_url")):
            return _read_anndata(path, **kwargs)
    except LaminIOError:
        raise
    except Exception as exc:
        if isinstance(exc, FileNotFoundError) and not path.exists():
            raise missing_path(path) from exc
        typed = _reader_error(exc, f"{path} as AnnData",
                              "anndata cannot read it: update anndata, or write the file "
                              "again with a current one")
        if typed is None:
            raise
        raise typed from exc


def _read_anndata(path: UPath, **kwargs: Any) -> ad.AnnData:
    import anndata as ad

    suffix = suffix_of(path.name).lower()
    if suffix == ".zarr":
        store = path.path if is_local(path) else str(path)
        return ad.read_zarr(store, **kwargs)
    if suffix.endswith(".tar.gz"):
        with path.open("rb") as raw:
            tar, member = _h5ad_member(raw, path)
            with tar, member:
                return ad.read_h5ad(member, **kwargs)
    if suffix.endswith(".gz"):
        with path.open("rb") as raw, gzip.open(raw) as f:
            return ad.read_h5ad(f, **kwargs)
    if is_local(path):
        return ad.read_h5ad(path.path, **kwargs)
    with path.open("rb") as f:
        return ad.read_h5ad(f, **kwargs)


def count_observations(path: UPath) -> int | None:
    """Return the number of observations of an AnnData (recorded on save).

    ``None`` if ``path`` holds none (a ``.zarr`` or ``.h5`` of another kind).
    """
    try:
        acc = open_anndata(path)
    except UnsupportedFormatError:
        return None
    with acc:
        return acc.n_obs


def anndata_keywords(what: str, suffix: str, kwargs: Mapping[str, Any], *,
                     folder: bool | None = None) -> frozenset[str] | None:
    """Return what ``load()`` of an AnnData hands to anndata: ``read_zarr``'s or ``read_h5ad``'s.

    The format table's :attr:`Format.keywords` hook of format ``anndata`` (its opener names
    its own keywords; the suffix alone tells the reader).
    """
    if what != "load":
        return frozenset()
    return parameters("anndata:read_zarr" if suffix.lower() == ".zarr"
                      else "anndata:read_h5ad")


# -- the shared store ----------------------------------------------------------------------

_FEW_STRINGS = 1024  # h5py reads fewer strings faster than our two rounds of reads
#: Ranges of a request probed for being cached before read-ahead advice (see ``_advise``).
_ADVICE_PROBES = 4
#: Batches a remote read has in flight while one is processed. Requests then wait on
#: network round trips two at a time: with 20 ms a request (loopback S3 behind a delaying
#: proxy), X of the benchmark's 5% subset took 1.95 / 1.60 / 1.56 s for 50k cells and
#: 5.4 / 4.4-5.0 / 4.0 s for 200k with 1 / 2 / 3 batches ahead; without the delay all
#: three were alike. Each batch ahead holds about ``_rows.BATCH_BYTES`` (measured peak
#: for 200k cells: 53 MB with one, 58 MB with three).
_REMOTE_AHEAD = 2
#: Remote 1-D arrays read whole (a sparse matrix's indptr) at least this large are read with
#: our own concurrent range requests, not by h5py (see ``_Store._read_whole``).
_WHOLE_BYTES = 256 * 1024


class _Store:
    """An open file or group shared by an accessor and every subset made from it."""

    def __init__(self, group: Any, *, handles: list[Any], path: str, mode: str,
                 on_close: Callable[[], Any] | None = None, source: Any = None,
                 remote: bool = False, endpoint: str | None = None) -> None:
        self.group = group
        self.handles = handles
        self.path = path
        self.mode = mode
        self.on_close = on_close
        self.remote = remote
        self.endpoint = endpoint
        # where HDF5 bytes can be read directly: a local file path or a RangeFile
        self.rangefile = source if source is not None and not isinstance(source, str) else None
        self.local_file = source if isinstance(source, str) else None
        # a local file's size, modification time and inode as opened: every read checks
        # them again after it (a file replaced or rewritten meanwhile is never mixed in)
        self._state = _file_state(self.local_file) if self.local_file is not None else None
        self._fd: int | None = None
        self._size: int | None = None  # of the file, once asked
        self.closed = False
        self.modified = False
        self._cache: dict[str, Any] = {}

    def check(self) -> None:
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
        or not (a bug: see :func:`_our_bug`), pass through unchanged.
        """
        self.check()
        try:
            with storage_errors(self.path, self.endpoint):
                yield
        except LaminIOError:
            raise
        except Exception as exc:
            self._check_unchanged()  # a file changed under the read explains its failure
            typed = _reader_error(exc, f"{self.path}: element {key!r}",
                                  "read the file with anndata (anndata.read_h5ad or "
                                  "read_zarr) and write it again")
            if typed is None:
                raise
            raise typed from exc
        self._check_unchanged()

    def _check_unchanged(self) -> None:
        """Raise :class:`StorageModifiedError` if the local file changed since it was opened."""
        if self._state is None or _file_state(self.local_file) == self._state:
            return
        msg = (f"{self.path} changed while it was open (its size, modification time or inode "
               f"moved): what was read may mix two versions and is dropped; open it again to "
               f"read the new content")
        raise StorageModifiedError(msg)

    def has(self, key: str) -> bool:
        with self.reading(key):
            return key in self.group

    def get(self, key: str) -> Any:
        with self.reading(key):
            if key not in self.group:
                msg = f"{self.path} has no element {key!r}"
                raise NameNotFoundError(msg)
            return self.group[key]

    def raw_prefix(self, prefix: str) -> str | None:
        """Where a ``raw`` part is stored: ``raw/`` (a group), ``raw.`` (before 0.7), or None.

        Without one, anndata writes a null placeholder ``raw``.
        """
        key = f"{prefix}raw"
        if self.has(key) and is_group(self.get(key)) and "X" in self.get(key):
            return f"{key}/"
        return f"{key}." if self.has(f"{key}.X") else None

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        self.check()
        if key not in self._cache:
            with self.reading(key.split(":", 1)[-1]):
                self._cache[key] = make()
        return self._cache[key]

    def invalidate(self) -> None:
        self._cache.clear()

    def matrix(self, key: str, expected: tuple[int | None, int | None] | None = None) -> Any:
        """Return the on-disk matrix at ``key``: dense array or ``SparseParts`` (cached).

        ``expected``: its ``(rows, columns)`` as its axes say, for a sparse group stored
        without its shape (see :func:`lamin_io.accessors._elements.matrix`).
        """
        def load() -> Any:
            elem = self.get(key)
            if self.rangefile is None:
                return el.matrix(elem, expected=expected)
            if is_group(elem) and "indptr" in elem:
                # a filtered indptr's chunks in one go (an unfiltered one of _WHOLE_BYTES or
                # more is read by _read_whole, a smaller one by h5py through the file's blocks)
                indptr = elem["indptr"]
                self._prefetch([(indptr, np.array([0]), np.array([indptr.shape[0]]))])
            return el.matrix(elem, self._read_whole, expected=expected)

        return self.cached(f"matrix:{key}", load)

    def records(self, key: str) -> np.ndarray:
        """Read a structured array whole (an ``obsm`` of anndata < 0.7), strings decoded."""
        return self.cached(f"records:{key}", lambda: el.read_records(self.get(key)))

    def fixups(self, prefix: str) -> _legacy.Fixups:
        """Find what AnnData fixes on reading the AnnData at ``prefix`` (see ``_legacy``)."""
        from anndata.io import read_elem

        return self.cached(f"fixups:{prefix}uns",
                           lambda: _legacy.find_fixups(self.group, prefix, read_elem))

    def annotations(self, prefix: str, axis: str
                    ) -> tuple[pd.DataFrame, dict[str, np.ndarray], set[str]]:
        """Return ``obs`` or ``var`` whole as AnnData reads it.

        ``(frame, multicolumn matrices, uns keys consumed)``, see
        :func:`lamin_io.accessors._legacy.apply_fixups`.
        """
        key = f"{prefix}{axis}"
        return self.cached(f"annotations:{key}", lambda: _legacy.apply_fixups(
            self.dataframe(key), axis, self.fixups(prefix)))

    def consumed_uns(self, prefix: str) -> set[str]:
        """Return the ``uns`` keys AnnData's old-layout fixes consume on reading.

        Those :func:`lamin_io.accessors._legacy.apply_fixups` used for ``obs`` and ``var``
        (categories that fit a column's codes, multicolumn keys): ``.uns`` leaves them out,
        and so does the accessor's ``repr``. Reads ``obs`` and ``var`` only for a layout
        that has such keys (before anndata 0.7).
        """
        fixups = self.fixups(prefix)
        if not (fixups.categories or fixups.multicol):
            return set()
        return self.annotations(prefix, "obs")[2] | self.annotations(prefix, "var")[2]

    def dataframe(self, key: str) -> pd.DataFrame:
        def load() -> pd.DataFrame:
            elem = self.get(key)
            forget = lambda: None  # noqa: E731
            if self.remote:
                from lamin_io.accessors._zarr import fetch_arrays_ahead

                # a zarr group's arrays in one round trip (not the index, if read already)
                forget = fetch_arrays_ahead(elem, skip_index=f"names:{key}" in self._cache)
            try:
                if is_group(elem) and encoding(elem) == "dataframe":
                    # reuse the index if the names were read already; read each column once
                    return el.read_dataframe_columns(elem, self.axis_names(key),
                                                     self.strings)
                return el.read_dataframe(elem)
            finally:
                forget()

        return self.cached(f"df:{key}", load)

    def axis_names(self, key: str) -> pd.Index:
        return self.cached(f"names:{key}", lambda: _index_of(self.get(key), self, key))

    def axis_length(self, key: str) -> int:
        return self.cached(f"len:{key}", lambda: _length_of(self.get(key)))

    def read(self, key: str, rows: Selection | None, cols: Selection | None,
             expected: tuple[int | None, int | None] | None = None) -> Any:
        """Read ``key[rows, cols]`` through the batched read path.

        ``expected``: its shape as its axes say, see :meth:`matrix`.
        """
        matrix = self.matrix(key, expected)
        if self.rangefile is not None:
            # the file's tail served the metadata read so far (obs, var, this indptr); the
            # batches of a matrix read need none of it, so it does not stay beside them
            self.rangefile.release_tail()
        with self.reading(key):
            return read_matrix(matrix, rows, cols, self.hooks())

    def hooks(self) -> ReadHooks:
        """Read hooks: direct byte reads and prefetch for HDF5; remote: whole chunks."""
        slack = 0 if self.remote else SLACK_BYTES
        if self.local_file is None and self.rangefile is None:
            from lamin_io.accessors import _zarr

            return ReadHooks(slack_bytes=slack, start_runs=_zarr.start_runs,
                             gathers=_zarr.gathers, start_block=_zarr.start_block,
                             ahead=_REMOTE_AHEAD if self.remote else 1)
        return ReadHooks(prefetch=self._prefetch if self.rangefile is not None else None,
                         start_runs=self._start_runs, slack_bytes=slack,
                         whole_chunks=self.remote,
                         advise=self._advise if self.local_file is not None else None,
                         ahead=_REMOTE_AHEAD if self.remote else 1)

    def _direct(self, arr: Any) -> bool:
        """Whether ``arr``'s bytes can be read without HDF5 (1-D, unfiltered, allocated)."""
        from lamin_io.accessors._hdf5_ranges import is_direct

        return bool(self.cached(f"direct:{arr.name}",
                                lambda: self._in_file(arr) and is_direct(arr)))

    def _in_file(self, ds: Any) -> bool:
        """Whether ``ds`` lies in this store's file (not in one behind an external link)."""
        return bool(ds.file == self.group.file)

    def _start_runs(self, items: list[tuple[Any, np.ndarray, np.ndarray]], *,
                    advised: bool = False) -> Pending[list[np.ndarray | None]]:
        """Start reading runs of unfiltered 1-D HDF5 arrays straight from their byte ranges.

        The ranges are located now (HDF5 calls stay in this thread); the ranges of every
        array in ``items`` are then read in one go, in the background (``advised``: the
        kernel was told them already, see :meth:`_advise`). The reads started, called,
        wait for them; an array HDF5 must read itself (filtered, strings, unallocated
        chunks) gets ``None``.
        """
        from lamin_io.accessors._hdf5_ranges import byte_ranges, load_tables

        plans: list[tuple[int, Any] | None] = []  # (values, dtype)
        ranges: list[tuple[int, int]] = []
        index = self._index_reader()
        load_tables([item for item in items if self._direct(item[0])], self._cache, index)
        for arr, starts, stops in items:
            if not self._direct(arr):
                plans.append(None)
                continue
            these = byte_ranges(arr, starts, stops, self._cache, index)
            count = int((stops - starts).sum())
            if sum(e - s for s, e in these) != count * arr.dtype.itemsize:
                plans.append(None)  # unallocated chunks read as fill values: HDF5 does it
                continue
            plans.append((count, arr.dtype))
            ranges.extend(these)
        if not ranges:
            return Pending(lambda: [None] * len(items))
        fetched = self._start_fetch(ranges, advised=advised)

        def finish() -> list[np.ndarray | None]:
            buffer = fetched()
            out: list[np.ndarray | None] = []
            offset = 0
            for plan in plans:
                if plan is None or buffer is None:
                    out.append(None)
                    continue
                count, dtype = plan
                values = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
                out.append(values.astype(dtype.newbyteorder("="), copy=False))
                offset += count * dtype.itemsize
            return out

        return Pending(finish, fetched)

    def _read_whole(self, arr: Any) -> np.ndarray | None:
        """Read a whole 1-D array with our own concurrent reads (``None``: h5py must).

        Only remote arrays of :data:`_WHOLE_BYTES` or more: h5py reads through the file's
        block cache, whose read-ahead doubles from 16 KB, one round trip after the other
        (six for 800 KB), where ours costs the chunk index's levels and one round; for
        smaller arrays that is no fewer. ``_start_runs`` leaves arrays that are not direct
        (filtered, strings, not 1-D, unallocated chunks) to h5py.
        """
        if arr.size * arr.dtype.itemsize < _WHOLE_BYTES:
            return None
        return self._start_runs([(arr, np.array([0]), np.array([arr.shape[0]]))])()[0]

    def _advise(self, items: list[tuple[Any, np.ndarray, np.ndarray]]
                ) -> Callable[[], None] | None:
        """Have the kernel read ahead the byte ranges of runs read later by ``_start_runs``.

        Nothing is done (``None``) when a sample of the first array's ranges is cached (a
        warm file gains nothing). The first array's ranges are all located for the sample
        (their chunk indexes read whole, as the request's batches will want them, in a
        few reads; looking sampled chunks up through HDF5 walks an index once each, ~0.6
        ms a chunk cold). The ranges are advised run by run, every array's pieces of a run
        together, so a batch's ranges are all queued before the next batch's.
        """
        from lamin_io.accessors._hdf5_ranges import direct_pieces, load_tables
        from lamin_io.storage._localread import cached, can_advise, start_advice

        items = [item for item in items if self._direct(item[0])]
        if self.local_file is None or not items or not can_advise():
            return None
        fd = self._local_fd()
        index = self._index_reader()
        load_tables(items, self._cache, index)
        located = [direct_pieces(*items[0], self._cache, index)]
        step = max(1, len(located[0][0]) // _ADVICE_PROBES)
        if cached(fd, located[0][0][step // 2::step]):
            return None
        located += [direct_pieces(arr, starts, stops, self._cache, index)
                    for arr, starts, stops in items[1:]]
        begin, end, run = (np.concatenate(parts) for parts in zip(*located, strict=True))
        order = np.argsort(run, kind="stable")
        return start_advice(fd, begin[order], end[order])

    def _local_fd(self) -> int:
        """Return the local file's descriptor for our own reads (opened on first use)."""
        if self._fd is None:
            import os

            self._fd = os.open(str(self.local_file), os.O_RDONLY)
        return self._fd

    def _read_ranges(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """Read byte ranges of the file concurrently; each one's bytes (short past the end)."""
        buffer = self._start_fetch(ranges)()
        view = memoryview(buffer if buffer is not None else b"")
        out, at = [], 0
        for start, stop in ranges:
            out.append(view[at:at + stop - start])
            at += stop - start
        return out

    def _file_size(self) -> int:
        if self._size is None:
            import os

            self._size = (self.rangefile.size if self.rangefile is not None
                          else os.stat(str(self.local_file)).st_size)
        return self._size

    def _index_reader(self) -> IndexReader:
        """Read chunk indexes with our own concurrent reads (whole ones, when remote)."""
        # made anew each time: kept on the store, its bound method would tie the store into
        # a reference cycle, left to the garbage collector to free (with its HDF5 handles)
        return IndexReader(self._read_ranges, self._file_size(), whole=self.remote)

    def strings(self, ds: Any) -> np.ndarray | None:
        """Read an HDF5 variable-length string array from its heap ourselves (else ``None``)."""
        if (self.local_file is None and self.rangefile is None or ds.shape[0] < _FEW_STRINGS
                or not self._in_file(ds)):
            return None
        from lamin_io.accessors._hdf5_strings import read_vlen_strings

        return read_vlen_strings(ds, self._read_ranges, self._file_size())

    def _start_fetch(self, ranges: list[tuple[int, int]], *, advised: bool = False
                     ) -> Callable[[], bytearray | memoryview | None]:
        """Start reading byte ranges of the file; the result waits for them, concatenated.

        ``None`` when the file is too short. ``advised``: a local file was advised them.
        """
        if self.rangefile is not None:
            return self.rangefile.start_read(ranges)
        from lamin_io.storage._localread import start_pread_ranges

        return start_pread_ranges(self._local_fd(), ranges, advised=advised)

    def _prefetch(self, requests: list[tuple[Any, np.ndarray, np.ndarray]]) -> None:
        from lamin_io.accessors._hdf5_ranges import byte_ranges

        if self.rangefile is None:
            return
        ranges: list[tuple[int, int]] = []
        index = self._index_reader()
        for arr, starts, stops in requests:
            if arr.ndim == 1 and self._direct(arr):
                continue  # read directly by _start_runs
            ranges.extend(byte_ranges(arr, starts, stops, self._cache, index))
        self.rangefile.prefetch(ranges)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.modified:
                import zarr

                zarr.consolidate_metadata(self.group.store)
        finally:
            if self._fd is not None:
                import os

                os.close(self._fd)
                self._fd = None
            for handle in self.handles:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001 (closing must go on)
                    logger.debug("closing %r failed", handle, exc_info=True)
        if self.on_close is not None and self.modified:
            self.on_close()


def _length_of(elem: Any) -> int:
    if not is_group(elem):
        return int(elem.shape[0])
    index_key = attr(elem, "_index", "_index")
    if index_key in elem:
        return int(elem[index_key].shape[0])
    first = next(iter(elem.keys()), None)
    if first is None:
        return 0
    return _length_of(elem[first])


def _index_of(elem: Any, store: _Store, key: str) -> pd.Index:
    import pandas as pd

    if is_group(elem) and encoding(elem) == "dataframe":
        index_key = attr(elem, "_index", "_index")
        values = el.read_element(elem[index_key], store.strings)
        return pd.Index(values, name=None if index_key == "_index" else index_key)
    return store.dataframe(key).index


# -- the accessor --------------------------------------------------------------------------

def _stored_keys(store: _Store, key: str) -> list[str]:
    """Return the keys of a stored mapping.

    A group's members, or the fields of a structured array (``obsm``/``varm`` before 0.7).
    """
    if not store.has(key):
        return []
    elem = store.get(key)
    if is_group(elem):
        return sorted(elem.keys())
    return list(elem.dtype.names or ())


class _ElementMap(Mapping[str, Any]):
    """``layers``, ``obsm``, ... of an accessor: keys are listed, values read on access.

    Values are in-memory objects holding the accessor's selection, like its ``X``.
    """

    def __init__(self, owner: AnnDataAccessor, name: str) -> None:
        self._owner = owner
        self._name = name  # without the accessor's prefix

    def __getitem__(self, key: str) -> Any:
        if key not in self._owner._mapping_keys(self._name):
            msg = f"{self._name} has no key {key!r}; keys: {list(self)}"
            raise NameNotFoundError(msg)
        return self._owner._mapping_item(self._name, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner._mapping_keys(self._name))

    def __len__(self) -> int:
        return len(self._owner._mapping_keys(self._name))

    def __repr__(self) -> str:
        return f"{self._name} with keys: {', '.join(self) or '(none)'}"


class AnnDataAccessor:
    """Lazy, subsettable view of an AnnData stored in ``.h5ad`` or ``.zarr``.

    Create it with :func:`lamin_io.open` or :meth:`Artifact.open`. Indexing takes what
    AnnData takes (slices, integer arrays in any order with repeats, boolean masks, names,
    ``(obs, var)`` tuples) and returns another accessor; elements of an accessor
    (``.X``, ``.obs``, ``.layers[k]``, ...) are in-memory numpy/scipy/pandas objects holding
    only the selection.

    Examples
    --------
    >>> with ln.open("pbmc.h5ad") as adata:                                 # doctest: +SKIP
    ...     b_cells = adata[adata.obs["cell_type"] == "B"]
    ...     counts = b_cells[:, ["CD19", "MS4A1"]].X
    """

    def __init__(self, store: _Store, obs: Selection | None = None,
                 var: Selection | None = None, *, prefix: str = "") -> None:
        self._store = store
        self._prefix = prefix
        n_obs = store.axis_length(self._key("obs"))
        n_vars = store.axis_length(self._key("var"))
        self._obs_sel: Selection = obs if obs is not None else slice(0, n_obs, 1)
        self._var_sel: Selection = var if var is not None else slice(0, n_vars, 1)
        self._n_obs_file = n_obs
        self._n_vars_file = n_vars

    def _key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    # -- shape and names --------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_vars)`` of this selection."""
        return (length(self._obs_sel, self._n_obs_file), length(self._var_sel, self._n_vars_file))

    @property
    def n_obs(self) -> int:
        """Number of observations (cells)."""
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        """Number of variables (genes)."""
        return self.shape[1]

    @property
    def is_subset(self) -> bool:
        """Whether this accessor selects less than the whole file."""
        return self.shape != (self._n_obs_file, self._n_vars_file) or not (
            isinstance(self._obs_sel, slice) and isinstance(self._var_sel, slice))

    @property
    def obs_names(self) -> pd.Index:
        """Observation names of the selection."""
        names = self._store.axis_names(self._key("obs"))
        return names[self._obs_sel] if not self._full(self._obs_sel, self._n_obs_file) \
            else names

    @property
    def var_names(self) -> pd.Index:
        """Variable names of the selection."""
        names = self._store.axis_names(self._key("var"))
        return names[self._var_sel] if not self._full(self._var_sel, self._n_vars_file) \
            else names

    @staticmethod
    def _full(sel: Selection, n: int) -> bool:
        return isinstance(sel, slice) and sel.indices(n) == (0, n, 1)

    # -- subsetting -------------------------------------------------------------------

    def __getitem__(self, key: Any) -> AnnDataAccessor:
        self._store.check()
        obs_key, var_key = split_key(key)
        obs = resolve(obs_key, self._obs_sel, self._n_obs_file, self.obs_names, "obs")
        var = resolve(var_key, self._var_sel, self._n_vars_file, self.var_names, "var")
        return AnnDataAccessor(self._store, obs, var, prefix=self._prefix)

    def _rows(self, sel: Selection, n: int) -> Selection | None:
        return None if self._full(sel, n) else sel

    # -- elements ---------------------------------------------------------------------

    @property
    def X(self) -> Any:  # noqa: N802 (AnnData's name)
        """The data matrix of the selection (numpy array or scipy sparse matrix)."""
        if not self._store.has(self._key("X")):
            return None
        return self._store.read(self._key("X"), self._rows(self._obs_sel, self._n_obs_file),
                                self._rows(self._var_sel, self._n_vars_file),
                                (self._n_obs_file, self._n_vars_file))

    @property
    def obs(self) -> pd.DataFrame:
        """Observation annotations of the selection."""
        return el.subset_rows(self._annotations("obs"),
                              self._rows(self._obs_sel, self._n_obs_file)).copy()

    @property
    def var(self) -> pd.DataFrame:
        """Variable annotations of the selection."""
        return el.subset_rows(self._annotations("var"),
                              self._rows(self._var_sel, self._n_vars_file)).copy()

    def _annotations(self, axis: str) -> pd.DataFrame:
        """Return the whole ``obs``/``var`` as AnnData reads it (old layouts fixed)."""
        return self._store.annotations(self._prefix, axis)[0]

    @property
    def layers(self) -> _ElementMap:
        """Layers: matrices shaped like ``X``."""
        return _ElementMap(self, "layers")

    @property
    def obsm(self) -> _ElementMap:
        """Multi-dimensional observation annotations."""
        return _ElementMap(self, "obsm")

    @property
    def varm(self) -> _ElementMap:
        """Multi-dimensional variable annotations."""
        return _ElementMap(self, "varm")

    @property
    def obsp(self) -> _ElementMap:
        """Pairwise observation annotations (``n_obs x n_obs``)."""
        return _ElementMap(self, "obsp")

    @property
    def varp(self) -> _ElementMap:
        """Pairwise variable annotations (``n_vars x n_vars``)."""
        return _ElementMap(self, "varp")

    @property
    def uns(self) -> dict[str, Any]:
        """Unstructured annotations (read whole, never subset).

        As AnnData reads them: without what old layouts keep there for other elements
        (categories, multicolumn keys, neighbour graphs, which :attr:`obsp` holds).
        """
        key = self._key("uns")
        if not self._store.has(key):
            return {}
        return dict(self._store.cached(f"uns:{key}", self._read_uns))

    def _read_uns(self) -> Any:
        store = self._store
        group = store.get(self._key("uns"))
        if not is_group(group):
            return el.read_element(group)
        fixups = store.fixups(self._prefix)
        consumed = store.consumed_uns(self._prefix)
        out: dict[str, Any] = {}
        for k in group:
            if k in consumed:
                continue
            if k == "neighbors" and fixups.graphs:  # the graphs are read as obsp
                out[k] = {g: el.read_element(group[k][g], store.strings)
                          for g in group[k] if g not in fixups.graphs}
            else:
                out[k] = el.read_element(group[k], store.strings)
        return out

    @property
    def raw(self) -> RawAccessor | None:
        """The ``raw`` part (all of its variables, the selected observations), if any."""
        where = self._store.raw_prefix(self._prefix)
        return None if where is None else RawAccessor(self, where)

    def _mapping_keys(self, name: str) -> list[str]:
        """Keys of ``layers``, ``obsm``, ...: those stored and those AnnData moves there."""
        keys = _stored_keys(self._store, self._key(name))
        fixups = self._store.fixups(self._prefix)
        moved: list[str] = []
        if name == "obsp":
            moved = list(fixups.graphs)
        elif name in ("obsm", "varm") and name[:3] in fixups.multicol:
            moved = fixups.multicol[name[:3]][1]
        return keys + [k for k in moved if k not in keys]

    def _mapping_item(self, name: str, key: str) -> Any:
        with self._store.reading(self._key(f"{name}/{key}")):
            return self._read_mapping_item(name, key)

    def _read_mapping_item(self, name: str, key: str) -> Any:
        store = self._store
        fixups = store.fixups(self._prefix)
        rows = self._rows(self._obs_sel, self._n_obs_file) if name in (
            "layers", "obsm", "obsp") else self._rows(self._var_sel, self._n_vars_file)
        if name == "obsp" and key in fixups.graphs:  # AnnData moves them from uns
            n = self._n_obs_file
            return store.read(self._key(f"uns/neighbors/{key}"), rows, rows, (n, n))
        if name in ("obsm", "varm") and key in fixups.multicol.get(name[:3], ("", []))[1]:
            matrices = store.annotations(self._prefix, name[:3])[1]
            return np.array(el.subset_rows(matrices[key], rows))
        mapping = store.get(self._key(name))
        if not is_group(mapping):  # one structured array, a field per key (< 0.7)
            return np.array(el.subset_rows(store.records(self._key(name))[key], rows))
        return self._read_element(self._key(f"{name}/{key}"), name, rows)

    def _read_element(self, key: str, name: str, rows: Selection | None) -> Any:
        store = self._store
        n_obs, n_vars = self._n_obs_file, self._n_vars_file
        expected: tuple[int | None, int | None] = {
            "layers": (n_obs, n_vars), "obsm": (n_obs, None), "obsp": (n_obs, n_obs),
            "varm": (n_vars, None), "varp": (n_vars, n_vars)}[name]
        elem = store.get(key)
        if is_group(elem) and not el.is_sparse(elem):
            if encoding(elem) in ("dataframe", ""):
                return el.subset_rows(store.dataframe(key), rows).copy()
            return el.subset_rows(el.read_element(elem), rows)  # e.g. awkward arrays
        if name == "layers":
            return store.read(key, rows, self._rows(self._var_sel, n_vars), expected)
        if name in ("obsp", "varp"):
            return store.read(key, rows, rows, expected)
        return store.read(key, rows, None, expected)

    # -- whole objects ----------------------------------------------------------------

    def to_memory(self) -> ad.AnnData:
        """Return the selection as an in-memory ``AnnData``.

        Equal to loading the whole file and subsetting it the same way.
        """
        import anndata as ad

        obs, var, uns = self.obs, self.var, self.uns
        if self.is_subset:
            el.trim_colors(uns, self._annotations("obs"), obs)
            el.trim_colors(uns, self._annotations("var"), var)
        adata = ad.AnnData(
            X=self.X, obs=obs, var=var,
            layers={k: self.layers[k] for k in self.layers},
            obsm={k: self.obsm[k] for k in self.obsm},
            varm={k: self.varm[k] for k in self.varm},
            obsp={k: self.obsp[k] for k in self.obsp},
            varp={k: self.varp[k] for k in self.varp},
            uns=uns,
        )
        raw = self.raw
        if raw is not None:
            adata.raw = ad.AnnData(X=raw.X, var=raw.var, obs=adata.obs,
                                   varm={k: raw.varm[k] for k in raw.varm})
        return adata

    def to_dict(self) -> dict[str, Any]:
        """Return every element of the selection in memory, keyed by element name."""
        out: dict[str, Any] = {"X": self.X, "obs": self.obs, "var": self.var}
        for name in ("layers", "obsm", "varm", "obsp", "varp"):
            mapping = getattr(self, name)
            out[name] = {k: mapping[k] for k in mapping}
        out["uns"] = self.uns
        raw = self.raw
        if raw is not None:
            out["raw"] = {"X": raw.X, "var": raw.var,
                          "varm": {k: raw.varm[k] for k in raw.varm}}
        return out

    # -- writing back -----------------------------------------------------------------

    def add_column(self, where: str, col_name: str, col: Any) -> None:
        """Add a column to ``obs`` or ``var`` of a ``.zarr`` store opened with ``mode="r+"``.

        Parameters
        ----------
        where
            ``"obs"`` or ``"var"``.
        col_name
            Column name; must not exist yet.
        col
            Values, one per observation/variable: numeric, strings or categorical.
        """
        import pandas as pd
        from anndata.io import write_elem

        store = self._store
        store.check()
        if store.mode != "r+":
            msg = (f"{store.path} is open read-only; open an AnnData .zarr store with "
                   f"mode='r+' to add columns")
            raise WriteNotSupportedError(msg)
        if where not in ("obs", "var"):
            msg = f"where must be 'obs' or 'var', got {where!r}"
            raise InvalidArgumentError(msg)
        if self.is_subset:
            msg = "add columns on the whole store, not on a subset"
            raise InvalidArgumentError(msg)
        group = store.get(self._key(where))
        n = self.n_obs if where == "obs" else self.n_vars
        if isinstance(col, pd.Series | pd.Index):
            col = col.to_numpy() if not isinstance(col.dtype, pd.CategoricalDtype) \
                else pd.Categorical(col)
        elif not isinstance(col, np.ndarray | pd.Categorical):
            col = np.asarray(col)
            if col.dtype.kind == "U":
                col = col.astype(object)
        if len(col) != n:
            msg = f"column {col_name!r} has {len(col)} values, {where} has {n}"
            raise InvalidArgumentError(msg)
        if col_name in group or col_name == attr(group, "_index"):
            msg = f"{where} already has a column {col_name!r}"
            raise InvalidArgumentError(msg)
        write_elem(group, col_name, col)
        order = list(attr(group, "column-order") or [])
        group.attrs["column-order"] = [*order, col_name]
        store.modified = True
        store.invalidate()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._store.closed

    def close(self) -> None:
        """Close the file (and, after edits through an artifact, save the new version)."""
        self._store.close()

    @property
    def storage(self) -> Any:
        """The underlying ``h5py.File`` or ``zarr.Group``."""
        return self._store.group

    def __enter__(self) -> AnnDataAccessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"AnnDataAccessor of {self._store.path} (closed)"
        n_obs, n_vars = self.shape
        kind = "subset of " if self.is_subset else ""
        lines = [f"AnnDataAccessor {kind}{self._store.path}",
                 f"    n_obs x n_vars = {n_obs} x {n_vars}"]
        fixups = self._store.fixups(self._prefix)
        for name in ("obs", "var"):
            group = self._store.get(self._key(name))
            if is_group(group):  # 0.7 kept categories in a __categories group
                cols = [c for c in group.keys()
                        if c not in (attr(group, "_index", "_index"), "__categories")]
            else:  # a structured array (< 0.7): its first field is the index
                cols = list(group.dtype.names or ())[1:]
            _, multicol = fixups.multicol.get(name, ("", []))
            cols = [c for c in cols if not any(c.startswith(k) for k in multicol)]
            if cols:
                lines.append(f"    {name}: {', '.join(repr(c) for c in sorted(cols))}")
        for name in ("layers", "obsm", "varm", "obsp", "varp"):
            keys = list(getattr(self, name))
            if keys:
                lines.append(f"    {name}: {', '.join(repr(k) for k in keys)}")
        if self._store.has(self._key("uns")):
            hidden = self._store.consumed_uns(self._prefix)  # as .uns leaves them out
            uns_keys = [k for k in self._store.get(self._key("uns")) if k not in hidden]
            if uns_keys:
                lines.append(f"    uns: {', '.join(repr(k) for k in uns_keys)}")
        if self._store.raw_prefix(self._prefix) is not None:
            lines.append("    raw: X, var")
        return "\n".join(lines)


class RawAccessor:
    """``adata.raw`` of an accessor: the selected observations, all raw variables."""

    def __init__(self, owner: AnnDataAccessor, where: str) -> None:
        self._owner = owner
        self._store = owner._store
        self._key = where  # "raw/", or "raw." where anndata < 0.7 kept raw's parts

    @property
    def var(self) -> pd.DataFrame:
        """Raw variable annotations."""
        return self._store.dataframe(f"{self._key}var").copy()

    @property
    def var_names(self) -> pd.Index:
        """Raw variable names."""
        return self._store.axis_names(f"{self._key}var")

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_obs, n_raw_vars)``."""
        return (self._owner.n_obs, self._store.axis_length(f"{self._key}var"))

    @property
    def X(self) -> Any:  # noqa: N802 (AnnData's name)
        """Raw matrix of the selected observations."""
        owner = self._owner
        return self._store.read(f"{self._key}X", owner._rows(owner._obs_sel, owner._n_obs_file),
                                None, (owner._n_obs_file, self.shape[1]))

    @property
    def varm(self) -> dict[str, Any]:
        """Raw ``varm`` (read whole)."""
        key = f"{self._key}varm"
        keys = _stored_keys(self._store, key)
        if keys and not is_group(self._store.get(key)):  # a structured array (< 0.7)
            return {k: np.array(self._store.records(key)[k]) for k in keys}
        return {k: el.read_element(self._store.get(f"{key}/{k}")) for k in keys}

    def __repr__(self) -> str:
        return f"RawAccessor with n_obs x n_vars = {self.shape[0]} x {self.shape[1]}"
