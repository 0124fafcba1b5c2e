"""``MappedCollection``: many AnnData files as one map-style dataset, read a batch at a time.

A drop-in for lamindb's ``MappedCollection`` (same parameters, items and attributes, see
the class docstring), built on the batched read path: ``__getitems__`` (what torch's
``DataLoader`` calls for a batch) groups a batch's rows by file and reads each file's rows
in one planned read (:meth:`lamin_io.accessors.readpath.Source.read`), not one row at a
time. Files open lazily in the process that reads (``DataLoader`` workers each open their
own, under ``fork`` and ``spawn``), so no worker init function is needed.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.errors import IndexOutOfRangeError, InvalidArgumentError, NameNotFoundError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

    from lamin_io.accessors._anndata import _Store

__all__ = ["Batch", "MappedCollection"]

_JOINS = (None, "inner", "outer")


def _listed(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class MappedCollection:
    """Many AnnData files (``.h5ad``, ``.zarr``; local or S3) as one map-style dataset.

    Items are lamindb's: ``ds[i]`` is a dict with ``"_store_idx"`` (the file's position in
    ``path_list``), each of ``layers_keys`` (``"X"``, ``"raw.X"`` or a layer: a 1-D row,
    its variables joined across files by ``join``), ``f"obsm_{key}"`` for ``obsm_keys``,
    and each of ``obs_keys`` (an int code where encoded, else the value). A key a file
    lacks is left out of its items, as lamindb does; ``fill_missing=True`` fills it
    instead (encoded labels with the ``unknown_label`` code, -1 without one; numbers, rows
    and ``obsm`` with NaN) so shuffled batches across files collate.

    ``ds[[i, j, ...]]`` and ``ds.__getitems__([...])`` (what a ``DataLoader`` calls for a
    batch) read a whole batch at once: a :class:`Batch`, the list of items ``[ds[i] for i
    in indices]`` gives, which :func:`lamin_io.loaders.collate` also stacks without
    making one dict a row.

    Parameters
    ----------
    path_list
        The files, in order (``str``, ``Path`` or ``UPath``; ``s3://`` URLs with
        ``storage_options``).
    layers_keys
        ``None`` or ``"X"`` for X, ``"raw.X"`` for raw's X, or a layer's name; a list for
        several.
    obs_keys, obsm_keys
        Columns of ``obs``, keys of ``obsm`` to return.
    obs_filter
        ``{column: value or list of values}``; several columns AND-ed (a missing value in
        the list selects missing labels).
    join
        ``"inner"`` (variables in every file, in the first file's order), ``"outer"``
        (variables of any file, sorted; zeros where a file lacks one) or ``None`` (as
        stored; files must then agree).
    encode_labels
        Encode ``obs_keys`` (all with ``True``, or those listed) as ints, by sorted category.
    unknown_label
        A category coded -1 (for every encoded key, or ``{key: label}``).
    cache_categories, parallel
        Accepted as lamindb takes them; categories are always read once, and files always
        open per process.
    dtype
        Cast rows of layers and ``obsm`` to this dtype.
    fill_missing
        Fill keys a file lacks (see above) instead of leaving them out.
    storage_options
        fsspec options of remote paths (``endpoint_url``, ``anon``, ...).
    versions
        Per file, the stored version its reads must see (as a registry recorded it).
    order_key
        What, beside seed and epoch, makes a :class:`DistributedSampler`'s epoch order
        (default: from the files' paths; ``mapped()`` of a registry passes the artifacts'
        hashes).
    """

    def __init__(self, path_list: Sequence[Any], layers_keys: str | list[str] | None = None,
                 obs_keys: str | list[str] | None = None,
                 obsm_keys: str | list[str] | None = None,
                 obs_filter: Mapping[str, Any] | tuple[str, Any] | None = None,
                 join: str | None = "inner",
                 encode_labels: bool | list[str] = True,  # noqa: FBT001, FBT002 (lamindb's)
                 unknown_label: str | dict[str, str] | None = None,
                 cache_categories: bool = True, parallel: bool = False,  # noqa: FBT001, FBT002
                 dtype: str | None = None, *, fill_missing: bool = False,
                 storage_options: Mapping[str, Any] | None = None,
                 versions: Sequence[str | Mapping[str, str] | None] | None = None,
                 order_key: int | None = None) -> None:
        if join not in _JOINS:
            msg = f"join must be None, 'inner' or 'outer', got {join!r}"
            raise InvalidArgumentError(msg)
        if isinstance(obs_filter, tuple):
            warnings.warn("obs_filter as a tuple is deprecated: pass {column: values}",
                          DeprecationWarning, stacklevel=2)
            obs_filter = {obs_filter[0]: obs_filter[1]}
        self.layers_keys: list[str] = _listed(layers_keys) or ["X"]
        self.obs_keys = _listed(obs_keys)
        self.obsm_keys = _listed(obsm_keys)
        self.encode_labels = self._encoded(encode_labels)
        if isinstance(unknown_label, dict) and not set(unknown_label) <= set(
                self.encode_labels):
            msg = ("every key of unknown_label must be an encoded obs key (in encode_labels "
                   f"and obs_keys): got {sorted(unknown_label)}")
            raise InvalidArgumentError(msg)
        self.unknown_label = unknown_label
        self.cache_categories = cache_categories
        self.parallel = parallel
        self.fill_missing = fill_missing
        self._dtype = np.dtype(dtype) if dtype is not None else None
        self.filtered = bool(obs_filter)
        self.path_list = list(path_list)
        if not self.path_list:
            msg = "path_list is empty: give at least one .h5ad or .zarr file"
            raise InvalidArgumentError(msg)
        self._closed = False
        self._lookups: dict[tuple[int, str], np.ndarray] = {}  # a file's codes -> encoded
        # a file's label column, whole (codes in the smallest integer type that holds them)
        self._columns: dict[tuple[int, str], tuple[np.ndarray, pd.Index]] = {}
        self.order_key = (order_key if order_key is not None else
                          _digest("\n".join(str(p) for p in self.path_list)))
        self._stores = self._open(storage_options, versions)
        try:
            self._index(dict(obs_filter or {}))
            self._join(join)
            self._encoders()
        except BaseException:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------------

    def _encoded(self, encode_labels: bool | list[str]) -> list[str]:  # noqa: FBT001
        """Return the obs keys to encode (lamindb's rules: ``True`` means every obs key)."""
        if isinstance(encode_labels, list | tuple):
            if not encode_labels:
                return []
            if self.obs_keys is None or not set(encode_labels) <= set(self.obs_keys):
                msg = (f"every key of encode_labels must be in obs_keys: got "
                       f"{list(encode_labels)}, obs_keys {self.obs_keys}")
                raise InvalidArgumentError(msg)
            return list(encode_labels)
        return list(self.obs_keys or ()) if encode_labels else []

    def _open(self, storage_options: Mapping[str, Any] | None,
              versions: Sequence[Any] | None) -> list[_Store]:
        from lamin_io.accessors._anndata import anndata_source
        from lamin_io.storage import to_upath

        stores: list[_Store] = []
        try:
            for i, path in enumerate(self.path_list):
                upath = to_upath(path, storage_options)
                stores.append(anndata_source(
                    upath, versions=versions[i] if versions is not None else None))
        except BaseException:
            for store in stores:
                store.close()
            raise
        return stores

    def _has_obs(self, s: int, key: str) -> bool:
        return key in self._obs_columns[s]

    def _index(self, obs_filter: dict[str, Any]) -> None:
        self._obs_columns = [self._columns_of(store) for store in self._stores]
        self.check_obs_keys(self.obs_keys or ())
        self.indices_list: list[np.ndarray] = []
        for s, store in enumerate(self._stores):
            n = store.axis_length("obs")
            keep = np.ones(n, dtype=bool)
            for column, wanted in obs_filter.items():
                values = list(wanted) if isinstance(wanted, list | tuple | set) else [wanted]
                keep &= self._matches(s, column, values, n)
            self.indices_list.append(np.flatnonzero(keep).astype(np.int64))
        self.n_obs_list = [len(ix) for ix in self.indices_list]
        self.n_obs = int(sum(self.n_obs_list))
        self.indices = np.concatenate(self.indices_list)
        self.storage_idx = np.repeat(np.arange(len(self._stores)), self.n_obs_list)

    @staticmethod
    def _columns_of(store: Any) -> dict[str, None]:
        """Return a file's obs columns, in their stored order (the index left out)."""
        from lamin_io.accessors._anndata import _stored_keys
        from lamin_io.accessors._attrs import attr, is_group

        if not store.has("obs"):
            return {}
        group = store.get("obs")
        if not is_group(group):  # a structured array (< 0.7): its first field is the index
            return dict.fromkeys(list(group.dtype.names or ())[1:])
        index = attr(group, "_index", "_index")
        keys = _stored_keys(store, "obs")
        order = [k for k in attr(group, "column-order", None) or [] if k in keys]
        return dict.fromkeys(k for k in [*order, *keys]
                             if k not in (index, "_index", "__categories"))

    def check_obs_keys(self, keys: Sequence[str]) -> None:
        """Raise :class:`NameNotFoundError` for an obs key that no file has."""
        for key in keys:
            if not any(key in columns for columns in self._obs_columns):
                msg = (f"obs key {key!r} is in none of the {len(self._stores)} files; "
                       f"columns of the first: {sorted(self._obs_columns[0])}")
                raise NameNotFoundError(msg)

    def obs_columns(self) -> list[str]:
        """Return the obs columns every file has, in the first file's order."""
        return [k for k in self._obs_columns[0]
                if all(k in columns for columns in self._obs_columns[1:])]

    def release(self, s: int) -> None:
        """Forget what was read whole of file ``s`` (its columns, names; read again on use).

        A pass over the files one at a time then holds one file's, not all of them.
        """
        for key in [k for k in self._columns if k[0] == s]:
            del self._columns[key]
        self._stores[s].invalidate()

    def _matches(self, s: int, column: str, values: list[Any], n: int) -> np.ndarray:
        import pandas as pd

        if not self._has_obs(s, column):
            return np.zeros(n, dtype=bool)
        labels = self._labels(s, column)
        found = np.isin(labels, [v for v in values if not pd.isna(v)])
        if any(pd.isna(v) for v in values):
            found |= pd.isna(labels)
        return found

    def _column(self, s: int, key: str) -> tuple[np.ndarray, pd.Index]:
        """Return file ``s``'s column ``key`` whole, read once: codes and categories.

        The codes in the smallest integer type that holds them; filters, merged labels,
        categories and batches share what is read.
        """
        column = self._columns.get((s, key))
        if column is None:
            codes, categories = self._stores[s].codes(f"obs/{key}")
            small = np.min_scalar_type(-max(len(categories), 1))
            column = self._columns[s, key] = (codes.astype(small), categories)
        return column

    def _labels(self, s: int, key: str) -> np.ndarray:
        """Return the column's values in file ``s`` (every row), missing ones as NaN."""
        return _as_labels(*self._column(s, key))

    def _join(self, join: str | None) -> None:
        self.join_vars = join
        self.var_indices: list[np.ndarray] | None = None
        self.var_joint: pd.Index | None = None
        self.var_list: list[pd.Index] | None = None
        self.n_vars_list: list[int] | None = None
        self.n_vars: int | None = None
        if join is None:
            return
        self._read_vars()
        assert self.var_list is not None  # noqa: S101
        first = self.var_list[0]
        if all(v.equals(first) for v in self.var_list[1:]):
            self.join_vars, self.var_joint = None, first
        elif join == "inner":
            self.var_joint = reduce(lambda a, b: a.intersection(b), self.var_list)
            if len(self.var_joint) == 0:
                msg = "the files share no variables: use join='outer'"
                raise InvalidArgumentError(msg)
            self.var_indices = [v.get_indexer(self.var_joint) for v in self.var_list]
        else:
            self.var_joint = reduce(lambda a, b: a.union(b), self.var_list)
            self.var_indices = [self.var_joint.get_indexer(v) for v in self.var_list]
        self.n_vars = len(self.var_joint)

    def _read_vars(self) -> None:
        if self.var_list is None:
            self.var_list = [store.axis_names("var") for store in self._stores]
            self.n_vars_list = [len(v) for v in self.var_list]

    def _encoders(self) -> None:
        if self.obs_keys is None:
            return
        self.encoders: dict[str, dict[Any, int]] = {}
        for key in self.encode_labels:
            categories = self.get_merged_categories(key)
            unknown = (self.unknown_label.get(key) if isinstance(self.unknown_label, dict)
                       else self.unknown_label)
            encoder: dict[Any, int] = {}
            if unknown is not None and unknown in categories:
                categories.remove(unknown)
                encoder[unknown] = -1
            encoder.update((c, i) for i, c in enumerate(categories))
            self.encoders[key] = encoder

    # -- the dataset --------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n_obs

    @property
    def shape(self) -> tuple[int, int | None]:
        """``(n_obs, n_vars)``; ``n_vars`` is ``None`` without a join."""
        return self.n_obs, self.n_vars

    @property
    def original_shapes(self) -> list[tuple[int, int | None]]:
        """Each file's ``(n_obs after obs_filter, n_vars)``."""
        n_vars: list[int | None] = ([*self.n_vars_list] if self.n_vars_list is not None
                                    else [None] * len(self._stores))
        return list(zip(self.n_obs_list, n_vars, strict=True))

    @property
    def storages(self) -> list[Any]:
        """Each file's open root group (``h5py.File`` or ``zarr.Group``) in this process."""
        return [store.group for store in self._stores]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, int | np.integer):
            return self.__getitems__([int(idx)])[0]
        return self.__getitems__(idx).stacked()

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Read items ``indices`` at once: each file's rows in one planned read."""
        if self._closed:
            msg = "the MappedCollection is closed"
            raise InvalidArgumentError(msg)
        at = np.asarray(indices, dtype=np.int64).reshape(-1)
        if at.size and (int(at.max()) >= self.n_obs or int(at.min()) < -self.n_obs):
            msg = f"index out of range for a MappedCollection of {self.n_obs} items"
            raise IndexOutOfRangeError(msg)
        at = at % max(self.n_obs, 1)
        return Batch(self, self.storage_idx[at], self.indices[at])

    # -- what a batch reads ------------------------------------------------------------

    def _layer_key(self, s: int, key: str) -> str | None:
        """Where layer ``key`` lies in file ``s`` (``None``: it has none)."""
        store = self._stores[s]
        if key == "X":
            return "X"
        if key == "raw.X":
            where = store.raw_prefix("")
            return f"{where}X" if where is not None else None
        return f"layers/{key}" if store.has(f"layers/{key}") else None

    def _read_layer(self, s: int, key: str, rows: np.ndarray) -> tuple[Any, int] | None:
        """Rows of layer ``key`` of file ``s``, joined: ``(block, width)`` or ``None``."""
        where = self._layer_key(s, key)
        if where is None:
            return None
        store = self._stores[s]
        joined = key != "raw.X" and self.join_vars is not None
        if joined and self.join_vars == "inner":
            assert self.var_indices is not None  # noqa: S101
            return store.read(where, rows, self.var_indices[s]), int(self.n_vars or 0)
        block = store.read(where, rows)
        if joined and self.join_vars == "outer":
            assert self.var_indices is not None  # noqa: S101
            assert self.n_vars is not None  # noqa: S101
            return _scatter(block, self.var_indices[s], self.n_vars), self.n_vars
        return block, int(block.shape[1])

    def _read_obsm(self, s: int, key: str, rows: np.ndarray) -> tuple[Any, int] | None:
        store = self._stores[s]
        if not store.has(f"obsm/{key}"):
            return None
        block = store.read(f"obsm/{key}", rows)
        return block, int(np.prod(block.shape[1:], dtype=np.int64))

    def _read_labels(self, s: int, key: str, rows: np.ndarray) -> np.ndarray | None:
        """Labels of ``rows`` (encoded codes where encoded; NaN where missing)."""
        if not self._has_obs(s, key):
            return None
        all_codes, categories = self._column(s, key)  # a batch's rows: a lookup, not a read
        codes = all_codes[rows].astype(np.int64)
        encoder = getattr(self, "encoders", {}).get(key)
        if encoder is None:
            return _as_labels(codes, categories)
        # the file's categories through the encoder, once: then a lookup a row
        lookup = self._lookups.get((s, key))
        if lookup is None:
            lookup = np.array([encoder[c] for c in categories.tolist()], dtype=np.int64)
            self._lookups[s, key] = lookup
        return _as_labels(codes, lookup)

    def _fill(self, key: str) -> Any:
        """Return the value ``fill_missing`` gives an obs key a file lacks.

        An encoded key's is -1, the code of ``unknown_label`` (or of none); others NaN.
        """
        return -1 if key in getattr(self, "encoders", {}) else np.nan

    # -- labels and categories ----------------------------------------------------------

    def get_merged_labels(self, label_key: str) -> np.ndarray:
        """Return the labels of ``label_key`` of every item, in order (files lacking it skipped)."""
        parts = [self._labels(s, label_key)[self.indices_list[s]]
                 for s in range(len(self._stores)) if self._has_obs(s, label_key)]
        if not parts:
            msg = f"obs key {label_key!r} is in none of the files"
            raise NameNotFoundError(msg)
        return np.concatenate(parts)

    def get_merged_categories(self, label_key: str) -> list[Any]:
        """Return the sorted union of ``label_key``'s categories over the files."""
        found: set[Any] = set()
        for s in range(len(self._stores)):
            if self._has_obs(s, label_key):
                found.update(self._column(s, label_key)[1].tolist())
        return sorted(found)

    def get_label_weights(self, obs_keys: str | list[str], scaler: float | None = None,
                          return_categories: bool = False  # noqa: FBT001, FBT002
                          ) -> np.ndarray | dict[str, float]:
        """Inverse-frequency weight of each item's label (labels of several keys joined).

        ``1 / count``, or ``scaler / (count + scaler)`` with a ``scaler``; with
        ``return_categories`` the weight of each label instead. For
        ``torch.utils.data.WeightedRandomSampler``.
        """
        keys = _listed(obs_keys) or []
        labels_list = [self.get_merged_labels(k).astype(str).astype(object) for k in keys]
        labels = (labels_list[0] if len(labels_list) == 1 else
                  np.array(["__".join(parts) for parts in zip(*labels_list, strict=False)],
                           dtype=object))
        counter = Counter(labels.tolist())
        if return_categories:
            return {k: (1.0 / v if scaler is None else scaler / (v + scaler))
                    for k, v in counter.items()}
        counts = np.array([counter[label] for label in labels.tolist()], dtype=np.float64)
        return 1.0 / counts if scaler is None else scaler / (counts + scaler)

    def check_vars_sorted(self, ascending: bool = True) -> bool:  # noqa: FBT001, FBT002
        """Whether every file's variables are sorted."""
        self._read_vars()
        assert self.var_list is not None  # noqa: S101
        return all(v.is_monotonic_increasing if ascending else v.is_monotonic_decreasing
                   for v in self.var_list)

    def check_vars_non_aligned(self, vars: Any) -> list[int]:  # noqa: A002 (lamindb's name)
        """Return the positions of the files whose variables are not exactly ``vars``."""
        import pandas as pd

        self._read_vars()
        assert self.var_list is not None  # noqa: S101
        wanted = pd.Index(vars)
        return [i for i, v in enumerate(self.var_list) if not v.equals(wanted)]

    @staticmethod
    def torch_worker_init_fn(worker_id: int) -> None:  # noqa: ARG004
        """Kept for lamindb's code: workers open their own files without it."""

    # -- closing ------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Pickle small (for DataLoader workers): whole label columns are read again there."""
        state = self.__dict__.copy()
        state["_columns"] = {}
        return state

    def close(self) -> None:
        """Close every file this process opened."""
        for store in getattr(self, "_stores", ()):
            store.close()
        self._closed = True

    def __enter__(self) -> MappedCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 (the interpreter may be shutting down)
            pass

    def __repr__(self) -> str:
        return (f"MappedCollection of {len(self.path_list)} files, {self.n_obs} items, "
                f"layers {self.layers_keys}, obs {self.obs_keys}, obsm {self.obsm_keys}")


def _as_labels(codes: np.ndarray, categories: pd.Index | np.ndarray) -> np.ndarray:
    """Return the labels codes stand for (an object array; NaN where a code is -1)."""
    values = np.asarray(categories, dtype=object)
    labels = (values[np.maximum(codes, 0)] if len(values)
              else np.full(len(codes), np.nan, dtype=object))
    labels[codes < 0] = np.nan
    return labels


def _digest(text: str) -> int:
    """Return a stable 63-bit number of ``text`` (the same in every process and run)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _scatter(block: Any, where: np.ndarray, width: int) -> Any:
    """Put a block's columns at positions ``where`` of ``width`` columns (zeros elsewhere)."""
    import scipy.sparse as sp

    if sp.issparse(block):
        csr = block.tocsr()
        return sp.csr_matrix((csr.data, where[csr.indices], csr.indptr),
                             shape=(csr.shape[0], width))
    out = np.zeros((block.shape[0], width), dtype=block.dtype)
    out[:, where] = block
    return out


def fill_rows(out: np.ndarray, parts: list[tuple[np.ndarray, Any]],
              present: np.ndarray) -> None:
    """Write rows given per file as (positions, block) into ``out``; NaN rows where absent.

    A sparse block's values go straight to their places (no dense copy of the block).
    """
    if len(parts) == 1 and hasattr(parts[0][1], "tocsr") and len(parts[0][0]) == len(out):
        at, block = parts[0]  # every row from one sparse block: in order, scipy's C loop
        if (block.dtype == out.dtype and np.array_equal(at, np.arange(len(out)))
                and (out.flags.c_contiguous or out.flags.f_contiguous)):
            _canonical(block).toarray(out=out)  # (zeroes out first)
            return
    out.fill(0)
    out[~present] = np.nan
    for at, block in parts:
        if hasattr(block, "tocsr"):
            csr = _canonical(block)
            out[np.repeat(at, np.diff(csr.indptr)), csr.indices] = csr.data
        else:
            out[at] = np.asarray(block).reshape(len(at), -1)


def _canonical(block: Any) -> sp.csr_matrix:
    """Return a sparse block as CSR with no repeated entries (they add up, as in toarray)."""
    csr = block.tocsr()
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return csr


class Batch(Sequence[dict[str, Any]]):
    """The items of one batch, read together: a sequence of item dicts, made on demand.

    torch's default collate takes it as the list ``[ds[i] for i in indices]``;
    :func:`lamin_io.loaders.collate` stacks it without making a dict a row
    (:meth:`stacked`, :meth:`dense`, :meth:`csr`).
    """

    def __init__(self, owner: MappedCollection, store_idx: np.ndarray,
                 rows: np.ndarray) -> None:
        self.store_idx = store_idx
        self._keys: list[tuple[str, str]] = (
            [("layer", k) for k in owner.layers_keys]
            + [("obsm", k) for k in owner.obsm_keys or ()]
            + [("obs", k) for k in owner.obs_keys or ()])
        self._fill = owner.fill_missing
        self._n_vars = owner.n_vars  # (a layer's width where no row of the batch has it)
        self._dtype = owner._dtype  # noqa: SLF001
        n = len(rows)
        # per key: [(positions in the batch, block)], and which rows have the key
        self._parts: dict[tuple[str, str], list[tuple[np.ndarray, Any]]] = {
            k: [] for k in self._keys}
        self._widths: dict[tuple[str, str], set[int]] = {k: set() for k in self._keys}
        self._present = {k: np.zeros(n, dtype=bool) for k in self._keys}
        # per key, each row's part and its position in the part's block
        self._part_of = {k: np.full(n, -1, dtype=np.int64) for k in self._keys}
        self._offset = {k: np.zeros(n, dtype=np.int64) for k in self._keys}
        self._fills = {k: owner._fill(k[1]) for k in self._keys if k[0] == "obs"}  # noqa: SLF001
        self._dense: dict[tuple[str, str], np.ndarray] = {}
        self._items: list[dict[str, Any] | None] = [None] * n
        for s in np.unique(store_idx).tolist():
            at = np.flatnonzero(store_idx == s)
            these = rows[at]
            for kind, key in self._keys:
                if kind == "layer":
                    got = owner._read_layer(s, key, these)  # noqa: SLF001
                elif kind == "obsm":
                    got = owner._read_obsm(s, key, these)  # noqa: SLF001
                else:
                    labels = owner._read_labels(s, key, these)  # noqa: SLF001
                    got = None if labels is None else (labels, 1)
                if got is None:
                    continue
                block, width = got
                k = (kind, key)
                self._part_of[k][at] = len(self._parts[k])
                self._offset[k][at] = np.arange(len(at))
                self._parts[k].append((at, block))
                self._widths[k].add(width)
                self._present[k][at] = True

    def __len__(self) -> int:
        return len(self.store_idx)

    def select(self, rows: np.ndarray) -> Batch:
        """Return the batch of these rows of this one (positions, in their order).

        No file is read again: a block loader reads a fetch of many batches once and hands
        out batches selected from it.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = object.__new__(Batch)
        out.__dict__.update(self.__dict__)  # (what all rows share; the rest is made below)
        out.store_idx = self.store_idx[rows]
        out._dense, out._items = {}, [None] * len(rows)
        out._parts, out._present, out._part_of, out._offset = {}, {}, {}, {}
        for k in self._keys:
            part_of, offset = self._part_of[k][rows], self._offset[k][rows]
            out._present[k] = self._present[k][rows]
            out._part_of[k] = np.full(len(rows), -1, dtype=np.int64)
            out._offset[k] = np.zeros(len(rows), dtype=np.int64)
            out._parts[k] = []
            for p, (_, block) in enumerate(self._parts[k]):
                at = np.flatnonzero(part_of == p)
                if len(at) == 0:
                    continue
                out._part_of[k][at] = len(out._parts[k])
                out._offset[k][at] = np.arange(len(at))
                out._parts[k].append((at, block[offset[at]]))
        return out

    def merged(self) -> Batch:
        """Return this batch with each key's blocks (one a file) joined into one block.

        Where many batches are selected from one read (a block loader's fetch), each then
        slices one block a key, and a dense batch is filled from one matrix.
        Blocks of mixed kinds (sparse and dense) or widths stay apart.
        """
        import scipy.sparse as sp

        out = object.__new__(Batch)
        out.__dict__.update(self.__dict__)
        out._parts, out._part_of, out._offset = dict(self._parts), {}, {}
        out._dense, out._items = {}, [None] * len(self)
        for k in self._keys:
            parts = self._parts[k]
            blocks = [b for _, b in parts]
            kinds = {sp.issparse(b) for b in blocks}
            if len(parts) < 2 or len(kinds) > 1 or len(self._widths[k]) > 1:
                out._part_of[k], out._offset[k] = self._part_of[k], self._offset[k]
                continue
            at = np.concatenate([a for a, _ in parts])
            out._parts[k] = [(at, sp.vstack([b.tocsr() for b in blocks], format="csr")
                              if kinds == {True} else np.concatenate(blocks))]
            out._part_of[k] = np.where(self._present[k], 0, -1)
            out._offset[k] = np.zeros(len(self), dtype=np.int64)
            out._offset[k][at] = np.arange(len(at))
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def keys(self) -> list[str]:
        """Return the item keys, in lamindb's order."""
        return ["_store_idx", *(self._name(kind, k) for kind, k in self._keys)]

    def is_label(self, key: str) -> bool:
        """Whether ``key`` is an obs key (else a layer or ``obsm_<key>``)."""
        return self._lookup(key)[0] == "obs"

    def is_layer(self, key: str) -> bool:
        """Whether ``key`` is a layer (``"X"``, ``"raw.X"``, a layer's name)."""
        return self._lookup(key)[0] == "layer"

    def require(self, key: str) -> None:
        """Raise :class:`NameNotFoundError` if some rows lack ``key`` and none are filled."""
        self._require(self._lookup(key))

    def _name(self, kind: str, key: str) -> str:
        return f"obsm_{key}" if kind == "obsm" else key

    def dense_layout(self, key: str) -> tuple[tuple[int, int], np.dtype[Any]]:
        """Return the shape and dtype :meth:`dense` gives for ``key``."""
        k = self._lookup(key)
        if len(self._widths[k]) > 1:
            msg = (f"{key!r} has {sorted(self._widths[k])} columns in the files of this "
                   f"batch: rows of different widths do not stack (join them, or read "
                   f"one file at a time)")
            raise InvalidArgumentError(msg)
        width = next(iter(self._widths[k]), self._n_vars if k[0] == "layer" and
                     k[1] != "raw.X" and self._n_vars is not None else 0)  # (raw: unjoined)
        parts = self._parts[k]
        dtype = (self._dtype if self._dtype is not None else
                 np.result_type(*(b.dtype for _, b in parts)) if parts else np.float32)
        if not self._present[k].all():
            dtype = np.result_type(dtype, np.float32)
        return (len(self), width), np.dtype(dtype)

    def dense(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """Return a layer's or ``obsm_<key>``'s rows as one dense array (NaN where missing).

        ``out`` (of :meth:`dense_layout`'s shape and dtype) is filled instead of a new
        array: a DataLoader worker passes shared memory, so the batch crosses to the main
        process without another copy.
        """
        k = self._lookup(key)
        if out is None and k in self._dense:
            return self._dense[k]
        shape, dtype = self.dense_layout(key)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype:
            msg = f"out is {out.dtype} {out.shape}; {key!r} needs {dtype} {shape}"
            raise InvalidArgumentError(msg)
        fill_rows(out, self._parts[k], self._present[k])
        self._dense[k] = out
        return out

    def csr(self, key: str) -> sp.csr_matrix:
        """Return a layer's rows as one CSR matrix (every row must have the layer)."""
        import scipy.sparse as sp

        k = self._lookup(key)
        self._require(k)
        if not self._present[k].all():  # (fill_missing: NaN rows, which CSR cannot hold)
            msg = (f"{key!r} is missing from some files of this batch: their rows have no "
                   f"sparse form; use dense batches (NaN rows there) or leave those files out")
            raise NameNotFoundError(msg)
        order = np.concatenate([at for at, _ in self._parts[k]])
        blocks = [sp.csr_matrix(b) for _, b in self._parts[k]]
        stacked = sp.vstack(blocks, format="csr")
        out = stacked[np.argsort(order, kind="stable")]
        if self._dtype is not None:
            out = out.astype(self._dtype)
        return out

    def labels(self, key: str) -> np.ndarray:
        """Return an obs key's values of every row (encoded codes where encoded).

        Rows of a file without the key hold its ``fill_missing`` value (``None`` without).
        """
        k = self._lookup(key)
        if k not in self._dense:
            out = np.empty(len(self), dtype=object)
            out[:] = self._fills[k] if self._fill else None
            for at, block in self._parts[k]:
                out[at] = block
            self._dense[k] = out
        return self._dense[k]

    def _lookup(self, key: str) -> tuple[str, str]:
        for kind, k in self._keys:
            if self._name(kind, k) == key:
                return kind, k
        msg = f"this batch has no key {key!r}; keys: {self.keys()}"
        raise NameNotFoundError(msg)

    def _require(self, k: tuple[str, str]) -> None:
        if not (self._fill or self._present[k].all()):
            msg = (f"{self._name(*k)!r} is missing from some files of this batch: pass "
                   f"fill_missing=True to fill it, or leave the key out")
            raise NameNotFoundError(msg)

    def _row(self, k: tuple[str, str], i: int) -> np.ndarray:
        """Row ``i`` of a layer or ``obsm`` key (its own width where files differ)."""
        if len(self._widths[k]) <= 1 or not self._present[k][i]:
            return self.dense(self._name(*k))[i]
        _, block = self._parts[k][int(self._part_of[k][i])]
        row = block[int(self._offset[k][i])]
        row = np.asarray(row.toarray() if hasattr(row, "toarray") else row).reshape(
            block.shape[1:])
        return row.astype(self._dtype, copy=False) if self._dtype is not None else row

    def stacked(self) -> dict[str, Any]:
        """Return the batch as one dict of stacked arrays, as collating its items gives."""
        out: dict[str, Any] = {"_store_idx": self.store_idx.astype(np.int64)}
        for kind, key in self._keys:
            k = (kind, key)
            self._require(k)
            name = self._name(kind, key)
            if kind == "obs":
                values = self.labels(name)
                try:
                    out[name] = np.asarray(values.tolist())
                except ValueError:
                    out[name] = values
            else:
                out[name] = self.dense(name)
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(i, int | np.integer):
            msg = "a Batch is indexed by position"
            raise InvalidArgumentError(msg)
        if not -len(self) <= int(i) < len(self):
            msg = f"a batch of {len(self)} items has no item {int(i)}"
            raise IndexOutOfRangeError(msg)
        i = int(i) % len(self)
        item = self._items[i]
        if item is None:
            item = {"_store_idx": np.int64(self.store_idx[i])}
            for kind, key in self._keys:
                k = (kind, key)
                if not (self._present[k][i] or self._fill):
                    continue
                name = self._name(kind, key)
                item[name] = (self.labels(name)[i] if kind == "obs" else self._row(k, i))
            self._items[i] = item
        return item

