"""Index normalization: every key AnnData accepts, turned into positions on one axis.

An axis selection is either a ``slice`` with a positive step (cheap, contiguous) or an
``int64`` array of positions (any order, repeats allowed). Selections compose, so chained
subsets (``a[mask][:, genes][10:20]``) resolve to positions in the file.

Keys follow AnnData: an int, a name, a slice of positions or of names (a name ``stop`` is
included, by adding one to its position, so ``"c7":"c3":-1`` stops before ``"c3"`` as in
AnnData), a boolean mask (also a pandas Series, or a ``(n, 1)`` column), a list or array of
positions or of names, ``...`` for a whole axis. Everything else raises a typed error from
:mod:`lamin_io.errors`: :class:`InvalidArgumentError` for a key of the wrong kind (``None``,
a float, a zero slice step, a 2-D array, names and positions mixed, names on a non-unique
index), :class:`IndexOutOfRangeError` for a position outside the axis or a mask of the wrong
length, :class:`NameNotFoundError` for an unknown name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.errors import IndexOutOfRangeError, InvalidArgumentError, NameNotFoundError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Selection", "compose", "length", "positions", "resolve", "split_key", "to_array"]

Selection = slice | np.ndarray


def split_key(key: Any) -> tuple[Any, Any]:
    """Split ``adata[key]`` into ``(obs_key, var_key)``, as AnnData does.

    One ``Ellipsis`` may stand for "every obs" or "every var" (``adata[..., genes]``); in a
    key of three items it is dropped (``adata[cells, ..., genes]``).

    Parameters
    ----------
    key
        Whatever was passed to ``adata[...]``.

    Returns
    -------
    tuple
        The obs key and the var key (``slice(None)`` when only obs was given).

    Raises
    ------
    InvalidArgumentError
        For ``()``, more than one ``Ellipsis``, or more than two indices.
    """
    if not isinstance(key, tuple):
        return key, slice(None)
    n_ellipsis = sum(k is Ellipsis for k in key)
    if n_ellipsis > 1:
        msg = (f"an index holds at most one Ellipsis ('...'), got {n_ellipsis}: write "
               f"adata[..., var_key] or adata[obs_key, ...]")
        raise InvalidArgumentError(msg)
    if len(key) == 3 and n_ellipsis:
        key = tuple(k for k in key if k is not Ellipsis)
    if len(key) == 1:
        return key[0], slice(None)
    if len(key) == 2:
        return key[0], key[1]
    msg = (f"AnnData takes one or two indices (obs, var), got {len(key)}: write "
           f"adata[obs_key] or adata[obs_key, var_key]")
    raise InvalidArgumentError(msg)


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


_KINDS = "an int, a name, a slice, a boolean mask, or a list/array of positions or names"
_NOUNS = {"obs": "observation", "var": "variable"}


def _noun(axis: str, *, plural: bool = True) -> str:
    noun = _NOUNS.get(axis, f"{axis} entry")
    return f"{noun}s" if plural else noun


def _positions(key: Any, n: int, names: pd.Index, axis: str) -> Selection:
    """Resolve a key against one axis of length ``n`` named by ``names``."""
    if key is Ellipsis:
        return slice(0, n, 1)
    if key is None:
        msg = (f"None cannot index {axis}: use ':' or '...' to select every "
               f"{_noun(axis, plural=False)}")
        raise InvalidArgumentError(msg)
    if isinstance(key, slice):
        return _slice_positions(key, n, names, axis)
    if isinstance(key, bool | np.bool_):
        msg = (f"a single boolean cannot index {axis}: pass a boolean mask with one value "
               f"per {_noun(axis, plural=False)} ({n} values)")
        raise InvalidArgumentError(msg)
    if isinstance(key, str):
        return _names_to_positions(np.array([key], dtype=object), names, axis)
    if isinstance(key, int | np.integer):
        k = int(key)
        if not -n <= k < n:
            msg = (f"{axis} index {k} is out of range for {n} {_noun(axis)}: use a position "
                   f"from {-n} to {n - 1}")
            raise IndexOutOfRangeError(msg)
        return np.array([k % n], dtype=np.int64)
    if isinstance(key, np.ndarray) and key.ndim == 0 and key.dtype.kind != "O":
        return _positions(key.item(), n, names, axis)  # a plain scalar: no recursion again
    if isinstance(key, float | np.floating):
        msg = f"{axis} position {key!r} is not an integer: index with int positions or names"
        raise InvalidArgumentError(msg)
    return _array_positions(_as_array(key, n, axis), key, n, names, axis)


def _as_array(key: Any, n: int, axis: str) -> np.ndarray:
    """Turn a list, array, Series or Index into a 1-D numpy array (no values checked)."""
    import pandas as pd

    if isinstance(key, pd.Series | pd.Index):
        key = key.array
    if isinstance(key, pd.api.extensions.ExtensionArray):
        if key.isna().any():
            msg = (f"{axis} index holds missing values (NA): fill or drop them first, "
                   f"e.g. mask.fillna(False)")
            raise InvalidArgumentError(msg)
        key = key.to_numpy()
    try:
        arr = np.asarray(key)
    except (TypeError, ValueError) as exc:  # ragged nesting, unconvertible objects
        msg = f"cannot index {axis} with {type(key).__name__} ({exc}); use {_KINDS}"
        raise InvalidArgumentError(msg) from None
    if arr.ndim == 2 and arr.shape in ((n, 1), (1, n)):  # a column or row mask, as AnnData
        arr = arr.ravel()
    if arr.ndim == 0:
        msg = f"cannot index {axis} with a {type(key).__name__}; use {_KINDS}"
        raise InvalidArgumentError(msg)
    if arr.ndim != 1:
        msg = (f"{axis} index must be one-dimensional, got shape {arr.shape}: pass a 1-D "
               f"boolean mask of length {n} or a 1-D array of positions or names "
               f"(select obs and var separately: adata[obs_key, var_key])")
        raise InvalidArgumentError(msg)
    return arr


def _value_kind(arr: np.ndarray, key: Any, axis: str) -> tuple[np.ndarray, str]:
    """Return ``arr`` and the numpy kind of its values, looking inside object arrays.

    numpy turns ``[1, "c3"]`` into strings, ``[True, 2]`` into integers and ``[1, None]``
    into objects, so lists and object arrays are classified by what they hold; a mix of
    kinds is an error.
    """
    from pandas.api.types import infer_dtype

    kind = arr.dtype.kind
    if not (kind == "O" or isinstance(key, list | tuple)):
        return arr, kind
    inferred = infer_dtype(arr if kind == "O" else key, skipna=False)
    if inferred == "string":
        return arr.astype(object), "O"
    if inferred in ("integer", "empty"):
        return arr.astype(np.int64), "i"
    if inferred == "boolean":
        return arr.astype(bool), "b"
    if inferred in ("floating", "mixed-integer-float", "decimal"):
        return arr, "f"
    values = list(key) if isinstance(key, list | tuple) else arr  # as given, not as numpy's
    shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    msg = (f"{axis} index must hold only integer positions, only {axis} names (str) or only "
           f"booleans, got {inferred} values ({shown})")
    raise InvalidArgumentError(msg)


def _array_positions(arr: np.ndarray, key: Any, n: int, names: pd.Index,
                     axis: str) -> np.ndarray:
    """Positions selected by a 1-D array of booleans, integers or names."""
    arr, kind = _value_kind(arr, key, axis)
    if kind == "b":
        if len(arr) != n:
            msg = (f"boolean {axis} mask has length {len(arr)}, but the selection has {n} "
                   f"{_noun(axis)}: pass one value per {_noun(axis, plural=False)} of this "
                   f"selection")
            raise IndexOutOfRangeError(msg)
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:  # [] is float64 to numpy
        return np.empty(0, dtype=np.int64)
    if kind in "iu":
        out = arr.astype(np.int64, copy=True)
        bad = (out < -n) | (out >= n)
        if bad.any():
            msg = (f"{axis} index {out[bad][0]} is out of range for {n} {_noun(axis)}: use "
                   f"positions from {-n} to {n - 1}")
            raise IndexOutOfRangeError(msg)
        out[out < 0] += n
        return out
    if kind == "f":
        msg = (f"{axis} positions must be integers, got floating-point values "
               f"{arr[:3].tolist()}: convert them with .astype(int), or pass a boolean mask")
        raise InvalidArgumentError(msg)
    if kind in "USO":
        return _names_to_positions(arr.astype(object), names, axis)
    msg = f"cannot index {axis} with an array of dtype {arr.dtype}; use {_KINDS}"
    raise InvalidArgumentError(msg)


def _slice_positions(key: slice, n: int, names: pd.Index, axis: str) -> Selection:
    """Resolve a slice of positions or names (a name ``stop`` is included, as in AnnData)."""
    for part, value in (("start", key.start), ("stop", key.stop), ("step", key.step)):
        named = part != "step" and isinstance(value, str)
        integral = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
        if not (value is None or integral or named):
            kinds = "an int or None" if part == "step" else "an int, a name or None"
            msg = f"{axis} slice {part} must be {kinds}, got {value!r}"
            raise InvalidArgumentError(msg)
    step = 1 if key.step is None else int(key.step)
    if step == 0:
        msg = (f"{axis} slice step cannot be zero: use a positive step, or a negative one to "
               f"go backwards")
        raise InvalidArgumentError(msg)
    start, stop = key.start, key.stop
    if isinstance(start, str) or isinstance(stop, str):
        _require_unique(names, axis)
        if isinstance(start, str):
            start = _name_position(start, names, axis, "start")
        if isinstance(stop, str):
            # AnnData's rule: the stop name is included by adding one to its position
            stop = _name_position(stop, names, axis, "stop") + 1
    first, last, step = slice(start, stop, step).indices(n)
    if step < 0:
        return np.arange(first, last, step, dtype=np.int64)
    return slice(first, max(last, first), step)


def _require_unique(names: pd.Index, axis: str) -> None:
    # checked first: pandas raises InvalidIndexError from get_indexer on duplicate labels
    if not names.is_unique:
        msg = (f"{axis} names are not unique; index by position instead (or make them "
               f"unique in the file, e.g. with AnnData.{axis}_names_make_unique())")
        raise InvalidArgumentError(msg)


def _name_position(name: str, names: pd.Index, axis: str, part: str) -> int:
    try:
        return int(names.get_loc(name))
    except KeyError:
        msg = (f"{axis} name {name!r} (slice {part}) not found: check {axis}_names "
               f"(names are case-sensitive)")
        raise NameNotFoundError(msg) from None


def _names_to_positions(arr: np.ndarray, names: pd.Index, axis: str) -> np.ndarray:
    _require_unique(names, axis)
    positions = names.get_indexer(arr)
    if (positions < 0).any():
        missing = arr[positions < 0]
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        msg = (f"{axis} name(s) not found: {shown}{more}: check {axis}_names (names are "
               f"case-sensitive)")
        raise NameNotFoundError(msg)
    return positions.astype(np.int64)


def positions(key: Any, n: int, axis: str) -> Selection:
    """Resolve a key of positions (no names) on an axis of length ``n``.

    An int, a slice, a boolean mask or a list/array of positions, as :func:`resolve`
    takes them; a name raises :class:`NameNotFoundError`.
    """
    import pandas as pd

    return _positions(key, n, pd.Index([]), axis)


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
