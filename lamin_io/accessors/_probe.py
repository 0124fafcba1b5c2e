"""A probe for untrusted files: read everything once in a child process first.

HDF5, TileDB and Arrow decode in native code, and some damaged bytes crash them (one h5ad
mutant in a hundred took h5py down with ``SIGSEGV`` in our measurements) instead of raising
an error: a crash takes the whole Python process with it. :func:`probe` reads every value
of a file or folder once, chunk by chunk, in a separate Python process: a damaged file
raises :class:`CorruptArtifactError` in the caller, whether the child raised or died.

A registered artifact needs no probe for ``load()`` and ``cache()``: they hash the stored
bytes against the record before any reader sees them. The probe is for files from outside
(``lamin_io.open(path)`` of a download, a collaborator's file), and before ``open()`` of
an artifact whose bytes may have decayed in place (see "The record is the truth" in the
README).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from lamin_io.errors import CorruptArtifactError, LaminIOError
from lamin_io.storage import missing_path, storage_errors, suffix_of, to_upath

if TYPE_CHECKING:
    from collections.abc import Mapping

    from upath import UPath

    from lamin_io.storage import PathLike

__all__ = ["probe"]

#: Rows (of the first axis) read at once where an array is not chunked.
_BLOCK_BYTES = 64 * 2**20


def probe(path: PathLike, *, storage_options: Mapping[str, Any] | None = None,
          timeout: float | None = 3600.0) -> None:
    """Read every value of a file or folder once, in a child process; raise if it cannot.

    What ``lamin_io.open(path)`` opens is walked through the library that reads it: every
    HDF5 dataset and attribute (``.h5ad``, ``.h5``), every zarr array and attribute, every
    record batch of a table, every array of a TileDB-SOMA store, chunk by chunk (memory:
    one chunk, or one 64 MB band of rows of an unchunked array). Nothing is kept: call
    :func:`lamin_io.open` afterwards. Costs a Python start (about a second) plus one full
    read of the content.

    Parameters
    ----------
    path
        Local path or URL of the file or folder.
    storage_options
        fsspec options for remote paths (passed to the child through a pipe, never on its
        command line).
    timeout
        Seconds the child may take; ``None`` for no limit.

    Raises
    ------
    CorruptArtifactError
        The content cannot be read: the child raised (the error it raised, lamin-io's
        own type kept where it had one), crashed (its signal named), or did not finish
        within ``timeout``.
    PathNotFoundError
        Nothing is stored at ``path``.
    UnsupportedFormatError
        No format opens the path.

    Examples
    --------
    >>> import lamin_io as ln                                              # doctest: +SKIP
    >>> ln.probe("downloads/pbmc.h5ad")  # raises CorruptArtifactError if it is damaged
    >>> adata = ln.open("downloads/pbmc.h5ad")
    """
    from lamin_io.accessors._formats import format_for

    upath = to_upath(path, storage_options)
    format_for(suffix_of(upath.name), what="open")  # an unknown suffix: before anything
    with storage_errors(str(upath), dict(upath.storage_options).get("endpoint_url")):
        if not upath.exists():
            raise missing_path(upath)
    with tempfile.TemporaryDirectory(prefix="lamin-io-probe-") as tmp:
        answer = os.path.join(tmp, "answer")
        request = pickle.dumps((str(upath), dict(upath.storage_options), answer))
        try:
            done = subprocess.run(  # noqa: S603 (this interpreter, our own module)
                [sys.executable, "-c", "from lamin_io.accessors._probe import _child; _child()"],
                input=request, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            msg = (f"{upath} could not be read within {timeout:g} s (probe): its reader "
                   f"hangs on it or it is very large; raise timeout= to wait longer")
            raise CorruptArtifactError(msg) from exc
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            msg = (f"{upath} crashed the library reading it (the probe's process died of "
                   f"{name}): it is damaged in a way its reader does not check, or it "
                   f"needs more memory than there is; do not open it in this process")
            raise CorruptArtifactError(msg)
        if done.returncode == 0 and not os.path.exists(answer):
            return
        error = _answer(answer, done)
    raise error


def _answer(answer: str, done: subprocess.CompletedProcess[bytes]) -> LaminIOError:
    """Return the error the child reported (a lamin-io error, or a description of one)."""
    try:
        with open(answer, "rb") as f:  # noqa: PTH123
            kind, found = pickle.load(f)  # noqa: S301 (written by our own child)
    except (OSError, EOFError, pickle.UnpicklingError):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        msg = f"the probe's process failed (exit {done.returncode}): {' '.join(tail)}"
        return CorruptArtifactError(msg)
    if kind == "typed":
        return found
    return CorruptArtifactError(found)


def _child() -> None:
    """Serve as the child: read the request from stdin, walk the content, answer."""
    url, options, answer = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 (our parent)
    path = to_upath(url, options)
    try:
        with storage_errors(url, options.get("endpoint_url")):  # (a storage failure: typed)
            _walk(path)
    except LaminIOError as exc:
        _write(answer, ("typed", exc))
    except Exception as exc:  # noqa: BLE001 (any failure to read is reported, typed)
        _write(answer, ("other", f"{path} cannot be read ({type(exc).__name__}: {exc}); it "
                                 f"is damaged or incomplete: restore it from its source"))


def _write(answer: str, what: tuple[str, Any]) -> None:
    try:
        data = pickle.dumps(what)
    except Exception:  # noqa: BLE001 (an error that does not pickle: its text)
        data = pickle.dumps(("other", str(what[1])))
    with open(answer, "wb") as f:  # noqa: PTH123
        f.write(data)


def _walk(path: UPath) -> None:
    """Read everything ``path`` holds once, with the library its format uses."""
    from lamin_io._faults import kill_point
    from lamin_io.accessors._formats import format_for
    from lamin_io.accessors._tables import TABLE_FORMATS, open_many

    fmt = format_for(suffix_of(path.name), path, what="open")
    kill_point("probe")  # (tests: a reader that crashes)
    endpoint = dict(path.storage_options).get("endpoint_url")
    if fmt.name in TABLE_FORMATS or fmt.name == "table-folder":
        with storage_errors(str(path), endpoint):
            for _ in open_many([path]).to_batches():
                pass
        return
    if fmt.name == "tiledbsoma":
        from lamin_io.accessors._soma import open_soma

        with open_soma(path) as obj:
            _walk_soma(obj)
        return
    if suffix_of(path.name).lower() == ".zarr":
        from lamin_io.accessors.readpath.zarr_store import open_zarr_group

        with storage_errors(str(path), endpoint):
            _walk_zarr(open_zarr_group(path, "r"))
        return
    if suffix_of(path.name).lower().startswith((".h5", ".hdf5")):
        from lamin_io.accessors.readpath.source import open_hdf5

        with storage_errors(str(path), endpoint):
            file, handles, _ = open_hdf5(path, "r", prime=False)
            try:
                _walk_hdf5(file)
            finally:
                file.close()
                for handle in handles:
                    handle.close()
        return
    opener = fmt.resolve("open")  # another format: opening is what can be checked
    opened = opener(path, mode="r", on_close=None)
    close = getattr(opened, "close", None)
    if close is not None:
        close()


def _band(shape: tuple[int, ...], chunks: tuple[int, ...] | None, itemsize: int) -> int:
    """Return how many rows (of the first axis) to read at once: a chunk's, or ~64 MB."""
    row = max(int(itemsize), 1)
    for n in shape[1:]:
        row *= max(int(n), 1)
    return int(chunks[0]) if chunks else max(_BLOCK_BYTES // row, 1)


def _read_bands(array: Any) -> None:
    """Read an HDF5 dataset or zarr array whole, a band of rows at a time."""
    if array.ndim == 0:
        array[()]  # noqa: B018 (decoding it is the point)
        return
    step = _band(array.shape, array.chunks, array.dtype.itemsize)
    for start in range(0, array.shape[0], step):
        array[start:start + step]  # noqa: B018


def _walk_hdf5(file: Any) -> None:
    import h5py

    def visit(_: str, obj: Any) -> None:
        for name in obj.attrs:
            obj.attrs[name]  # noqa: B018 (decoding them is the point)
        if isinstance(obj, h5py.Dataset) and obj.shape is not None:
            _read_bands(obj)

    for name in file.attrs:
        file.attrs[name]  # noqa: B018
    file.visititems(visit)


def _walk_zarr(group: Any) -> None:
    import zarr

    group.attrs.asdict()
    for _, node in group.members(max_depth=None):
        node.attrs.asdict()
        if isinstance(node, zarr.Array):
            _read_bands(node)


def _walk_soma(obj: Any) -> None:
    import tiledbsoma

    dict(obj.metadata)
    if isinstance(obj, tiledbsoma.DataFrame):
        for _ in obj.read():
            pass
    elif isinstance(obj, tiledbsoma.SparseNDArray):
        for _ in obj.read().tables():
            pass
    elif isinstance(obj, tiledbsoma.DenseNDArray):
        shape = tuple(int(n) for n in obj.shape)
        if shape and shape[0]:
            width = obj.schema.field("soma_data").type.bit_width // 8
            step = _band(shape, None, width)
            for start in range(0, shape[0], step):  # (SOMA's slices include their end)
                obj.read(coords=(slice(start, min(start + step, shape[0]) - 1),))
    else:  # a collection: Experiment, Measurement, Collection
        for key in obj:
            _walk_soma(obj[key])
