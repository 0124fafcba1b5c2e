"""The AnnData accessor against in-memory AnnData: formats x storage x matrix kinds x keys.

``AccessorTests`` holds what every AnnData store must do; each on-disk format subclasses it
and only supplies how the store is written.
"""

from __future__ import annotations

import uuid
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata_truth import assert_adata_equal, assert_values_equal, make_adata
from conftest import BUCKET

import lamin_io as ln
from lamin_io.accessors._anndata import AnnDataAccessor

if TYPE_CHECKING:
    from pathlib import Path


def _keys(adata: ad.AnnData) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    mask = (adata.obs["cell_type"] == "type_3").to_numpy() | (adata.obs["n_counts"] > 0.8)
    genes = [f"gene_{i}" for i in (17, 3, 33, 8)]
    return {
        "slice": slice(10, 60),
        "step_slice": slice(None, None, 3),
        "negative_slice": slice(-30, None),
        "ints_unsorted_repeated": np.array([5, 3, 3, 100, 0, -1]),
        "int_list": [7, 2, 9],
        "bool_mask": mask,
        "bool_series": pd.Series(mask, index=adata.obs_names),
        "obs_names": ["cell_4", "cell_90", "cell_1"],
        "obs_x_var_slices": (slice(5, 25), slice(3, 30, 2)),
        "mask_x_gene_names": (mask, genes),
        "ints_x_var_mask": (rng.permutation(adata.n_obs)[:30],
                            (adata.var["highly_variable"]).to_numpy()),
        "all_x_var_ints_repeated": (slice(None), np.array([4, 4, 0, 39])),
        "single_name": "cell_11",
        "empty": np.array([], dtype=int),
        "reverse_step": slice(None, None, -2),
        "numpy_int": np.int64(5),
        "name_slice": slice("cell_3", "cell_9"),
        "single_var_name": (slice(None), "gene_3"),
        "var_bool_series": (slice(None), adata.var["highly_variable"]),
    }


KEYS = list(_keys(make_adata("csr")).keys())
_STORES: dict[tuple[str, str, str], tuple[Any, ad.AnnData]] = {}


def _write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    path = path.with_suffix(".h5ad")
    adata.write_h5ad(path)
    return path


def _write_h5ad_gzip(adata: ad.AnnData, path: Path) -> Path:
    import gzip
    import shutil

    plain = _write_h5ad(adata, path)
    packed = plain.with_name(plain.name + ".gz")
    with plain.open("rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return packed


def _write_zarr(version: int, *, consolidated: bool = True) -> Any:
    def write(adata: ad.AnnData, path: Path) -> Path:
        import zarr

        path = path.with_suffix(".zarr")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ad.settings.zarr_write_format = version
            try:
                adata.write_zarr(path)
            finally:
                ad.settings.zarr_write_format = 2
        if not consolidated:
            for name in (".zmetadata",):
                (path / name).unlink(missing_ok=True)
            if version == 3:
                group = zarr.open_group(path, mode="r+", use_consolidated=False)
                attrs = dict(group.metadata.to_dict())
                meta = path / "zarr.json"
                import json

                doc = json.loads(meta.read_text())
                doc.pop("consolidated_metadata", None)
                meta.write_text(json.dumps(doc))
                del attrs
        return path

    return write


def _load_truth(local: Path) -> ad.AnnData:
    """The truth: the file loaded whole by anndata."""
    import gzip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if local.suffix == ".zarr":
            return ad.read_zarr(local)
        if local.suffix == ".gz":
            with gzip.open(local) as f:
                return ad.read_h5ad(f)
        return ad.read_h5ad(local)


@pytest.fixture(scope="module")
def truths() -> dict[str, ad.AnnData]:
    return {kind: make_adata(kind) for kind in ("dense", "csr", "csc")}


class AccessorTests:
    """What every AnnData store must do. Subclasses set ``write``."""

    write: Any

    @pytest.fixture(params=["dense", "csr", "csc"])
    def kind(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def stored(self, kind: str, truths: dict[str, ad.AnnData], storage_kind: str,
               tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> tuple[Any, ad.AnnData]:
        """The store written once per (format, kind, storage) and the file loaded whole."""
        cache_key = (type(self).__name__, kind, storage_kind)
        if cache_key in _STORES:
            return _STORES[cache_key]
        local = type(self).write(truths[kind], tmp_path_factory.mktemp("store") / "data")
        truth = _load_truth(local)
        location: Any = local
        if storage_kind == "s3":
            from lamin_io.storage import to_upath

            endpoint = request.getfixturevalue("s3_endpoint")
            url = f"s3://{BUCKET}/{uuid.uuid4().hex}/{local.name}"
            location = to_upath(url, {"endpoint_url": endpoint})
            location.fs.put(str(local), location.path, recursive=local.is_dir())
        _STORES[cache_key] = (location, truth)
        return _STORES[cache_key]

    @pytest.fixture
    def accessor(self, stored: tuple[Any, ad.AnnData]) -> Any:
        acc = ln.open(stored[0])
        yield acc
        acc.close()

    def test_opens_as_anndata_accessor(self, accessor: Any,
                                       stored: tuple[Any, ad.AnnData]) -> None:
        truth = stored[1]
        assert isinstance(accessor, AnnDataAccessor)
        assert accessor.shape == truth.shape
        assert list(accessor.obs_names) == list(truth.obs_names)
        assert accessor.obs_names.name == truth.obs_names.name
        assert list(accessor.var_names) == list(truth.var_names)
        assert set(accessor.layers) == set(truth.layers)
        assert "AnnDataAccessor" in repr(accessor)

    @pytest.mark.parametrize("key", KEYS)
    def test_subset_equals_anndata(self, accessor: Any, stored: tuple[Any, ad.AnnData],
                                   key: str) -> None:
        truth = stored[1]
        index = _keys(truth)[key]
        expected = truth[index].copy()
        sub = accessor[index]
        assert sub.shape == expected.shape
        assert_values_equal(sub.X, expected.X, "X")
        assert_values_equal(sub.obs, expected.obs, "obs")
        assert_adata_equal(sub.to_memory(), expected)

    def test_chained_subsets(self, accessor: Any, stored: tuple[Any, ad.AnnData]) -> None:
        truth = stored[1]
        mask = (truth.obs["n_counts"] > 0.3).to_numpy()
        genes = ["gene_30", "gene_2", "gene_11", "gene_5"]
        got = accessor[mask][:, genes][3:20]
        expected = truth[mask][:, genes][3:20].copy()
        assert_adata_equal(got.to_memory(), expected)
        got2 = accessor[::2, 5:35][[4, 1, 1], ::3]
        # anndata cannot chain this on sparse views; compose the positions by hand
        obs_pos = np.arange(truth.n_obs)[::2][[4, 1, 1]]
        var_pos = np.arange(truth.n_vars)[5:35][::3]
        expected2 = truth[obs_pos, var_pos].copy()
        assert_adata_equal(got2.to_memory(), expected2)

    def test_whole_file(self, accessor: Any, stored: tuple[Any, ad.AnnData]) -> None:
        assert_adata_equal(accessor.to_memory(), stored[1])
        d = accessor[:10].to_dict()
        assert set(d) >= {"X", "obs", "var", "layers", "obsm", "uns"}
        assert ("raw" in d) == (stored[1].raw is not None)
        assert_values_equal(d["obsm"]["cube"], stored[1].obsm["cube"][:10], "to_dict obsm")

    def test_elements_of_subsets(self, accessor: Any, stored: tuple[Any, ad.AnnData]) -> None:
        truth = stored[1]
        sub, exp = accessor[[9, 2, 50], ["gene_1", "gene_0"]], truth[[9, 2, 50],
                                                                    ["gene_1", "gene_0"]]
        assert_values_equal(sub.layers["counts"], exp.layers["counts"], "layers")
        assert_values_equal(sub.obsm["X_pca"], exp.obsm["X_pca"], "obsm")
        assert_values_equal(sub.obsm["meta"], exp.obsm["meta"], "obsm df")
        assert_values_equal(sub.obsp["distances"], exp.obsp["distances"], "obsp")
        assert_values_equal(sub.varm["loadings"], exp.varm["loadings"], "varm")
        assert_values_equal(sub.varp["corr"], exp.varp["corr"], "varp")
        assert_values_equal(sub.obsm["cube"], exp.obsm["cube"], "obsm 3-D")
        assert_values_equal(sub.layers["csc"], exp.layers["csc"], "layers csc")
        if exp.raw is None:
            assert sub.raw is None
        else:
            assert_values_equal(sub.raw.X, exp.raw.X, "raw.X")
            assert sub.raw.shape == exp.raw.shape

    def test_bad_indices(self, accessor: Any) -> None:
        n_obs, n_vars = accessor.shape
        with pytest.raises(ln.errors.IndexOutOfRangeError):
            accessor[[0, n_obs]]
        with pytest.raises(IndexError):
            accessor[:, n_vars + 3]
        with pytest.raises(ln.errors.NameNotFoundError, match="no_such_cell"):
            accessor[["cell_1", "no_such_cell"]]
        with pytest.raises(KeyError):
            accessor[:, ["gene_1", "GENE_X"]]
        with pytest.raises(ln.errors.IndexOutOfRangeError, match="mask"):
            accessor[np.ones(n_obs + 1, dtype=bool)]
        with pytest.raises(ln.errors.InvalidArgumentError):
            accessor[0, 0, 0]

    def test_closed(self, stored: tuple[Any, ad.AnnData]) -> None:
        with ln.open(stored[0]) as acc:
            sub = acc[:5]
        assert acc.closed
        with pytest.raises(ln.errors.AccessorClosedError):
            _ = sub.X


class TestH5ad(AccessorTests):
    write = staticmethod(_write_h5ad)


class TestZarrV2(AccessorTests):
    write = staticmethod(_write_zarr(2))


class TestZarrV3(AccessorTests):
    write = staticmethod(_write_zarr(3))


class LocalOnly(AccessorTests):
    """Layouts whose remote reads differ only in how bytes arrive: the full matrix runs
    locally, and :func:`test_other_layouts_on_s3` covers them on S3 (keeping CI short)."""

    @pytest.fixture(params=["local"])
    def storage_kind(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)


class TestZarrV3Unconsolidated(LocalOnly):
    write = staticmethod(_write_zarr(3, consolidated=False))


class TestZarrV2Unconsolidated(LocalOnly):
    write = staticmethod(_write_zarr(2, consolidated=False))


class TestH5adGzip(LocalOnly):
    write = staticmethod(_write_h5ad_gzip)


@pytest.mark.parametrize("layout", [
    pytest.param((_write_zarr(3, consolidated=False), "csr"), id="zarr3-unconsolidated"),
    pytest.param((_write_zarr(2, consolidated=False), "csc"), id="zarr2-unconsolidated"),
    pytest.param((_write_h5ad_gzip, "dense"), id="h5ad-gzip"),
])
def test_other_layouts_on_s3(layout: tuple[Any, str], truths: dict[str, ad.AnnData],
                             s3_endpoint: str, tmp_path: Path) -> None:
    from lamin_io.storage import to_upath

    write, kind = layout
    local = write(truths[kind], tmp_path / "data")
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/{local.name}"
    remote = to_upath(url, {"endpoint_url": s3_endpoint})
    remote.fs.put(str(local), remote.path, recursive=local.is_dir())
    truth = _load_truth(local)
    with ln.open(remote) as acc:
        assert_adata_equal(acc.to_memory(), truth)
        index = _keys(truth)["mask_x_gene_names"]
        assert_values_equal(acc[index].X, truth[index].X, "X")
        assert_values_equal(acc[index].obs, truth[index].obs, "obs")


def test_matrix_values_behind_an_external_link_come_from_the_linked_file(
        tmp_path: Path) -> None:
    import h5py
    import scipy.sparse as sp

    x = sp.random(2_000, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
    adata = ad.AnnData(x)
    adata.write_h5ad(tmp_path / "a.h5ad")
    adata.X = x * 2
    adata.write_h5ad(tmp_path / "b.h5ad")
    with h5py.File(tmp_path / "a.h5ad", "r+") as f:
        del f["X/data"]
        f["X/data"] = h5py.ExternalLink(str(tmp_path / "b.h5ad"), "X/data")
    rows = np.arange(0, 2_000, 7)
    with ln.open(tmp_path / "a.h5ad") as acc:
        np.testing.assert_array_equal(acc[rows].X.toarray(), (x * 2)[rows].toarray())
