"""``MappedCollection``: lamindb's items and attributes, read a batch at a time.

The truth is AnnData in memory, and lamindb's rules (its 2.12 ``MappedCollection``) written
out here: items keyed ``_store_idx``, layers, ``obsm_<key>``, obs keys; variables joined
inner (first file's order) or outer (sorted, zeros where a file lacks one); labels encoded
by sorted category, ``unknown_label`` coded -1; keys a file lacks left out.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import upload

from lamin_io import errors
from lamin_io.loaders import Batch, MappedCollection

if TYPE_CHECKING:
    from pathlib import Path

N_VARS = 30


def _adata(seed: int, n_obs: int, genes: list[str], kind: str, *, types: list[str],
           extra: bool) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = sp.random(n_obs, len(genes), density=0.3, format="csr", dtype=np.float32,
                       random_state=seed)
    counts.data = np.round(counts.data * 10).astype(np.float32) + 1
    x: Any = {"csr": counts, "csc": counts.tocsc(), "dense": counts.toarray()}[kind]
    cell_type = pd.Categorical(rng.choice(types, n_obs), categories=sorted(set(types)))
    if extra:
        cell_type[::7] = np.nan
    obs = pd.DataFrame({"cell_type": cell_type,
                        "donor": rng.choice(["d1", "d2", "d3"], n_obs).astype(object),
                        "n_counts": rng.random(n_obs)},
                       index=[f"s{seed}_c{i}" for i in range(n_obs)])
    if extra:
        obs["tissue"] = pd.Categorical(rng.choice(["lung", "gut"], n_obs))
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = counts * 2
    if extra:
        adata.obsm["X_pca"] = rng.random((n_obs, 4)).astype(np.float32)
        adata.raw = adata.copy()
    return adata


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[ad.AnnData]]:
    folder = tmp_path_factory.mktemp("mapped")
    all_genes = [f"g{i:02d}" for i in range(N_VARS)]
    rng = np.random.default_rng(0)
    genes = [all_genes,
             list(rng.permutation(all_genes[5:])),  # another order, some missing
             all_genes[:20] + ["x1", "x2"]]
    adatas = [_adata(0, 60, genes[0], "csr", types=["B", "T", "NK"], extra=True),
              _adata(1, 45, genes[1], "csc", types=["T", "NK", "Mono"], extra=False),
              _adata(2, 50, genes[2], "dense", types=["B", "DC"], extra=True)]
    paths = [folder / "a.h5ad", folder / "b.zarr", folder / "c.h5ad"]
    for adata, path in zip(adatas, paths, strict=True):
        adata.write_zarr(path) if path.suffix == ".zarr" else adata.write_h5ad(path)
    return paths, adatas


def _row(adata: ad.AnnData, layer: str, i: int) -> np.ndarray:
    m = adata.X if layer == "X" else adata.raw.X if layer == "raw.X" else adata.layers[layer]
    row = m[i]
    return np.asarray(row.toarray() if sp.issparse(row) else row).reshape(-1)


def _expected(adatas: list[ad.AnnData], join: str | None, *, layers: list[str],
              obs_keys: list[str], obsm_keys: list[str], encode: bool = True,
              unknown: str | None = None) -> list[dict[str, Any]]:
    """Items as lamindb makes them, from AnnData in memory."""
    var_lists = [a.var_names for a in adatas]
    same = all(v.equals(var_lists[0]) for v in var_lists)
    joint = None
    if join == "inner" and not same:
        joint = var_lists[0]
        for v in var_lists[1:]:
            joint = joint.intersection(v)
    elif join == "outer" and not same:
        joint = var_lists[0]
        for v in var_lists[1:]:
            joint = joint.union(v)
    encoders: dict[str, dict[Any, int]] = {}
    for key in obs_keys if encode else ():
        cats: set[Any] = set()
        for a in adatas:
            if key in a.obs:
                col = a.obs[key]
                cats |= set(col.cat.categories if hasattr(col, "cat") else col.dropna())
        ordered = sorted(cats)
        enc: dict[Any, int] = {}
        if unknown is not None and unknown in ordered:
            ordered.remove(unknown)
            enc[unknown] = -1
        enc.update((c, i) for i, c in enumerate(ordered))
        encoders[key] = enc
    items = []
    for s, a in enumerate(adatas):
        for i in range(a.n_obs):
            item: dict[str, Any] = {"_store_idx": s}
            for layer in layers:
                if layer == "raw.X" and a.raw is None:
                    continue
                row = _row(a, layer, i)
                if joint is not None and layer != "raw.X":
                    values = pd.Series(row, index=a.var_names)
                    row = values.reindex(joint, fill_value=0).to_numpy(dtype=row.dtype)
                item[layer] = row
            for key in obsm_keys:
                if key in a.obsm:
                    item[f"obsm_{key}"] = np.asarray(a.obsm[key][i])
            for key in obs_keys:
                if key in a.obs:
                    value = a.obs[key].iloc[i]
                    if key in encoders and not pd.isna(value):
                        value = encoders[key][value]
                    item[key] = value
            items.append(item)
    return items


def _assert_items(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        elif isinstance(value, float) and np.isnan(value):
            assert pd.isna(got[key]), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("join", ["inner", "outer", None])
def test_items_are_lamindb_items(files: Any, join: str | None) -> None:
    paths, adatas = files
    layers = ["X", "counts", "raw.X"]
    with MappedCollection(paths, layers_keys=layers, obs_keys=["cell_type", "tissue"],
                          obsm_keys=["X_pca"], join=join) as ds:
        want = _expected(adatas, join, layers=layers, obs_keys=["cell_type", "tissue"],
                         obsm_keys=["X_pca"])
        assert len(ds) == len(want) == sum(a.n_obs for a in adatas)
        for i in [0, 1, 59, 60, 61, 104, 105, 154, -1]:
            _assert_items(ds[i], want[i])
        order = np.random.default_rng(1).permutation(len(ds))[:70]
        batch = ds.__getitems__(order)
        assert isinstance(batch, Batch)
        assert len(batch) == len(order)
        for got, i in zip(batch, order.tolist(), strict=True):
            _assert_items(got, want[i])


def test_join_attributes_follow_lamindb(files: Any) -> None:
    paths, adatas = files
    with MappedCollection(paths, join="inner") as inner:
        expected = adatas[0].var_names.intersection(adatas[1].var_names).intersection(
            adatas[2].var_names)
        assert inner.var_joint.equals(expected)  # the first file's order
        assert inner.shape == (155, len(expected))
        assert inner.original_shapes == [(60, 30), (45, 25), (50, 22)]
    with MappedCollection(paths, join="outer") as outer:
        assert list(outer.var_joint) == sorted(set().union(*(a.var_names for a in adatas)))
        assert outer.n_vars == 32
    with MappedCollection(paths, join=None) as plain:
        assert plain.shape == (155, None)
        assert plain.var_joint is None
        assert plain.check_vars_non_aligned(adatas[0].var_names) == [1, 2]
        assert not plain.check_vars_sorted()


def test_encoders_unknown_label_and_label_helpers(files: Any) -> None:
    paths, adatas = files
    with MappedCollection(paths, obs_keys=["cell_type", "donor"], unknown_label="NK",
                          encode_labels=["cell_type"]) as ds:
        assert ds.encoders == {"cell_type": {"NK": -1, "B": 0, "DC": 1, "Mono": 2, "T": 3}}
        assert ds.get_merged_categories("cell_type") == ["B", "DC", "Mono", "NK", "T"]
        merged = ds.get_merged_labels("donor")
        assert merged.tolist() == [v for a in adatas for v in a.obs["donor"]]
        weights = ds.get_label_weights("donor")
        counts = pd.Series(merged).value_counts()
        np.testing.assert_allclose(weights, 1.0 / counts[merged].to_numpy())
        by_label = ds.get_label_weights(["cell_type", "donor"], scaler=10,
                                        return_categories=True)
        assert all(0 < w < 1 for w in by_label.values())
        item = ds[1]
        assert item["donor"] == adatas[0].obs["donor"].iloc[1]  # not encoded
    with pytest.raises(errors.InvalidArgumentError, match="encode_labels"):
        MappedCollection(paths, obs_keys=["donor"], encode_labels=["cell_type"])
    with pytest.raises(errors.InvalidArgumentError, match="unknown_label"):
        MappedCollection(paths, obs_keys=["donor"], encode_labels=["donor"],
                         unknown_label={"cell_type": "x"})


def test_obs_filter_keeps_the_rows_that_match_every_column(files: Any) -> None:
    paths, adatas = files
    flt = {"cell_type": ["B", "T"], "donor": "d1"}
    with MappedCollection(paths, obs_keys=["cell_type", "donor"], obs_filter=flt,
                          encode_labels=False) as ds:
        kept = [a.obs[a.obs["cell_type"].isin(["B", "T"]) & (a.obs["donor"] == "d1")]
                for a in adatas]
        assert ds.n_obs_list == [len(k) for k in kept]
        got = [(ds[i]["cell_type"], ds[i]["donor"]) for i in range(len(ds))]
        assert got == [(r.cell_type, r.donor) for k in kept for r in k.itertuples()]
    with MappedCollection(paths, obs_keys=["cell_type"], obs_filter={"tissue": "lung"}) as ds:
        assert ds.n_obs_list[1] == 0  # a file without the column keeps nothing


def test_missing_keys_are_left_out_or_filled(files: Any) -> None:
    paths, adatas = files
    with MappedCollection(paths, obs_keys=["cell_type", "tissue", "n_counts"],
                          obsm_keys=["X_pca"], layers_keys=["X", "raw.X"]) as ds:
        assert "tissue" not in ds[70]
        assert "obsm_X_pca" not in ds[70]
        batch = ds.__getitems__([0, 70])
        with pytest.raises(errors.NameNotFoundError, match="fill_missing"):
            batch.stacked()
    with MappedCollection(paths, obs_keys=["cell_type", "tissue", "n_counts"],
                          obsm_keys=["X_pca"], layers_keys=["X", "raw.X"],
                          unknown_label={"tissue": "gut"}, fill_missing=True) as ds:
        item = ds[70]
        assert item["tissue"] == -1  # the unknown label's code
        assert np.isnan(item["obsm_X_pca"]).all()
        assert np.isnan(item["raw.X"]).all()
        stacked = ds[[0, 70, 1]]
        assert stacked["tissue"].tolist()[1] == -1
        assert stacked["X"].shape == (3, ds.n_vars)
        # the rows that have raw.X hold its values (zeros included), the one without NaN
        raw = np.asarray(stacked["raw.X"])
        assert np.isnan(raw[1]).all()
        for at, i in ((0, 0), (2, 1)):
            np.testing.assert_array_equal(raw[at], _row(adatas[0], "raw.X", i))
    with pytest.raises(errors.NameNotFoundError, match="nope"):
        MappedCollection(paths, obs_keys=["nope"])


def test_dtype_applies_to_layers_and_obsm(files: Any) -> None:
    paths, _ = files
    with MappedCollection(paths, layers_keys=["X"], obsm_keys=["X_pca"],
                          dtype="float64") as ds:
        item = ds[3]
        assert item["X"].dtype == np.float64
        assert item["obsm_X_pca"].dtype == np.float64


def test_stacked_batches_and_collate_equal_default_collate(files: Any) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import default_collate

    from lamin_io.loaders import collate

    paths, _ = files
    with MappedCollection(paths, obs_keys=["cell_type"], layers_keys=["X", "counts"],
                          join="outer") as ds:
        order = [100, 3, 3, 150, 61, 0]
        default = default_collate([ds[i] for i in order])
        fast = collate(ds.__getitems__(order))
        assert list(fast) == list(default)
        for key in default:
            assert fast[key].dtype == default[key].dtype, key
            torch.testing.assert_close(fast[key], default[key], equal_nan=True)
        sparse = collate(ds.__getitems__(order), sparse=True)
        torch.testing.assert_close(sparse["X"].to_dense(), default["X"])
        stacked = ds[order]
        np.testing.assert_array_equal(stacked["X"], default["X"].numpy())


def test_errors_are_typed(files: Any, tmp_path: Path) -> None:
    paths, _ = files
    with pytest.raises(errors.InvalidArgumentError, match="join"):
        MappedCollection(paths, join="left")
    with pytest.raises(errors.InvalidArgumentError, match="empty"):
        MappedCollection([])
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(errors.LaminIOError):
        MappedCollection([tmp_path / "t.csv"])
    ds = MappedCollection(paths)
    with pytest.raises(errors.IndexOutOfRangeError):
        ds[len(ds)]
    ds.close()
    assert ds.closed


def test_pickles_small_and_reads_after(files: Any) -> None:
    paths, adatas = files
    ds = MappedCollection(paths, obs_keys=["cell_type"])
    first = ds[10]
    blob = pickle.dumps(ds)
    assert len(blob) < 64_000  # paths, indices and encoders: no data, no handle
    copy = pickle.loads(blob)  # noqa: S301 (our own bytes)
    _assert_items(copy[10], first)
    copy.close()
    ds.close()


def test_s3_files_read_like_local_ones(files: Any, s3_endpoint: str) -> None:
    paths, adatas = files
    remote = [upload(p, s3_endpoint) for p in paths]
    want = _expected(adatas, "inner", layers=["X"], obs_keys=["cell_type"], obsm_keys=[])
    with MappedCollection([str(r) for r in remote], obs_keys=["cell_type"],
                          storage_options={"endpoint_url": s3_endpoint}) as ds:
        order = np.random.default_rng(3).permutation(len(ds))[:40]
        for got, i in zip(ds.__getitems__(order), order.tolist(), strict=True):
            _assert_items(got, want[i])


@pytest.mark.parametrize("stream", [False, True])
def test_collection_mapped_reads_the_members_in_order(files: Any, conn: Any,
                                                      stream: bool) -> None:
    import lamin_io as ln

    paths, adatas = files
    saved = [ln.Artifact(p, key=f"atlas/{p.name}").save() for p in paths]
    table = ln.Artifact(_csv(paths[0].parent), key="atlas/t.csv").save()
    collection = ln.Collection([saved[2], table, saved[0]], key="atlas").save()
    with collection.mapped(obs_keys="cell_type", join="outer", stream=stream) as ds:
        assert len(ds.path_list) == 2  # the table is left out
        want = _expected([adatas[2], adatas[0]], "outer", layers=["X"],
                         obs_keys=["cell_type"], obsm_keys=[])
        assert len(ds) == len(want)
        for got, i in zip(ds.__getitems__(range(0, len(ds), 7)), range(0, len(ds), 7),
                          strict=True):
            _assert_items(got, want[i])


def _csv(folder: Path) -> Path:
    path = folder / "t.csv"
    path.write_text("a,b\n1,2\n")
    return path


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_read_the_same_batches(files: Any, method: str) -> None:
    """Workers pickle the dataset small and open their own files (no init function)."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from lamin_io.loaders import collate

    paths, _ = files
    with MappedCollection(paths, obs_keys=["cell_type"], join="outer") as ds:
        ds[0]  # opened in the parent first: a forked worker must not reuse those handles
        single = list(DataLoader(ds, batch_size=16, collate_fn=collate))
        workers = list(DataLoader(ds, batch_size=16, collate_fn=collate, num_workers=2,
                                  multiprocessing_context=method))
    assert len(single) == len(workers) == -(-len(ds) // 16)
    for a, b in zip(single, workers, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], equal_nan=True)
