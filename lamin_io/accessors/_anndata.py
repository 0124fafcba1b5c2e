"""AnnData stored as ``.h5ad`` (HDF5) or ``.zarr``: lazy access and whole loads.

:class:`AnnDataAccessor` mirrors AnnData's surface without reading anything until an
element is asked for. Subsets (``a[mask, genes]``) are cheap selections; their elements are
read through the batched read path (:mod:`lamin_io.accessors.readpath`, whose
:class:`~lamin_io.accessors.readpath.Source` the accessor's store extends), which reads only
the rows that hold the selection.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors import _elements as el
from lamin_io.accessors import _legacy
from lamin_io.accessors._attrs import attr, encoding, is_group
from lamin_io.accessors._formats import parameters
from lamin_io.accessors._index import Selection, length, resolve, split_key
from lamin_io.accessors.readpath.source import (
    Source,
    factorize,
    h5ad_member,
    open_hdf5,
    reader_error,
)
from lamin_io.accessors.readpath.zarr_store import open_zarr_group, zarr_root_attrs
from lamin_io.errors import (
    CorruptArtifactError,
    InvalidArgumentError,
    LaminIOError,
    NameNotFoundError,
    UnsupportedFormatError,
    WriteNotSupportedError,
)
from lamin_io.storage import is_local, missing_path, storage_errors, suffix_of

if TYPE_CHECKING:
    from collections.abc import Callable

    import anndata as ad
    import pandas as pd
    from upath import UPath

__all__ = ["AnnDataAccessor", "anndata_keywords", "anndata_source", "count_observations",
           "is_anndata", "load_anndata", "open_anndata"]

logger = logging.getLogger(__name__)

_ELEMENTS = ("X", "obs", "var", "layers", "obsm", "varm", "obsp", "varp", "uns", "raw")


# -- opening -------------------------------------------------------------------------------

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
        file, handles, _ = open_hdf5(path, "r", prime=False)
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
    return AnnDataAccessor(anndata_source(path, mode=mode, versions=versions,
                                          on_close=on_close))


def anndata_source(path: UPath, *, mode: str = "r",
                   versions: str | Mapping[str, str] | None = None,
                   on_close: Callable[[], Any] | None = None) -> _Store:
    """Open the read path's source of an AnnData store, with AnnData's semantics.

    What the accessor and the training loaders read through; a store that holds no
    AnnData raises :class:`UnsupportedFormatError`, an unreadable one
    :class:`CorruptArtifactError`.
    """
    store = _Store(path, mode=mode, versions=versions, on_close=on_close)
    try:
        holds_anndata = _is_anndata_group(store.group, path)
    except LaminIOError:
        store.close()
        raise
    if not holds_anndata:
        store.close()
        msg = f"{path} holds no AnnData (no obs/var); open it with lamin_io.open() as generic"
        raise UnsupportedFormatError(msg)
    return store


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
        typed = reader_error(exc, f"{path} as AnnData",
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
            tar, member = h5ad_member(raw, path)
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

class _Store(Source):
    """An open store shared by an accessor and every subset made from it.

    The read path's :class:`~lamin_io.accessors.readpath.Source` with what AnnData means
    on top: obs and var as AnnData reads them (old layouts fixed), axis names, and the
    callback of a zarr store written to (``on_close``).
    """

    def __init__(self, path: UPath, *, mode: str = "r",
                 versions: str | Mapping[str, str] | None = None,
                 on_close: Callable[[], Any] | None = None) -> None:
        super().__init__(path, mode=mode, versions=versions)
        self.on_close = on_close
        self.modified = False

    def raw_prefix(self, prefix: str) -> str | None:
        """Where a ``raw`` part is stored: ``raw/`` (a group), ``raw.`` (before 0.7), or None.

        Without one, anndata writes a null placeholder ``raw``.
        """
        key = f"{prefix}raw"
        if self.has(key) and is_group(self.get(key)) and "X" in self.get(key):
            return f"{key}/"
        return f"{key}." if self.has(f"{key}.X") else None

    def strings(self, ds: Any) -> np.ndarray | None:
        """Read a string array faster than its library would (see the backend), or None."""
        return self.backend.strings(ds)

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
                from lamin_io.accessors.readpath.zarr_store import fetch_arrays_ahead

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

    def _column(self, key: str) -> pd.Index | tuple[np.ndarray, pd.Index]:
        """Return :meth:`Source.codes`'s view of an ``obs``/``var`` column, old layouts too.

        Today's encodings are the read path's (a categorical's rows' codes alone are read);
        a column of an older layout (a field of a structured ``obs``, 0.7's
        ``__categories``) comes from the whole frame AnnData would read.
        """
        head, _, column = key.rpartition("/")
        prefix, axis = head[:-3], head[-3:]
        legacy = axis in ("obs", "var") and self.has(head) and (
            not self.has(key) or self.has(f"{head}/__categories/{column}"))
        if not legacy:
            return super()._column(key)
        frame = self.annotations(prefix, axis)[0]
        if column not in frame.columns:
            msg = f"{self.path} has no {axis} column {column!r}; columns: {list(frame.columns)}"
            raise NameNotFoundError(msg)
        return factorize(frame[column].array)

    def axis_length(self, key: str) -> int:
        return self.cached(f"len:{key}", lambda: _length_of(self.get(key)))

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.modified:
                import zarr

                zarr.consolidate_metadata(self.group.store)
        finally:
            super().close()
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
    with store.reading(key):  # (listing a damaged group fails in HDF5 too)
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
                                expected=(self._n_obs_file, self._n_vars_file))

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
            return store.read(self._key(f"uns/neighbors/{key}"), rows, rows, expected=(n, n))
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
            return store.read(key, rows, self._rows(self._var_sel, n_vars), expected=expected)
        if name in ("obsp", "varp"):
            return store.read(key, rows, rows, expected=expected)
        return store.read(key, rows, None, expected=expected)

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
                                None, expected=(owner._n_obs_file, self.shape[1]))

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
