"""Files written by old anndata versions open, and read as the installed anndata reads them.

The corpus: anndata's own archive of files written by old versions (0.5 to 0.11, h5ad and
zarr; see ``anndata_archives.py``), scanpy's pre-0.7 example, and layouts generated here
following anndata's legacy readers (no pre-0.7 zarr exists in anndata's archive; sparse
groups marked only by ``h5sparse_format`` or by nothing). For every file, ``to_memory()``
of the whole file and of a chained subset (an obs mask, then var names) equals
``anndata.read_h5ad``/``read_zarr`` and the same subset; one file per layout also on S3.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from anndata_archives import scanpy_example
from anndata_truth import assert_adata_equal, make_adata
from conftest import upload

import lamin_io as ln
from lamin_io import errors

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


# anndata warns about every old element it reads (its OldFormatWarning is pending
# deprecation), and about neighbour graphs moved from uns (FutureWarning)
pytestmark = [pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def read_truth(path: Path) -> ad.AnnData:
    return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)


# -- layouts generated here ----------------------------------------------------------------

N_OBS, N_VARS = 40, 12


def _records(columns: dict[str, np.ndarray]) -> np.ndarray:
    out = np.empty(len(next(iter(columns.values()))),
                   dtype=[(k, v.dtype, v.shape[1:]) for k, v in columns.items()])
    for k, v in columns.items():
        out[k] = v
    return out


def _pre07_parts(seed: int) -> dict[str, Any]:
    """The elements of an AnnData as anndata 0.6 stored them (see ``_legacy``)."""
    rng = np.random.default_rng(seed)
    names = np.array([f"cell{i}".encode() for i in range(N_OBS)])
    genes = np.array([f"gene{i}".encode() for i in range(N_VARS)])
    raw_x = sp.random(N_OBS, N_VARS + 3, density=0.3, format="csr", dtype=np.float32,
                      random_state=seed)
    graph = sp.random(N_OBS, N_OBS, density=0.1, format="csr", random_state=seed + 1)
    return {
        "X": rng.random((N_OBS, N_VARS), dtype=np.float32),
        "obs": _records({"index": names, "louvain": rng.integers(0, 3, N_OBS).astype("i1"),
                         "n_counts": rng.random(N_OBS).astype("f4"),
                         "is_doublet": rng.random(N_OBS) > 0.8}),
        "var": _records({"index": genes, "chrom": rng.integers(0, 2, N_VARS).astype("i1"),
                         "means": rng.random(N_VARS)}),
        "uns/louvain_categories": np.array([b"0", b"1", b"2"]),
        "uns/chrom_categories": np.array([b"1", b"X"]),
        "uns/louvain_colors": np.array([b"#1f77b4", b"#ff7f0e", b"#279e68"]),
        "uns/neighbors/params/method": np.array([b"umap"]),
        "uns/neighbors/distances": graph,
        "uns/neighbors/connectivities": graph.T.tocsr(),
        "raw.X": raw_x,
        "raw.var": _records({"index": np.array([f"rg{i}".encode()
                                                for i in range(N_VARS + 3)])}),
        "X_pca": rng.random((N_OBS, 4), dtype=np.float32),
        "PCs": rng.random((N_VARS, 4)),
        "raw_PCs": rng.random((N_VARS + 3, 2)),
    }


def _h5sparse(group: Any, m: sp.csr_matrix | sp.csc_matrix) -> None:
    """A sparse matrix as h5sparse (anndata < 0.7) stored it: no encoding-type."""
    group.attrs["h5sparse_format"] = m.format
    group.attrs["h5sparse_shape"] = [int(n) for n in m.shape]
    for part in ("data", "indices", "indptr"):
        value = getattr(m, part)
        if isinstance(group, h5py.Group):
            group[part] = value
        else:
            group.create_array(part, data=value)


def write_pre07_h5ad(path: Path) -> None:
    """A pre-0.7 h5ad beyond anndata's example: obsm/varm/raw.varm as one structured array,
    UTF-8 variable-length strings in obs, multicolumn obs fields listed in uns."""
    p = _pre07_parts(1)
    utf8 = h5py.string_dtype("utf-8")
    obs = p["obs"]
    extra = np.empty(N_OBS, dtype=[*[(n, obs.dtype[n]) for n in obs.dtype.names],
                                   ("donor", utf8), ("X_tsne0", "f8"), ("X_tsne1", "f8"),
                                   ("X_diff0", "f4")])
    for n in obs.dtype.names:
        extra[n] = obs[n]
    extra["donor"] = [f"dönor{i % 4}".encode() for i in range(N_OBS)]
    extra["X_tsne0"], extra["X_tsne1"] = np.arange(N_OBS), -np.arange(N_OBS)
    extra["X_diff0"] = np.arange(N_OBS) / 2
    with h5py.File(path, "w") as f:
        f["X"], f["obs"], f["var"], f["raw.var"] = p["X"], extra, p["var"], p["raw.var"]
        f["obsm"] = _records({"X_pca": p["X_pca"], "X_umap": p["X_pca"][:, :2] * 2})
        f["varm"] = _records({"PCs": p["PCs"]})
        f["raw.varm"] = _records({"PCs": p["raw_PCs"]})
        _h5sparse(f.create_group("raw.X"), p["raw.X"])
        for key in ("louvain_categories", "chrom_categories", "louvain_colors",
                    "neighbors/params/method"):
            f[f"uns/{key}"] = p[f"uns/{key}"]
        f["uns/obs_keys_multicol"] = np.array([b"X_tsne", b"X_diff"])
        for key in ("distances", "connectivities"):
            _h5sparse(f.create_group(f"uns/neighbors/{key}"), p[f"uns/neighbors/{key}"])


def _zarr_records(group: zarr.Group, name: str, value: np.ndarray) -> None:
    group.create_array(name, data=value, fill_value=np.zeros((), value.dtype)[()])


def write_pre07_zarr(path: Path) -> None:
    """A zarr store as anndata 0.6 wrote it (format 2, no encoding attributes anywhere):
    structured obs/var/raw.var with fixed-width strings, categories in uns, obsm/varm/layers
    as groups of arrays, raw at the top level, sparse matrices as h5sparse groups."""
    p = _pre07_parts(2)
    root = zarr.open_group(path, mode="w", zarr_format=2)
    root.create_array("X", data=p["X"])
    for name in ("obs", "var", "raw.var"):
        _zarr_records(root, name, p[name])
    root.create_group("obsm").create_array("X_pca", data=p["X_pca"])
    root.create_group("varm").create_array("PCs", data=p["PCs"])
    root.create_group("layers").create_array("counts", data=p["X"] * 3)
    root.create_group("raw.varm").create_array("PCs", data=p["raw_PCs"])
    _h5sparse(root.create_group("raw.X"), p["raw.X"])
    uns = root.create_group("uns")
    for key in ("louvain_categories", "chrom_categories", "louvain_colors",
                "neighbors/params/method"):
        uns.create_array(key, data=p[f"uns/{key}"])
    for key in ("distances", "connectivities"):
        _h5sparse(uns.create_group(f"neighbors/{key}"), p[f"uns/neighbors/{key}"])


def _modern(seed: int) -> ad.AnnData:
    adata = make_adata("csr", n_obs=N_OBS, n_vars=N_VARS, seed=seed)
    del adata.obsm["cube"]  # 3-D: beside the point here
    adata.obsp["csc"] = sp.random(N_OBS, N_OBS, density=0.1, format="csc", random_state=seed)
    return adata


def _strip(path: Path, keys: list[str], mark: Callable[[Any, Any], None]) -> None:
    """Replace the encoding attributes of the sparse groups ``keys`` by ``mark``."""
    if path.suffix == ".zarr":
        root: Any = zarr.open_group(path, mode="r+", use_consolidated=False)
    else:
        root = h5py.File(path, "r+")
    try:
        for key in keys:
            group = root[key]
            fmt = group.attrs["encoding-type"].split("_")[0]
            shape = tuple(int(n) for n in group.attrs["shape"])
            for name in ("encoding-type", "encoding-version", "shape"):
                del group.attrs[name]
            mark(group, (fmt, shape))
    finally:
        if path.suffix == ".zarr":
            zarr.consolidate_metadata(path)
        else:
            root.close()


def _mark_h5sparse(group: Any, layout: tuple[str, tuple[int, int]]) -> None:
    group.attrs["h5sparse_format"] = layout[0]
    group.attrs["h5sparse_shape"] = list(layout[1])


def write_h5sparse(path: Path) -> None:
    """Today's layout with its sparse matrices marked only by ``h5sparse_format``."""
    adata = _modern(3)
    getattr(adata, f"write_{path.suffix[1:]}")(path)
    _strip(path, ["X", "layers/counts", "layers/csc", "obsp/distances", "obsp/csc",
                  "raw/X"], _mark_h5sparse)


def write_bare_sparse(path: Path) -> ad.AnnData:
    """Today's layout with sparse ``X``/``layers``/``obsp`` groups marked by nothing at all.

    anndata cannot read these (it takes them for mappings); the truth (returned) is what it
    read before their marks were removed. A square CSC matrix (``obsp["csc"]``) cannot be
    told from CSR: it keeps its marks.
    """
    getattr(_modern(4), f"write_{path.suffix[1:]}")(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth = read_truth(path)
    _strip(path, ["X", "layers/counts", "layers/csc", "obsp/distances"], lambda g, _: None)
    return truth


#: name -> (archive version, or a writer of the layout, and the suffixes to test it in)
GENERATED: dict[str, Callable[[Path], Any]] = {
    "pre07": write_pre07_h5ad, "pre07-zarr": write_pre07_zarr,
    "h5sparse": write_h5sparse, "bare-sparse": write_bare_sparse,
}
CASES = [
    *[(v, s) for v in ("v0.5.0",) for s in (".h5ad",)],
    *[(v, s) for v in ("v0.7.0", "v0.7.8", "v0.11.4") for s in (".h5ad", ".zarr")],
    ("scanpy", ".h5ad"), ("pre07", ".h5ad"), ("pre07-zarr", ".zarr"),
    ("h5sparse", ".h5ad"), ("h5sparse", ".zarr"), ("bare-sparse", ".h5ad"),
    ("bare-sparse", ".zarr"),
]
#: one file per layout, read again from S3
S3_CASES = [("v0.5.0", ".h5ad"), ("pre07-zarr", ".zarr"), ("v0.7.8", ".h5ad"),
            ("v0.7.0", ".zarr"), ("h5sparse", ".h5ad"), ("bare-sparse", ".zarr")]


@pytest.fixture(scope="module")
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Callable[[str, str], tuple[Path, ad.AnnData]]:
    """``(name, suffix) -> (path, truth)``, each file made and read once per module.

    anndata's archive is downloaded for the first test that asks for one of its files.
    """
    made: dict[tuple[str, str], tuple[Path, ad.AnnData]] = {}
    folder = tmp_path_factory.mktemp("corpus")

    def get(name: str, suffix: str) -> tuple[Path, ad.AnnData]:
        if (name, suffix) not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "scanpy":
                    path = scanpy_example()
                elif name in GENERATED:
                    path = folder / f"{name}{suffix}"
                    written = GENERATED[name](path)
                else:
                    path = request.getfixturevalue("anndata_archives") / name / \
                        f"adata{suffix}"
                truth = written if name == "bare-sparse" else read_truth(path)
            made[name, suffix] = (path, truth)
        return made[name, suffix]

    return get


def chained(adata: Any) -> Any:
    """An obs mask, then var names (in an order of their own): the subset every test takes."""
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[::3] = True
    mask[[1, adata.n_obs - 1]] = True
    names = list(adata.var_names[::-4][:5])
    return adata[mask][:, names]


def _check(acc: Any, truth: ad.AnnData, *, whole: bool = True) -> None:
    assert acc.shape == truth.shape
    if whole:
        assert_adata_equal(acc.to_memory(), truth)
    assert_adata_equal(chained(acc).to_memory(), chained(truth).copy())


@pytest.mark.parametrize(("name", "suffix"), CASES, ids=[f"{n}{s}" for n, s in CASES])
def test_reads_as_anndata_reads(corpus: Any, name: str, suffix: str) -> None:
    path, truth = corpus(name, suffix)
    with ln.open(path) as acc:
        _check(acc, truth)
        for key in acc.obsp:  # each element on its own, too
            assert_adata_equal(ad.AnnData(obsp={key: acc.obsp[key]}, shape=acc.shape),
                               ad.AnnData(obsp={key: truth.obsp[key]}, shape=truth.shape))


@pytest.mark.parametrize(("name", "suffix"), S3_CASES, ids=[f"{n}{s}" for n, s in S3_CASES])
def test_reads_as_anndata_reads_on_s3(corpus: Any, s3_endpoint: str, name: str,
                                      suffix: str) -> None:
    path, truth = corpus(name, suffix)
    with ln.open(upload(path, s3_endpoint)) as acc:
        _check(acc, truth, whole=False)  # the subset reads every element, too


def test_pre07_elements_one_by_one(corpus: Any) -> None:
    """What failed with anndata < 0.7 files: obsm (a structured array), raw at the top."""
    path, truth = corpus("v0.5.0", ".h5ad")
    with ln.open(path) as acc:
        assert list(acc.obsm) == list(truth.obsm)
        np.testing.assert_array_equal(acc[5:9].obsm["X_umap"], truth.obsm["X_umap"][5:9])
        assert acc.raw is not None
        assert acc.raw.shape == truth.raw.shape
        pd.testing.assert_frame_equal(acc.raw.var, truth.raw.var)
        assert sorted(acc.obsp) == sorted(truth.obsp)  # moved from uns["neighbors"]
        assert "distances" not in acc.uns["neighbors"]
        assert not [k for k in acc.uns if k.endswith("_categories")]
        assert isinstance(acc.obs["louvain"].dtype, pd.CategoricalDtype)
        shown = repr(acc)  # what AnnData shows: no index field, no categories in uns
        assert "'index'" not in shown
        assert "_categories" not in shown
        assert "obsp: 'distances', 'connectivities'" in shown


def test_repr_shows_the_uns_keys_uns_holds(tmp_path: Path) -> None:
    """A pre-0.7 ``<column>_categories`` key whose categories do not fit the column's codes
    stays in ``uns`` (anndata keeps it): the repr lists it too (it hid every such key)."""
    path = tmp_path / "misfit.h5ad"
    names = np.array([f"cell{i}".encode() for i in range(6)])
    with h5py.File(path, "w") as f:
        f["X"] = np.zeros((6, 2), dtype=np.float32)
        f["obs"] = _records({"index": names, "louvain": np.arange(6).astype("i1") % 3,
                             "batch": np.arange(6).astype("i1") % 2})
        f["var"] = _records({"index": np.array([b"g0", b"g1"])})
        f["uns/louvain_categories"] = np.array([b"a", b"b"])  # codes reach 2: not these
        f["uns/batch_categories"] = np.array([b"x", b"y"])  # codes 0 and 1: these
    truth = read_truth(path)
    assert list(truth.uns) == ["louvain_categories"]
    with ln.open(path) as acc:
        assert list(acc.uns) == list(truth.uns)
        shown = repr(acc).splitlines()
        assert isinstance(acc.obs["batch"].dtype, pd.CategoricalDtype)
    assert "    uns: 'louvain_categories'" in shown


@pytest.mark.parametrize(("name", "suffix"), CASES, ids=[f"{n}{s}" for n, s in CASES])
def test_codes_label_rows_as_anndata_does(corpus: Any, name: str, suffix: str) -> None:
    """The read path's obs codes (what a training loader's labels come from), every layout."""
    path, truth = corpus(name, suffix)
    rows = np.array([truth.n_obs - 1, 0, 2, 2])
    with ln.open(path) as acc:
        store = acc._store  # noqa: SLF001 (the read path's source under the accessor)
        for column in truth.obs.columns:
            values = truth.obs[column]
            if values.ndim != 1 or values.dtype.kind == "f":
                continue  # labels are categories, strings, ints or booleans
            codes, categories = store.codes(f"obs/{column}", rows)
            labels = [categories[c] if c >= 0 else None for c in codes]
            expected = [None if pd.isna(v) else v for v in values.to_numpy()[rows]]
            assert labels == expected, column


def test_07_categories(corpus: Any) -> None:
    for suffix in (".h5ad", ".zarr"):
        path, truth = corpus("v0.7.0", suffix)
        with ln.open(path) as acc:
            got = acc[acc.obs["obs_cat"] == truth.obs["obs_cat"].iloc[0]].obs
            assert "__categories" not in repr(acc)
        expected = truth[truth.obs["obs_cat"] == truth.obs["obs_cat"].iloc[0]].copy().obs
        assert got["cat_ordered"].cat.ordered
        pd.testing.assert_frame_equal(got, expected)


def test_bare_sparse_obsp_is_a_matrix(tmp_path: Path) -> None:
    """An obsp sparse group without attributes was read as a data frame, "damaged"."""
    truth = write_bare_sparse(tmp_path / "bare.h5ad")
    with ln.open(tmp_path / "bare.h5ad") as acc:
        got = acc[[7, 2, 2]].obsp["distances"]
    expected = truth.obsp["distances"][[7, 2, 2]][:, [7, 2, 2]]
    assert got.format == "csr"
    np.testing.assert_array_equal(got.toarray(), expected.toarray())


# -- layouts still not read: a typed error naming the element ------------------------------

def _bare_group(f: Any, key: str, m: sp.csr_matrix) -> None:
    for part in ("data", "indices", "indptr"):
        f[f"{key}/{part}"] = getattr(m, part)


def test_unreadable_layouts_name_the_element(tmp_path: Path) -> None:
    adata = _modern(5)
    path = tmp_path / "odd.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        # an obsm matrix marked by nothing: its number of columns is stored nowhere
        _bare_group(f, "obsm/bare", sp.random(N_OBS, 7, density=0.3, format="csr"))
        # a layer marked by nothing whose index pointer fits neither axis
        _bare_group(f, "layers/bent", sp.random(N_OBS + 1, N_VARS, density=0.3, format="csr"))
        # encodings no anndata knows
        f["layers/counts"].attrs["encoding-type"] = "future_matrix"
        f.create_group("uns/future").attrs["encoding-type"] = "future_mapping"
        f["uns/future"].attrs["encoding-version"] = "9.0.0"
    with ln.open(path) as acc:
        for get, element in [(lambda: acc.obsm["bare"], "obsm/bare"),
                             (lambda: acc.layers["bent"], "layers/bent"),
                             (lambda: acc.layers["counts"], "layers/counts"),
                             (lambda: acc.uns, "uns")]:
            with pytest.raises(errors.UnsupportedLayoutError, match=element) as info:
                get()
            assert "anndata" in str(info.value)
            assert "damaged" not in str(info.value)
        np.testing.assert_array_equal(acc.X.toarray(), adata.X.toarray())  # the rest reads
