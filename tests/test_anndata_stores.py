"""Write-back, old layouts, generic and SpatialData stores, and bad inputs of ``open()``."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import zarr
from anndata_truth import assert_adata_equal, make_adata

import lamin_io as ln
from lamin_io import errors
from lamin_io.accessors._backed import BackedAccessor
from lamin_io.accessors._spatialdata import SpatialDataAccessor

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture
def zarr_store(tmp_path: Path) -> Path:
    path = tmp_path / "pbmc.zarr"
    make_adata("csr").write_zarr(path)
    return path


def test_add_column_round_trip(zarr_store: Path) -> None:
    n_obs = ad.read_zarr(zarr_store).n_obs
    with ln.open(zarr_store, mode="r+") as acc:
        acc.add_column(where="obs", col_name="score", col=np.arange(n_obs, dtype=np.float64))
        acc.add_column(where="obs", col_name="label", col=[f"l{i % 3}" for i in range(n_obs)])
        acc.add_column(where="var", col_name="group",
                       col=pd.Categorical(["a", "b"] * (acc.n_vars // 2)))
        assert list(acc.obs["score"][:3]) == [0.0, 1.0, 2.0]  # visible before closing
    reread = ad.read_zarr(zarr_store)
    np.testing.assert_array_equal(reread.obs["score"], np.arange(n_obs))
    assert list(reread.obs["label"][:4]) == ["l0", "l1", "l2", "l0"]
    assert isinstance(reread.var["group"].dtype, pd.CategoricalDtype)
    # metadata was re-consolidated: a consolidated open sees the new column
    group = zarr.open_group(zarr_store, mode="r", use_consolidated=True)
    assert "score" in group["obs"]


def test_add_column_errors(zarr_store: Path, tmp_path: Path) -> None:
    with ln.open(zarr_store) as acc, pytest.raises(errors.WriteNotSupportedError, match="r\\+"):
        acc.add_column(where="obs", col_name="x", col=np.zeros(acc.n_obs))
    with ln.open(zarr_store, mode="r+") as acc:
        with pytest.raises(errors.InvalidArgumentError, match="values"):
            acc.add_column(where="obs", col_name="x", col=np.zeros(3))
        with pytest.raises(errors.InvalidArgumentError, match="already"):
            acc.add_column(where="obs", col_name="cell_type", col=np.zeros(acc.n_obs))
        with pytest.raises(errors.InvalidArgumentError, match="where"):
            acc.add_column(where="uns", col_name="x", col=np.zeros(acc.n_obs))
        with pytest.raises(errors.InvalidArgumentError, match="subset"):
            acc[:5].add_column(where="obs", col_name="x", col=np.zeros(5))
    h5ad = tmp_path / "x.h5ad"
    make_adata("csr").write_h5ad(h5ad)
    for mode in ("r+", "w"):
        with pytest.raises(errors.WriteNotSupportedError, match="h5ad"):
            ln.open(h5ad, mode=mode)
    with pytest.raises(errors.InvalidArgumentError, match="mode"):
        ln.open(h5ad, mode="a")


def test_artifact_open_r_plus_saves_a_new_version(conn, zarr_store: Path) -> None:
    v1 = ln.Artifact(zarr_store, key="atlas/pbmc.zarr").save()
    with v1.open(mode="r+") as acc:
        acc.add_column(where="obs", col_name="qc", col=np.ones(acc.n_obs))
    v2 = ln.Artifact.get(key="atlas/pbmc.zarr")
    assert v2.version == "2"
    assert v2.uid != v1.uid
    assert "qc" in v2.load().obs.columns
    assert "qc" not in v1.load().obs.columns  # the registered version stays as it was
    with v1.open() as acc:  # artifact.open in read mode works where the bytes lie
        assert acc.shape == v2.load().shape


def test_artifact_open_h5ad(conn, tmp_path: Path) -> None:
    path = tmp_path / "a.h5ad"
    truth = make_adata("dense")
    truth.write_h5ad(path)
    artifact = ln.Artifact(path, key="a.h5ad").save()
    with artifact.open() as acc:
        assert_adata_equal(acc[::7, ["gene_3"]].to_memory(), ad.read_h5ad(path)[::7, ["gene_3"]])
    with pytest.raises(errors.WriteNotSupportedError):
        artifact.open(mode="r+")


def _legacy_h5ad(path: Path) -> None:
    """An h5ad as anndata 0.6 wrote it: structured obs/var, categories in uns, no encodings."""
    obs = np.array([(b"c0", 0, 1.5), (b"c1", 1, 2.5), (b"c2", 0, 3.5)],
                   dtype=[("index", "S2"), ("louvain", "i1"), ("n_counts", "f8")])
    var = np.array([(b"g0",), (b"g1",)], dtype=[("index", "S2")])
    with h5py.File(path, "w") as f:
        f["X"] = np.arange(6, dtype=np.float32).reshape(3, 2)
        f["obs"] = obs
        f["var"] = var
        f["uns/louvain_categories"] = np.array([b"B", b"T"])
        f["uns/note"] = np.array([1, 2, 3])


def test_old_h5ad_layout_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.h5ad"
    _legacy_h5ad(path)
    expected = ad.read_h5ad(path)
    with ln.open(path) as acc:
        assert list(acc.obs_names) == ["c0", "c1", "c2"]
        sub = acc[[2, 0], ["g1"]]
        np.testing.assert_array_equal(sub.X, expected[[2, 0], ["g1"]].X)
        got = acc.to_memory()
    assert list(got.obs["louvain"]) == list(expected.obs["louvain"])
    assert isinstance(got.obs["louvain"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(got.obs["n_counts"], expected.obs["n_counts"])
    np.testing.assert_array_equal(got.X, expected.X)
    assert set(got.uns) == set(expected.uns)


def test_old_sparse_without_encoding(tmp_path: Path) -> None:
    import scipy.sparse as sp

    m = sp.random(6, 4, density=0.5, format="csr", dtype=np.float32, random_state=1)
    path = tmp_path / "h5sparse.h5ad"
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs["h5sparse_format"] = "csr"
        g.attrs["h5sparse_shape"] = m.shape
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        f["obs"] = np.array([(f"c{i}".encode(),) for i in range(6)], dtype=[("index", "S2")])
        f["var"] = np.array([(f"g{i}".encode(),) for i in range(4)], dtype=[("index", "S2")])
    with ln.open(path) as acc:
        got = acc[[4, 1], [3, 0]].X.toarray()
    np.testing.assert_array_equal(got, m[[4, 1]][:, [3, 0]].toarray())


def test_gzipped_h5ad(tmp_path: Path) -> None:
    plain = tmp_path / "a.h5ad"
    truth = make_adata("csr")
    truth.write_h5ad(plain)
    gz = tmp_path / "a.h5ad.gz"
    with plain.open("rb") as fin, gzip.open(gz, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    with ln.open(gz) as acc:
        assert_adata_equal(acc[5:9].to_memory(), ad.read_h5ad(plain)[5:9].copy())


def _compressed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The same h5ad plain, gzipped, and in a .h5ad.tar.gz (a folder and an AppleDouble
    file before it in the archive, as macOS tar writes)."""
    import tarfile

    plain = tmp_path / "a.h5ad"
    make_adata("csr").write_h5ad(plain)
    gz = tmp_path / "a.h5ad.gz"
    with plain.open("rb") as fin, gzip.open(gz, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    (tmp_path / "._a.h5ad").write_bytes(b"\0" * 10)
    tgz = tmp_path / "a.h5ad.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "._a.h5ad", arcname="data/._a.h5ad")
        tar.add(plain, arcname="data/a.h5ad")
    return plain, gz, tgz


def test_h5ad_tar_gz_opens_and_loads(tmp_path: Path) -> None:
    import tarfile

    plain, _, tgz = _compressed(tmp_path)
    truth = ad.read_h5ad(plain)
    with ln.open(tgz) as acc:
        assert_adata_equal(acc[5:9, ["gene_3", "gene_1"]].to_memory(),
                           truth[5:9, ["gene_3", "gene_1"]].copy())
    from lamin_io.accessors._anndata import load_anndata
    from lamin_io.storage import to_upath

    assert_adata_equal(load_anndata(to_upath(tgz)), truth)
    empty = tmp_path / "empty.h5ad.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        tar.add(tmp_path / "._a.h5ad", arcname="notes.txt")
    with pytest.raises(errors.UnsupportedFormatError, match="holds no .h5ad"):
        ln.open(empty)
    (tmp_path / "cut.h5ad.tar.gz").write_bytes(tgz.read_bytes()[:100])
    with pytest.raises(errors.CorruptArtifactError, match="cut.h5ad.tar.gz"):
        ln.open(tmp_path / "cut.h5ad.tar.gz")


def test_damaged_tar_gz_closes_what_it_opened(tmp_path: Path) -> None:
    """An archive that breaks while its members are listed closes its TarFile and the
    GzipFile it reads through (they stayed open), and leaves the caller's file open."""
    import gc
    import io
    import tarfile

    from lamin_io.accessors.readpath.source import h5ad_member
    from lamin_io.storage import to_upath

    (tmp_path / "notes.bin").write_bytes(np.random.default_rng(0).bytes(1 << 20))
    whole = tmp_path / "whole.h5ad.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        tar.add(tmp_path / "notes.bin", arcname="notes.bin")  # before the .h5ad
        tar.add(tmp_path / "notes.bin", arcname="a.h5ad")
    raw = io.BytesIO(whole.read_bytes()[: whole.stat().st_size // 4])
    with pytest.raises(errors.CorruptArtifactError, match="not a readable .tar.gz") as info:
        h5ad_member(raw, to_upath(whole))  # the first header reads; the listing breaks
    assert info.value.__cause__ is not None  # kept alive: its traceback holds the archive
    left_open = [f for f in gc.get_objects()
                 if isinstance(f, gzip.GzipFile) and f.fileobj is raw]
    assert left_open == []
    assert not raw.closed


def test_n_observations_recorded_for_anndata(conn, tmp_path: Path) -> None:
    """lamindb records n_observations of .h5ad, .h5ad.gz and .h5ad.tar.gz (one suffix)."""
    n_obs = make_adata("csr").n_obs
    for path in _compressed(tmp_path):
        artifact = ln.Artifact(path, key=f"atlas/{path.name}").save()
        assert (artifact.suffix, artifact.n_observations) == (path.name[1:], n_obs)
        assert_adata_equal(artifact.load(), ad.read_h5ad(tmp_path / "a.h5ad"))
    with pytest.raises(errors.InvalidKeyError, match=".h5ad.tar.gz"):
        ln.Artifact(tmp_path / "a.h5ad.tar.gz", key="atlas/b.tar.gz").save()
    make_adata("dense").write_zarr(tmp_path / "d.zarr")
    assert ln.Artifact(tmp_path / "d.zarr", key="d.zarr").save().n_observations == n_obs
    group = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    group.create_array("a", data=np.arange(5))
    assert ln.Artifact(tmp_path / "plain.zarr", key="plain.zarr").save().n_observations is None


def test_generic_hdf5_and_zarr(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["values"] = np.arange(10)
    with ln.open(tmp_path / "plain.h5") as acc:
        assert isinstance(acc, BackedAccessor)
        assert isinstance(acc.storage, h5py.File)
        np.testing.assert_array_equal(acc["values"][2:4], [2, 3])
    assert acc.closed
    group = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    group.create_array("a", data=np.arange(5))
    with ln.open(tmp_path / "plain.zarr") as acc:
        assert isinstance(acc, BackedAccessor)
        assert isinstance(acc.storage, zarr.Group)
        np.testing.assert_array_equal(acc["a"][:], np.arange(5))
    with pytest.raises(errors.AccessorClosedError):
        acc["a"]
    with pytest.raises(errors.WriteNotSupportedError):
        ln.open(tmp_path / "plain.h5", mode="r+")
    # an AnnData stored as .h5 is recognized by its content
    make_adata("csr").write_h5ad(tmp_path / "cells.h5")
    with ln.open(tmp_path / "cells.h5") as acc:
        assert type(acc).__name__ == "AnnDataAccessor"


def test_spatialdata_tables(tmp_path: Path) -> None:
    from anndata.io import write_elem

    truth = make_adata("csr")
    root = zarr.open_group(tmp_path / "sdata.zarr", mode="w")
    root.attrs["spatialdata_attrs"] = {"version": "0.2"}
    root.create_group("images")
    write_elem(root.create_group("tables"), "cells", truth)
    with ln.open(tmp_path / "sdata.zarr") as sdata:
        assert isinstance(sdata, SpatialDataAccessor)
        assert list(sdata.tables) == ["cells"]
        table = sdata.tables["cells"]
        expected = ad.read_zarr(tmp_path / "sdata.zarr/tables/cells")
        assert_adata_equal(table[10:30, ["gene_2", "gene_9"]].to_memory(),
                           expected[10:30, ["gene_2", "gene_9"]].copy())
        with pytest.raises(errors.NameNotFoundError, match="cells"):
            sdata.tables["nope"]
        assert "tables: cells" in repr(sdata)


def test_truncated_h5ad(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5ad"
    make_adata("csr").write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(errors.CorruptArtifactError, match="cut.h5ad"):
        with ln.open(path) as acc:
            _ = acc.X


def test_corrupt_zarr_metadata(zarr_store: Path) -> None:
    (zarr_store / ".zmetadata").unlink(missing_ok=True)
    (zarr_store / ".zattrs").write_text("{ not json")
    with pytest.raises(errors.CorruptArtifactError, match="pbmc.zarr"):
        ln.open(zarr_store)


def test_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(errors.PathNotFoundError):
        ln.open(tmp_path / "nope.h5ad")
    (tmp_path / "notes.xyz").write_text("x")
    with pytest.raises(errors.UnsupportedFormatError, match=".h5ad"):
        ln.open(tmp_path / "notes.xyz")
    (tmp_path / "not_hdf5.h5ad").write_text("plain text")
    with pytest.raises(errors.CorruptArtifactError):
        ln.open(tmp_path / "not_hdf5.h5ad")
    json.dumps({})  # keep the import used for the metadata test above
