"""Reading AnnData's on-disk elements from HDF5 (h5py) and zarr groups.

Modern elements carry an ``encoding-type`` attribute and are read with anndata's public
``anndata.io.read_elem``, which also reads elements stored without one as anndata does. The
layouts of old files that need more than that (structured-array data frames, sparse groups
marked by ``h5sparse_format`` or by nothing) are described in
:mod:`lamin_io.accessors._legacy`; 0.7-era categories (``__categories``) are read here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors import _legacy
from lamin_io.accessors._attrs import SPARSE_ENCODINGS, attr, encoding, is_group, is_marked_sparse
from lamin_io.accessors.readpath.sparse import SparseParts
from lamin_io.errors import CorruptArtifactError, UnsupportedLayoutError

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

    #: Reads a string array faster than h5py, or returns ``None`` where it cannot.
    StringReader = Callable[[Any], np.ndarray | None]

__all__ = ["is_sparse", "matrix", "read_dataframe", "read_dataframe_columns", "read_element",
           "read_records", "subset_rows", "trim_colors"]


def is_sparse(elem: Any) -> bool:
    """Whether ``elem`` is a sparse matrix group: encoded, marked ``h5sparse_format``, or bare.

    A bare group (``data``, ``indices``, ``indptr`` and no attributes) counts only where a
    matrix is expected (``X``, layers, ``obsm``, ...): in ``uns`` it is a mapping.
    """
    return is_marked_sparse(elem) or _legacy.is_bare_sparse(elem)


def matrix(elem: Any, read_whole: Callable[[Any], np.ndarray | None] | None = None, *,
           expected: tuple[int | None, int | None] | None = None) -> Any:
    """Return a dense on-disk array as is, or a sparse group as :class:`SparseParts`.

    ``read_whole`` may read the ``indptr`` array faster than h5py (``None`` where it cannot).
    ``expected``: the element's ``(rows, columns)`` as its axes say (``None`` where they do
    not), which give the shape of a sparse group stored without one.
    """
    if not is_group(elem):
        if elem.dtype.names is not None:
            msg = (f"element {elem.name!r} is a structured array, not a matrix: read the file "
                   f"with anndata and write it again")
            raise UnsupportedLayoutError(msg)
        return elem
    if not is_sparse(elem):
        msg = (f"element {elem.name!r} is not a matrix (encoding {encoding(elem)!r}, holding "
               f"{sorted(elem.keys())}): read the file with anndata and write it again")
        raise UnsupportedLayoutError(msg)
    fmt = SPARSE_ENCODINGS.get(encoding(elem)) or attr(elem, "h5sparse_format")
    shape = attr(elem, "shape")
    if shape is None:
        shape = attr(elem, "h5sparse_shape")
    values = read_whole(elem["indptr"]) if read_whole is not None else None
    indptr = np.asarray(elem["indptr"][:] if values is None else values, dtype=np.int64)
    if fmt is None or shape is None:  # marked by nothing: the axes tell
        guessed, guessed_shape = _legacy.bare_sparse_layout(elem.name, len(indptr), expected)
        fmt = fmt or guessed
        shape = shape if shape is not None else guessed_shape
    if fmt not in ("csr", "csc"):
        msg = (f"element {elem.name!r} has sparse format {fmt!r}; lamin-io reads 'csr' and "
               f"'csc': read the file with anndata and write it again")
        raise UnsupportedLayoutError(msg)
    n_major = int(shape[0] if fmt == "csr" else shape[1])
    if len(indptr) != n_major + 1:
        msg = (f"sparse matrix {elem.name} is damaged: indptr has {len(indptr)} entries "
               f"for {n_major} {'rows' if fmt == 'csr' else 'columns'}")
        raise CorruptArtifactError(msg)
    n_stored = int(elem["data"].shape[0])
    if (len(indptr) and (indptr[0] < 0 or indptr[-1] > n_stored)) or np.any(
            np.diff(indptr) < 0) or int(elem["indices"].shape[0]) != n_stored:
        msg = (f"sparse matrix {elem.name} is damaged: its indptr does not rise from 0 to "
               f"at most the {n_stored} stored values, or data and indices differ in length")
        raise CorruptArtifactError(msg)
    return SparseParts(elem["data"], elem["indices"], indptr,
                       (int(shape[0]), int(shape[1])), fmt)


def _hdf5_strings(ds: Any) -> np.ndarray | None:
    """Read a 1-D HDF5 string array as ``object`` strings, ``None`` where not applicable.

    Through NumPy's variable-width string dtype, h5py decodes in C: 50k names read in
    12 ms instead of 19 ms one Python string at a time; the result is the same.
    """
    import h5py

    string_dtype = getattr(np.dtypes, "StringDType", None)
    if (string_dtype is None or not isinstance(ds, h5py.Dataset) or ds.ndim != 1
            or h5py.check_string_dtype(ds.dtype) is None):
        return None
    try:
        values: np.ndarray = ds.astype(string_dtype())[()]
    except (TypeError, ValueError):  # an h5py that cannot read into it
        return None
    return values.astype(object)


def read_element(elem: Any, strings: StringReader | None = None) -> Any:
    """Read a whole element into memory as anndata reads it (``anndata.io.read_elem``).

    ``strings`` may read a string array faster than h5py (``None`` where it cannot).
    """
    from anndata.io import read_elem

    if encoding(elem) == "string-array":
        values = strings(elem) if strings is not None else None
        if values is None:
            values = _hdf5_strings(elem)
        if values is not None:
            return values
    if not encoding(elem) and is_group(elem) and attr(elem, "h5sparse_format") is None:
        return {k: read_element(elem[k], strings) for k in elem}  # anndata's, one by one
    return read_elem(elem)


def read_records(elem: Any) -> np.ndarray:
    """Read a structured array whole, its strings decoded as anndata's legacy readers do."""
    return _legacy.decode_records(np.asarray(elem[()]), elem.dtype)


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S":
        return values.astype(str).astype(object)
    if values.dtype.kind == "O":
        return np.array([v.decode() if isinstance(v, bytes) else v for v in values],
                        dtype=object)
    return values


def read_dataframe(elem: Any) -> pd.DataFrame:
    """Read a data frame: encoded, an unencoded group, or an old structured array.

    Categories an old file keeps in ``uns`` are not applied here (see
    :func:`lamin_io.accessors._legacy.apply_fixups`).
    """
    if is_group(elem):
        if encoding(elem) == "dataframe":
            return read_element(elem)
        if not encoding(elem):
            return _legacy_group_dataframe(elem)
        msg = (f"element {elem.name!r} is not a data frame (encoding {encoding(elem)!r}): "
               f"read the file with anndata and write it again")
        raise UnsupportedLayoutError(msg)
    return _legacy.records_frame(read_records(elem), elem.name)


def read_dataframe_columns(group: Any, index: pd.Index,
                           strings: StringReader | None = None) -> pd.DataFrame:
    """Read an encoded data frame's columns (in their stored order) around a known index.

    A column of the 0.7 layout (encoding version 0.1.0) stores codes and names its
    categories in a ``categories`` attribute: an HDF5 object reference, or in zarr the path
    from the frame (``__categories/<column>``).
    """
    import pandas as pd

    order = attr(group, "column-order")
    names = list(order) if order is not None else []
    return pd.DataFrame({n: _read_column(group, n, strings) for n in names},
                        index=index.copy(),
                        columns=pd.Index(names, dtype=object))


def _read_column(group: Any, name: str, strings: StringReader | None) -> Any:
    import pandas as pd

    column = group[name]
    values = read_element(column, strings)
    where = None if is_group(column) else column.attrs.get("categories")
    if where is None:
        return values
    categories = group[where] if not isinstance(where, str) else group[where.lstrip("/")]
    return pd.Categorical.from_codes(values, pd.Index(read_element(categories)),
                                     ordered=bool(attr(categories, "ordered", default=False)))


def _legacy_group_dataframe(group: Any) -> pd.DataFrame:
    """Read a data frame group that has no encoding attributes (one array per column)."""
    import pandas as pd

    index_key = attr(group, "_index", "_index")
    index = _decode(np.asarray(group[index_key][()])) if index_key in group else None
    order = attr(group, "column-order")
    names = list(order) if order is not None else [k for k in group if k != index_key]
    data = {n: _decode(np.asarray(group[n][()])) for n in names if not is_group(group[n])}
    return pd.DataFrame(data, index=None if index is None else pd.Index(index.astype(str)))


def subset_rows(value: Any, rows: Any) -> Any:
    """Select rows of an in-memory frame, array or sparse matrix (``None``: all).

    Categorical columns of a subset frame drop unused categories, as AnnData does.
    """
    import pandas as pd

    if rows is None:
        return value
    if isinstance(value, pd.DataFrame):
        out = value.iloc[rows].copy()
        for col in out.columns:
            if isinstance(out[col].dtype, pd.CategoricalDtype):
                out[col] = out[col].cat.remove_unused_categories()
        return out
    return value[rows]


def trim_colors(uns: dict[str, Any], full: pd.DataFrame, subset: pd.DataFrame) -> None:
    """Keep ``uns["<col>_colors"]`` in step with categories dropped from a subset."""
    import pandas as pd

    for col in subset.columns:
        key = f"{col}_colors"
        if key not in uns or not isinstance(subset[col].dtype, pd.CategoricalDtype):
            continue
        before = list(full[col].cat.categories)
        colors = uns[key]
        if len(colors) != len(before):
            continue
        kept = np.isin(np.asarray(before, dtype=object), list(subset[col].cat.categories))
        uns[key] = np.asarray(colors)[kept]
