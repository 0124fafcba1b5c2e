"""Old AnnData layouts, read the way the installed anndata's readers read them.

What anndata still accepts, beside today's encodings (anndata's ``_io/h5ad.py``,
``_io/zarr.py`` and the compatibility steps of ``AnnData.__init__`` are the reference):

- **before 0.7**: ``obs``, ``var`` and ``raw.var`` are structured arrays whose first field
  is the index; a categorical column holds codes, its categories lie in
  ``uns["<column>_categories"]``; ``obsm``/``varm`` (and ``raw.varm``) may be one structured
  array with a field per key; ``raw`` lies at the top level (``raw.X``, ``raw.var``,
  ``raw.varm``); sparse matrices are groups marked by ``h5sparse_format``.
- neighbour graphs kept in ``uns["neighbors"]`` (``distances``, ``connectivities``), which
  AnnData moves to ``obsp``;
- ``uns["obs_keys_multicol"]`` (and its ``smp``/``var`` kin): the columns of ``obs`` whose
  names start with each listed key form one ``obsm`` matrix;
- a sparse group marked by nothing at all (``data``, ``indices``, ``indptr``): anndata
  cannot read one in ``X``/``layers``/``obsm``/``obsp``...; here its shape and format follow
  from the axes it is aligned to (see :func:`bare_sparse_layout`).

0.7-era categories (``__categories`` groups) are read by
:func:`lamin_io.accessors._elements.read_dataframe_columns`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors._attrs import attr, encoding, is_group, is_marked_sparse
from lamin_io.errors import UnsupportedLayoutError

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

__all__ = ["Fixups", "bare_sparse_layout", "decode_records", "find_fixups", "is_bare_sparse",
           "is_graph", "records_frame", "apply_fixups"]

#: ``uns["neighbors"]`` entries AnnData moves to ``obsp`` when they hold a matrix.
GRAPH_KEYS = ("distances", "connectivities")
#: ``uns`` keys listing multicolumn ``obs``/``var`` fields, in the order anndata looks.
MULTICOL_KEYS = {
    "obs": [f"{p}{b}_keys_multicol" for p in ("", "_") for b in ("obs", "smp")],
    "var": [f"{p}var_keys_multicol" for p in ("", "_")],
}
_SPARSE_PARTS = frozenset({"data", "indices", "indptr"})
_CATEGORIES = "_categories"


# -- structured arrays ---------------------------------------------------------------------

def decode_records(records: np.ndarray, stored_dtype: np.dtype) -> np.ndarray:
    """Turn strings in a structured array into ``str`` as anndata's legacy readers do.

    Fixed-width byte fields become unicode; variable-length fields stay objects, decoded
    when HDF5 marks them UTF-8 (``stored_dtype``: the dtype as stored, which carries that
    mark; ASCII-marked ones stay bytes, as anndata leaves them).
    """
    import h5py

    fields: list[tuple[Any, ...]] = []
    for name in records.dtype.names or ():
        dt = records.dtype.fields[name][0]  # type: ignore[index]
        if dt.shape:  # a sub-array field (an obsm matrix) is kept as is
            fields.append((name, dt.base, dt.shape))
        elif dt.kind == "S":
            fields.append((name, f"U{dt.itemsize}"))
        elif dt.kind in "OU":
            fields.append((name, "O"))
        else:
            fields.append((name, dt))
    out = records.astype(fields)
    for name in out.dtype.names or ():
        info = h5py.check_string_dtype(stored_dtype.fields[name][0])  # type: ignore[index]
        if info is not None and info.encoding == "utf-8" and out.dtype[name].kind == "O":
            out[name] = [v.decode() if isinstance(v, bytes) else v for v in out[name]]
    return out


def records_frame(records: np.ndarray, name: str) -> pd.DataFrame:
    """Make a data frame of a structured array whose first field is the index.

    ``records`` are decoded already (:func:`decode_records`); ``name`` is the element's.
    """
    import pandas as pd

    fields = list(records.dtype.names or ())
    if not fields:
        msg = (f"element {name!r} is a structured array without fields, not a data frame: "
               f"read the file with anndata and write it again")
        raise UnsupportedLayoutError(msg)
    return pd.DataFrame(records).set_index(fields[0])


# -- what AnnData fixes on reading ---------------------------------------------------------

@dataclass(frozen=True)
class Fixups:
    """The compatibility steps AnnData applies to one stored AnnData on reading."""

    #: ``obs`` is a structured array (written by anndata < 0.7)
    pre07: bool = False
    #: ``uns`` keys ending in ``_categories`` (pre-0.7 only) and their values as read
    categories: dict[str, Any] = field(default_factory=dict)
    #: per axis: the ``uns`` key listing multicolumn fields and the keys it lists
    multicol: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    #: ``uns["neighbors"]`` entries moved to ``obsp``
    graphs: tuple[str, ...] = ()


def is_graph(elem: Any) -> bool:
    """Whether an ``uns["neighbors"]`` entry holds a matrix (AnnData moves it to obsp)."""
    if is_group(elem):
        return is_marked_sparse(elem)
    return elem.dtype.names is None and len(elem.shape) == 2


def find_fixups(root: Any, prefix: str, read: Callable[[Any], Any]) -> Fixups:
    """Find what AnnData fixes in the AnnData at ``root[prefix]`` (``read``: ``read_elem``)."""
    pre07 = not is_group(root[f"{prefix}obs"])
    uns = root[f"{prefix}uns"] if f"{prefix}uns" in root else None
    if uns is None or not is_group(uns):
        return Fixups(pre07=pre07)
    keys = list(uns.keys())
    categories = {k: read(uns[k]) for k in keys
                  if pre07 and k.endswith(_CATEGORIES) and not is_group(uns[k])}
    multicol: dict[str, tuple[str, list[str]]] = {}
    for axis, names in MULTICOL_KEYS.items():
        found = next((k for k in names if k in keys), None)
        if found is not None:
            multicol[axis] = (found, [str(v) for v in list(read(uns[found]))])
    graphs: tuple[str, ...] = ()
    if "neighbors" in keys and is_group(uns["neighbors"]):
        neighbors = uns["neighbors"]
        graphs = tuple(k for k in GRAPH_KEYS if k in neighbors and is_graph(neighbors[k]))
    return Fixups(pre07=pre07, categories=categories, multicol=multicol, graphs=graphs)


def apply_fixups(frame: pd.DataFrame, axis: str, fixups: Fixups
                 ) -> tuple[pd.DataFrame, dict[str, np.ndarray], set[str]]:
    """Apply AnnData's fixes to the whole ``obs`` or ``var`` frame.

    Returns the frame, the matrices its multicolumn fields form (``obsm``/``varm`` keys),
    and the ``uns`` keys the fixes consumed.
    """
    import pandas as pd

    matrices: dict[str, np.ndarray] = {}
    used: set[str] = set()
    if axis not in fixups.multicol and not fixups.categories:
        return frame, matrices, used
    frame = frame.copy()
    if axis in fixups.multicol:
        uns_key, keys = fixups.multicol[axis]
        used.add(uns_key)
        for key in keys:
            columns = [c for c in frame.columns if str(c).startswith(key)]
            matrices[key] = frame[columns].to_numpy()
            frame = frame.drop(columns=columns)
    for uns_key, categories in fixups.categories.items():
        column = uns_key.replace(_CATEGORIES, "")
        if column not in frame.columns:
            continue
        cats = [categories] if isinstance(categories, str | int) else categories
        codes = frame[column].to_numpy()
        if codes.dtype.kind not in "iu" or not np.all(codes < len(cats)):
            continue  # the categories of a column of the other axis
        frame[column] = pd.Categorical.from_codes(codes, cats)
        used.add(uns_key)
    return frame, matrices, used


# -- sparse groups marked by nothing -------------------------------------------------------

def is_bare_sparse(elem: Any) -> bool:
    """Tell a group holding exactly ``data``, ``indices``, ``indptr`` and no marks at all."""
    return (is_group(elem) and not encoding(elem)
            and attr(elem, "h5sparse_format") is None and set(elem.keys()) == _SPARSE_PARTS
            and all(not is_group(elem[k]) and len(elem[k].shape) == 1 for k in _SPARSE_PARTS))


def bare_sparse_layout(name: str, n_indptr: int, expected: tuple[int | None, int | None] | None
                       ) -> tuple[str, tuple[int, int]]:
    """Format and shape of a sparse group marked by nothing, from the axes it is aligned to.

    ``expected`` is ``(rows, columns)`` of the element (``None`` where the file does not
    say, e.g. the columns of an ``obsm`` entry). An index pointer one longer than the rows
    means CSR (also when rows and columns are equal: CSR is what AnnData writes for
    ``obsp``); one longer than the columns alone means CSC.
    """
    rows, cols = expected if expected is not None else (None, None)
    if rows is not None and cols is not None:
        if n_indptr == rows + 1:
            return "csr", (rows, cols)
        if n_indptr == cols + 1:
            return "csc", (rows, cols)
    what = "its shape is not stored" if expected is None or cols is None else (
        f"its index pointer ({n_indptr} entries) fits neither {rows} rows nor {cols} columns")
    msg = (f"element {name!r} is a sparse group without encoding attributes and {what}: "
           f"add attributes encoding-type ('csr_matrix' or 'csc_matrix') and shape to it, "
           f"or read the file with anndata and write it again")
    raise UnsupportedLayoutError(msg)
