"""Index edge cases: ``_index.resolve``/``split_key`` directly and through a real accessor.

Keys AnnData accepts give AnnData's result; everything else is a typed lamin-io error whose
message says what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import lamin_io as ln
from lamin_io import errors
from lamin_io.accessors._index import resolve, split_key

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

N_OBS, N_VARS = 20, 5
OBS_NAMES = pd.Index([f"c{i}" for i in range(N_OBS)])


def _resolve(key: Any, names: pd.Index = OBS_NAMES, axis: str = "obs") -> Any:
    n = len(names)
    return resolve(key, slice(0, n, 1), n, names, axis)


def _positions(sel: Any, n: int = N_OBS) -> list[int]:
    return list(range(n))[sel] if isinstance(sel, slice) else sel.tolist()


# -- split_key --------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "expected"), [
    (3, (3, slice(None))),
    ((3,), (3, slice(None))),
    ((3, "g1"), (3, "g1")),
    ((..., "g1"), (..., "g1")),
    (("c1", ...), ("c1", ...)),
    ((..., 2, "g1"), (2, "g1")),  # AnnData drops the one Ellipsis of a three-item key
    ((2, ..., "g1"), (2, "g1")),
])
def test_split_key(key: Any, expected: tuple[Any, Any]) -> None:
    assert split_key(key) == expected


@pytest.mark.parametrize(("key", "match"), [
    ((), "one or two indices.*got 0"),
    ((1, 2, 3), "one or two indices.*got 3"),
    ((..., ...), "at most one Ellipsis"),
    ((..., 1, ...), "at most one Ellipsis"),
    ((1, 2, 3, ...), "one or two indices.*got 4"),
])
def test_split_key_errors(key: Any, match: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match=match):
        split_key(key)


# -- resolve: keys that work ---------------------------------------------------------------


@pytest.mark.parametrize(("key", "expected"), [
    (slice("c3", "c7"), list(range(3, 8))),  # a name stop is included, as in AnnData
    (slice("c3", None), list(range(3, 20))),
    (slice(None, "c2"), [0, 1, 2]),
    (slice("c3", 8), list(range(3, 8))),  # a position stop is not
    (slice("c7", "c3", -1), [7, 6, 5]),  # AnnData adds one to the stop name, also here
    (slice("c1", "c9", 3), [1, 4, 7]),
    (slice(None, None, -3), list(range(19, -1, -3))),
    (slice(15, 2, -4), [15, 11, 7, 3]),
    (slice(-3, None), [17, 18, 19]),
    (np.int64(4), [4]),
    (np.int32(-1), [19]),
    (np.array(6), [6]),
    (np.array("c8"), [8]),
    (..., list(range(20))),
    ([], []),
    (np.array([], dtype=float), []),
    (np.array([2, 2, -1, 0]), [2, 2, 19, 0]),
    (np.array([2, 5], dtype=np.uint8), [2, 5]),
    (np.array(["c5", "c1"], dtype=object), [5, 1]),
    (("c5", "c1"), [5, 1]),
    (pd.Index(["c4", "c2"]), [4, 2]),
    (pd.Categorical(["c4", "c2"]), [4, 2]),
    (pd.array([3, 1], dtype="Int64"), [3, 1]),
    (pd.Series(np.arange(N_OBS) % 5 == 0), [0, 5, 10, 15]),
    (pd.Series(np.arange(N_OBS) % 5 == 0, dtype="boolean"), [0, 5, 10, 15]),
    ((np.arange(N_OBS) < 2).reshape(-1, 1), [0, 1]),  # a column mask, as AnnData
])
def test_resolve_accepts(key: Any, expected: list[int]) -> None:
    assert _positions(_resolve(key)) == expected


def test_resolve_composes_with_a_subset() -> None:
    names = OBS_NAMES[5:15]
    sel = resolve(slice("c7", "c9"), slice(5, 15, 1), N_OBS, names, "obs")
    assert _positions(sel) == [7, 8, 9]
    sel = resolve(slice(None, None, -4), slice(5, 15, 1), N_OBS, names, "obs")
    assert _positions(sel) == [14, 10, 6]


# -- resolve: keys that fail, each with a typed error ---------------------------------------


@pytest.mark.parametrize(("key", "error", "match"), [
    (slice(None, None, 0), errors.InvalidArgumentError, "slice step cannot be zero"),
    (slice("c1", "c5", 0), errors.InvalidArgumentError, "slice step cannot be zero"),
    (slice("nope", "c3"), errors.NameNotFoundError, "obs name 'nope' \\(slice start\\)"),
    (slice("c3", "nope"), errors.NameNotFoundError, "obs name 'nope' \\(slice stop\\)"),
    (slice(1.5, 4), errors.InvalidArgumentError, "slice start must be an int, a name"),
    (slice(0, 4, "c1"), errors.InvalidArgumentError, "slice step must be an int or None"),
    (slice(0, 4, 1.0), errors.InvalidArgumentError, "slice step must be an int or None"),
    (np.array([1.0, 2.0]), errors.InvalidArgumentError, "must be integers.*astype\\(int\\)"),
    ([0.0, 3], errors.InvalidArgumentError, "must be integers"),
    (1.0, errors.InvalidArgumentError, "not an integer"),
    (np.float32(2), errors.InvalidArgumentError, "not an integer"),
    (np.ones((4, 5), dtype=bool), errors.InvalidArgumentError, "one-dimensional.*\\(4, 5\\)"),
    (np.ones((N_OBS, 2), dtype=bool), errors.InvalidArgumentError, "one-dimensional"),
    (np.ones(3, dtype=bool), errors.IndexOutOfRangeError, "length 3.*20 observations"),
    ([1, "c3"], errors.InvalidArgumentError, "only integer positions, only obs names"),
    (["c3", 1], errors.InvalidArgumentError, "only integer positions, only obs names"),
    (np.array([1, "c3"], dtype=object), errors.InvalidArgumentError, "only integer positions"),
    ([None, "c1"], errors.InvalidArgumentError, "only integer positions"),
    ([True, 2], errors.InvalidArgumentError, "only integer positions"),
    ([[1, 2], [3]], errors.InvalidArgumentError, "cannot index obs with list"),
    ({1, 2}, errors.InvalidArgumentError, "cannot index obs with a set"),
    (None, errors.InvalidArgumentError, "None cannot index obs: use ':' or '...'"),
    (True, errors.InvalidArgumentError, "single boolean"),
    (np.bool_(False), errors.InvalidArgumentError, "single boolean"),
    (20, errors.IndexOutOfRangeError, "out of range for 20 observations: use a position"),
    (-21, errors.IndexOutOfRangeError, "out of range"),
    ([0, 25], errors.IndexOutOfRangeError, "obs index 25 is out of range"),
    ("nope", errors.NameNotFoundError, "obs name\\(s\\) not found: 'nope'"),
    (["c1", "x", "y"], errors.NameNotFoundError, "'x', 'y'"),
    (pd.Series([True, None] * 10, dtype="boolean"), errors.InvalidArgumentError, "missing"),
    (np.array(["2024-01-01"], dtype="datetime64[D]"), errors.InvalidArgumentError,
     "dtype datetime64"),
])
def test_resolve_rejects(key: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        _resolve(key)
    assert isinstance(info.value, errors.LaminIOError)


def test_boolean_mask_of_wrong_length_on_var() -> None:
    var = pd.Index([f"g{i}" for i in range(N_VARS)])
    with pytest.raises(errors.IndexOutOfRangeError, match="boolean var mask has length 20") as e:
        _resolve(np.ones(N_OBS, dtype=bool), var, "var")
    assert isinstance(e.value, IndexError)
    assert "5 variables" in str(e.value)


@pytest.mark.parametrize("key", ["c1", ["c1", "c2"], slice("c1", "c3"), np.array(["c2"])])
def test_names_on_a_non_unique_index(key: Any) -> None:
    names = pd.Index(["c1", "c1", "c2", "c3"])
    with pytest.raises(errors.InvalidArgumentError,
                       match="obs names are not unique; index by position instead"):
        _resolve(key, names)
    assert _positions(_resolve([3, 0], names), 4) == [3, 0]  # positions still work


def test_name_not_found_is_a_keyerror_with_a_readable_message() -> None:
    with pytest.raises(KeyError) as info:
        _resolve(slice("nope", "c3"))
    assert str(info.value).startswith("obs name 'nope'")
    assert "check obs_names" in str(info.value)


# -- through a real accessor, against in-memory AnnData ------------------------------------


def _make_adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    return ad.AnnData(
        rng.random((N_OBS, N_VARS), dtype=np.float32),
        obs=pd.DataFrame({"n": np.arange(N_OBS)}, index=OBS_NAMES.copy()),
        var=pd.DataFrame({"hv": [True, False, True, True, False]},
                         index=[f"g{i}" for i in range(N_VARS)]))


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return _make_adata()


@pytest.fixture
def backed(adata: ad.AnnData, tmp_path: Path) -> Iterator[Any]:
    path = tmp_path / "small.h5ad"
    adata.write_h5ad(path)
    with ln.open(path) as accessor:
        yield accessor


def _same_keys(adata: ad.AnnData) -> dict[str, Any]:
    return {
        "name_slice": slice("c3", "c7"),
        "name_slice_step": slice("c2", "c14", 4),
        "name_slice_reverse": slice("c9", "c2", -2),
        "negative_step": slice(None, None, -1),
        "negative_step_bounds": slice(17, 3, -3),
        "numpy_int": np.int64(7),
        "numpy_int_negative": np.int16(-2),
        "numpy_int_x_numpy_int": (np.int64(2), np.int32(3)),
        "var_bool_series": (slice(None), adata.var["hv"]),
        "var_bool_series_x_names": (["c5", "c0"], adata.var["hv"]),
        "single_var_name": (slice(None), "g3"),
        "ellipsis_var_name": (..., "g1"),
        "obs_ellipsis": ("c4", ...),
        "three_with_ellipsis": (slice(2, 9), ..., [4, 0]),
        "names_list": ["c5", "c1"],
        "obs_names_x_var_name": (("c5", "c1"), "g2"),
        "categorical_names": pd.Categorical(["c6", "c2"]),
        "empty_list": [],
        "column_mask": (np.arange(N_OBS) % 3 == 0).reshape(-1, 1),
    }


KEYS = list(_same_keys(_make_adata()))


@pytest.mark.parametrize("name", KEYS)
def test_accessor_matches_anndata(adata: ad.AnnData, backed: Any, name: str) -> None:
    key = _same_keys(adata)[name]
    expected = adata[key]
    got = backed[key]
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.X, expected.X)
    assert list(got.obs_names) == list(expected.obs_names)
    assert list(got.var_names) == list(expected.var_names)


def test_accessor_chained_subsets_match_anndata(adata: ad.AnnData, backed: Any) -> None:
    got = backed[::-1][slice("c15", "c5", -2)][:, adata.var["hv"]]
    expected = adata[::-1][slice("c15", "c5", -2)][:, adata.var["hv"]]
    np.testing.assert_array_equal(got.X, expected.X)
    assert list(got.obs_names) == list(expected.obs_names)


@pytest.mark.parametrize(("key", "error", "match"), [
    (slice(None, None, 0), errors.InvalidArgumentError, "obs slice step cannot be zero"),
    ((slice(None), slice(None, None, 0)), errors.InvalidArgumentError,
     "var slice step cannot be zero"),
    (slice("nope", "c3"), errors.NameNotFoundError, "obs name 'nope'"),
    ((slice(None), slice("g1", "zz")), errors.NameNotFoundError, "var name 'zz'"),
    (np.array([1.5, 2.0]), errors.InvalidArgumentError, "must be integers"),
    (np.ones((N_OBS, N_VARS), dtype=bool), errors.InvalidArgumentError, "one-dimensional"),
    ((slice(None), np.ones(N_OBS, dtype=bool)), errors.IndexOutOfRangeError,
     "boolean var mask has length 20, but the selection has 5 variables"),
    ([1, "c3"], errors.InvalidArgumentError, "only integer positions"),
    ((None, "g1"), errors.InvalidArgumentError, "None cannot index obs"),
    (("c1", None), errors.InvalidArgumentError, "None cannot index var"),
    ((..., ...), errors.InvalidArgumentError, "at most one Ellipsis"),
    ((1, 2, 3), errors.InvalidArgumentError, "one or two indices"),
    ((), errors.InvalidArgumentError, "one or two indices"),
    ((slice(None), 5), errors.IndexOutOfRangeError, "var index 5 is out of range for 5"),
    ((slice(None), ["g1", "gX"]), errors.NameNotFoundError, "var name\\(s\\) not found: 'gX'"),
])
def test_accessor_rejects(backed: Any, key: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        backed[key]


def test_accessor_names_on_a_non_unique_subset(backed: Any) -> None:
    repeated = backed[[1, 1, 2]]  # positions may repeat; the subset's names then do too
    with pytest.raises(errors.InvalidArgumentError, match="obs names are not unique"):
        repeated["c2"]
    with pytest.raises(errors.InvalidArgumentError, match="obs names are not unique"):
        repeated[slice("c1", "c2")]
    assert list(repeated[[2, 0]].obs_names) == ["c2", "c1"]
