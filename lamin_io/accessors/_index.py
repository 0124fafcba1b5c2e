"""Index normalization: every key AnnData accepts, turned into positions on one axis.

An axis selection is either a ``slice`` with a positive step (cheap, contiguous) or an
``int64`` array of positions (any order, repeats allowed). Selections compose, so chained
subsets (``a[mask][:, genes][10:20]``) resolve to positions in the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.errors import IndexOutOfRangeError, InvalidArgumentError, NameNotFoundError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Selection", "compose", "length", "resolve", "split_key", "to_array"]

Selection = slice | np.ndarray


def split_key(key: Any) -> tuple[Any, Any]:
    """Split ``adata[key]`` into ``(obs_key, var_key)``."""
    if isinstance(key, tuple):
        if len(key) == 1:
            return key[0], slice(None)
        if len(key) == 2:
            return key
        msg = f"AnnData takes at most two indices (obs, var), got {len(key)}"
        raise InvalidArgumentError(msg)
    return key, slice(None)


def length(sel: Selection, n: int) -> int:
    """Return how many positions ``sel`` selects on an axis of length ``n``."""
    if isinstance(sel, slice):
        return len(range(*sel.indices(n)))
    return len(sel)


def to_array(sel: Selection, n: int) -> np.ndarray:
    """Positions of ``sel`` as an ``int64`` array."""
    if isinstance(sel, slice):
        return np.arange(*sel.indices(n), dtype=np.int64)
    return sel


def _positions(key: Any, n: int, names: pd.Index, axis: str) -> Selection:
    """Resolve a key against one axis of length ``n`` named by ``names``."""
    import pandas as pd

    if key is None or key is Ellipsis:
        return slice(0, n, 1)
    if isinstance(key, slice):
        if key.step is not None and key.step <= 0:
            start, stop, step = key.indices(n)
            return np.arange(start, stop, step, dtype=np.int64)
        if isinstance(key.start, str) or isinstance(key.stop, str):
            start = 0 if key.start is None else names.get_loc(key.start)
            stop = n if key.stop is None else names.get_loc(key.stop) + 1
            return slice(start, stop, key.step or 1)
        start, stop, step = key.indices(n)
        return slice(start, max(stop, start), step)
    if isinstance(key, str):
        return _names_to_positions(np.array([key], dtype=object), names, axis)
    if isinstance(key, int | np.integer):
        k = int(key)
        if not -n <= k < n:
            msg = f"{axis} index {k} is out of range for {n} {axis}s"
            raise IndexOutOfRangeError(msg)
        return np.array([k % n], dtype=np.int64)
    if isinstance(key, pd.Series | pd.Index):
        key = key.to_numpy()
    arr = np.asarray(key)
    if arr.ndim != 1:
        if arr.ndim == 0:
            return _positions(arr.item(), n, names, axis)
        msg = f"{axis} index must be one-dimensional, got shape {arr.shape}"
        raise InvalidArgumentError(msg)
    if arr.dtype == bool:
        if len(arr) != n:
            msg = f"boolean {axis} mask has length {len(arr)}, expected {n}"
            raise IndexOutOfRangeError(msg)
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.int64, copy=True)
        bad = (out < -n) | (out >= n)
        if bad.any():
            msg = f"{axis} index {out[bad][0]} is out of range for {n} {axis}s"
            raise IndexOutOfRangeError(msg)
        out[out < 0] += n
        return out
    if arr.dtype.kind in "USO":
        return _names_to_positions(arr.astype(object), names, axis)
    msg = f"cannot index {axis}s with an array of dtype {arr.dtype}"
    raise InvalidArgumentError(msg)


def _names_to_positions(arr: np.ndarray, names: pd.Index, axis: str) -> np.ndarray:
    positions = names.get_indexer(arr)
    if (positions < 0).any():
        missing = arr[positions < 0]
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        if not names.is_unique:
            msg = f"{axis} names are not unique; index by position instead"
            raise InvalidArgumentError(msg)
        msg = f"{axis} name(s) not found: {shown}{more}"
        raise NameNotFoundError(msg)
    return positions.astype(np.int64)


def resolve(key: Any, current: Selection, n_file: int, names: pd.Index, axis: str) -> Selection:
    """Apply ``key`` (relative to the current subset) and return positions in the file.

    ``names`` are the names of the current subset, ``n_file`` the axis length in the file.
    """
    n_now = length(current, n_file)
    relative = _positions(key, n_now, names, axis)
    return compose(current, relative, n_file)


def compose(outer: Selection, inner: Selection, n_file: int) -> Selection:
    """Return ``inner`` (positions within ``outer``) as positions in the file."""
    if isinstance(outer, slice):
        o_start, _, o_step = outer.indices(n_file)
        if isinstance(inner, slice):
            i_start, i_stop, i_step = inner.start, inner.stop, inner.step or 1
            return slice(o_start + i_start * o_step, o_start + i_stop * o_step,
                         o_step * i_step)
        return o_start + inner * o_step
    return outer[inner]
