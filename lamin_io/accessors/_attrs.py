"""What an AnnData element's attributes say: its kind, its encoding, a sparse mark.

Shared by the element readers (:mod:`lamin_io.accessors._elements`), the old layouts
(:mod:`lamin_io.accessors._legacy`) and the accessors, for HDF5 (h5py) and zarr alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SPARSE_ENCODINGS", "attr", "encoding", "is_group", "is_marked_sparse"]

#: ``encoding-type`` of a sparse matrix group, and its format.
SPARSE_ENCODINGS = {"csr_matrix": "csr", "csc_matrix": "csc"}


def attr(elem: Any, name: str, default: Any = None) -> Any:
    """Return an attribute as a plain Python value (bytes decoded)."""
    value = elem.attrs.get(name, default)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    return value


def encoding(elem: Any) -> str:
    """Return the ``encoding-type`` of an element, ``""`` when it has none (old layouts)."""
    return str(attr(elem, "encoding-type", "") or "")


def is_group(elem: Any) -> bool:
    """Whether ``elem`` is a group (h5py or zarr), as opposed to an array."""
    return hasattr(elem, "keys") and not hasattr(elem, "dtype")


def is_marked_sparse(elem: Any) -> bool:
    """Whether ``elem`` is a group its attributes mark as a sparse matrix.

    Marked by a sparse ``encoding-type`` or, before anndata 0.7, by ``h5sparse_format``;
    a group marked by nothing is not (see :func:`lamin_io.accessors._legacy.is_bare_sparse`).
    """
    return is_group(elem) and (encoding(elem) in SPARSE_ENCODINGS
                               or attr(elem, "h5sparse_format") is not None)
