"""Reference AnnData objects and a strict comparison, shared by the accessor tests."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def make_adata(kind: str, n_obs: int = 120, n_vars: int = 40, seed: int = 0) -> ad.AnnData:
    """An AnnData exercising every element; ``kind`` is ``dense``, ``csr`` or ``csc``.

    Layers hold CSR, CSC and dense matrices, ``obsm`` a matrix, a data frame and a 3-D
    array; the sparse kinds carry ``raw``, the dense one does not.
    """
    rng = np.random.default_rng(seed)
    counts = sp.random(n_obs, n_vars, density=0.2, format="csr", dtype=np.float32,
                       random_state=seed)
    counts.data = np.round(counts.data * 10).astype(np.float32) + 1
    X: Any = {"dense": counts.toarray(), "csr": counts, "csc": counts.tocsc()}[kind]
    cell_types = [f"type_{i}" for i in range(15)]
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(cell_types, n_obs)),
        "n_counts": rng.random(n_obs),
        "batch": rng.choice(["a", "b"], n_obs).astype(object),
        "is_doublet": rng.random(n_obs) > 0.9,
        "n_genes": pd.array(rng.integers(0, 100, n_obs), dtype="Int64"),
    }, index=pd.Index([f"cell_{i}" for i in range(n_obs)], name="cell_id"))
    var = pd.DataFrame({
        "highly_variable": rng.random(n_vars) > 0.5,
        "chrom": pd.Categorical(rng.choice(["1", "2", "X"], n_vars)),
    }, index=[f"gene_{i}" for i in range(n_vars)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = counts.copy() if kind != "dense" else counts.toarray()
    adata.layers["dense"] = counts.toarray() * 2
    adata.layers["csc"] = counts.tocsc() * 3
    adata.obsm["X_pca"] = rng.random((n_obs, 5)).astype(np.float32)
    adata.obsm["cube"] = rng.random((n_obs, 3, 2))
    adata.obsm["meta"] = pd.DataFrame({"x": rng.random(n_obs)}, index=obs.index)
    adata.varm["loadings"] = rng.random((n_vars, 3))
    adata.obsp["distances"] = sp.random(n_obs, n_obs, density=0.05, format="csr",
                                        random_state=seed + 1)
    adata.varp["corr"] = rng.random((n_vars, n_vars))
    adata.uns["cell_type_colors"] = np.array([f"#{i:06x}" for i in range(15)], dtype=object)
    adata.uns["params"] = {"n_pcs": 5, "method": "test", "nested": {"a": np.arange(3)}}
    if kind != "dense":  # the dense truth has no raw: anndata then stores a placeholder
        adata.raw = adata.copy()
    return adata


def _dense(x: Any) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def assert_values_equal(got: Any, expected: Any, what: str) -> None:
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(pd.DataFrame(got), pd.DataFrame(expected),
                                      check_frame_type=False, obj=what)
        return
    if isinstance(expected, dict):
        assert set(got) == set(expected), what
        for k in expected:
            assert_values_equal(got[k], expected[k], f"{what}[{k!r}]")
        return
    if sp.issparse(expected):
        assert sp.issparse(got), f"{what}: expected sparse, got {type(got)}"
        assert got.format == expected.format, what
    if isinstance(expected, np.ndarray | np.generic) or sp.issparse(expected):
        assert got.shape == expected.shape, f"{what}: {got.shape} != {expected.shape}"
        assert got.dtype == expected.dtype, f"{what}: {got.dtype} != {expected.dtype}"
        np.testing.assert_array_equal(_dense(got), _dense(expected), err_msg=what)
        return
    assert type(got) is type(expected), f"{what}: {type(got)} != {type(expected)}"
    assert got == expected, what


def assert_adata_equal(got: ad.AnnData, expected: ad.AnnData) -> None:
    """Every element equal: values, dtypes, sparse formats, categoricals, index names, raw."""
    assert got.shape == expected.shape
    assert_values_equal(got.X, expected.X, "X")
    assert_values_equal(got.obs, expected.obs, "obs")
    assert_values_equal(got.var, expected.var, "var")
    for name in ("layers", "obsm", "varm", "obsp", "varp"):
        assert_values_equal(dict(getattr(got, name)), dict(getattr(expected, name)), name)
    assert_values_equal(dict(got.uns), dict(expected.uns), "uns")
    assert (got.raw is None) == (expected.raw is None)
    if expected.raw is not None:
        assert_values_equal(got.raw.X, expected.raw.X, "raw.X")
        assert_values_equal(got.raw.var, expected.raw.var, "raw.var")
        assert_values_equal(dict(got.raw.varm), dict(expected.raw.varm), "raw.varm")
