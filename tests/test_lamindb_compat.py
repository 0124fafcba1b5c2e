"""Code written for lamindb keeps working: unsaved artifacts, keywords, versions by key."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import snapshot, upload, write_bytes

import lamin_io as ln
from lamin_io import errors

if TYPE_CHECKING:
    from pathlib import Path


def small_adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    return ad.AnnData(rng.poisson(1.0, (20, 6)).astype(np.float32),
                      obs=pd.DataFrame({"g": pd.Categorical(list("ab") * 10)},
                                       index=[f"c{i}" for i in range(20)]),
                      var=pd.DataFrame(index=[f"g{i}" for i in range(6)]))


def assert_same(got: ad.AnnData, truth: ad.AnnData) -> None:
    assert list(got.obs_names) == list(truth.obs_names)
    assert list(got.var_names) == list(truth.var_names)
    np.testing.assert_array_equal(np.asarray(got.X), np.asarray(truth.X))


# -- an artifact not saved yet reads its own file -------------------------------------------


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_unsaved_artifact_opens_loads_and_caches_its_file(conn: Any, tmp_path: Path,
                                                          suffix: str) -> None:
    truth = small_adata()
    path = tmp_path / f"pbmc{suffix}"
    truth.write_h5ad(path) if suffix == ".h5ad" else truth.write_zarr(path)
    before = snapshot(conn)
    artifact = ln.Artifact(path, key=f"pbmc/raw{suffix}")
    assert artifact.cache() == path
    assert_same(artifact.load(), truth)
    with artifact.open() as adata:
        assert_same(adata[adata.obs["g"] == "a"].to_memory(), truth[truth.obs["g"] == "a"])
    # lamindb's keywords are taken; an unsaved artifact is no run input, and nothing of it
    # is written to the registry or to storage
    assert_same(artifact.load(is_run_input=True, mute=True), truth)
    artifact.cache(is_run_input=True)
    artifact.open(is_run_input=True).close()
    assert snapshot(conn) == before
    saved = artifact.save()
    assert saved.key == f"pbmc/raw{suffix}"
    assert_same(saved.load(is_run_input=False), truth)


def test_unsaved_table_and_s3_source(conn: Any, tmp_path: Path, s3_endpoint: str) -> None:
    local = write_bytes(tmp_path / "t.csv", b"a,b\n1,x\n2,y\n")
    truth = pd.read_csv(local)
    before = snapshot(conn)
    pd.testing.assert_frame_equal(ln.Artifact(local).load(), truth)
    assert ln.Artifact(local).open().to_table().to_pandas().equals(truth)
    remote = upload(local, s3_endpoint)
    artifact = ln.Artifact(str(remote), storage_options={"endpoint_url": s3_endpoint})
    cached = artifact.cache(mute=True)  # downloaded into the cache, verified
    assert cached.read_bytes() == local.read_bytes()
    assert artifact.cache(mute=True) == cached  # once
    pd.testing.assert_frame_equal(artifact.load(mute=True), truth)
    assert artifact.open().to_table().to_pandas().equals(truth)
    assert snapshot(conn) == before


def test_unsaved_s3_source_is_read_once(conn: Any, tmp_path: Path, s3_server: Any,
                                        s3_endpoint: str) -> None:
    """cache() of an unsaved S3 file or folder downloads it once, hashing on the way (it was
    read twice: hashed, then downloaded), into the place a saved one's copy would take."""
    from conftest import BUCKET

    from lamin_io.storage import cache_dir, hash_path

    folder = tmp_path / "parts.parquet"
    folder.mkdir()
    pd.DataFrame({"a": range(50)}).to_parquet(folder / "p0.parquet")
    pd.DataFrame({"a": range(50, 90)}).to_parquet(folder / "p1.parquet")
    single = write_bytes(tmp_path / "t.csv", b"a,b\n" + b"1,x\n" * 5000)
    for local in (single, folder):
        remote = upload(local, s3_endpoint)
        key = f"/{BUCKET}/{remote.path.split('/', 1)[1]}"
        size = sum(p.stat().st_size for p in [local, *local.rglob("*")] if p.is_file())
        artifact = ln.Artifact(str(remote), storage_options={"endpoint_url": s3_endpoint})
        s3_server.reset()
        cached = artifact.cache(mute=True)
        read = sum(n for _, path, _, n in s3_server.stats.gets() if path.startswith(key))
        assert read == size
        assert cached == cache_dir() / hash_path(remote, mute=True)[0] / local.name
        pd.testing.assert_frame_equal(artifact.load(mute=True), ln.Artifact(local).load())


class _Recording(ln.Artifact):
    """An artifact that lists what its lineage hook (``_read_as_input``) was told."""

    inputs: list[bool | None]

    def _read_as_input(self, *, is_run_input: bool | None) -> None:
        self.inputs.append(is_run_input)
        super()._read_as_input(is_run_input=is_run_input)


def test_each_read_is_one_run_input(conn: Any, tmp_path: Path) -> None:
    """load() told the hook twice (once through cache()); a write-mode open() never passed
    on its is_run_input."""
    path = tmp_path / "x.zarr"
    small_adata().write_zarr(path)
    artifact = _Recording(path, key="x.zarr")
    artifact.inputs = []
    artifact.save()
    artifact.load(is_run_input=True)
    artifact.cache(is_run_input=False)
    artifact.open().close()
    with artifact.open("r+", is_run_input=True):
        pass
    assert artifact.inputs == [True, False, None, True]


def test_unsaved_artifact_whose_file_went_away(conn: Any, tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    artifact = ln.Artifact(path)
    path.unlink()
    for read in (artifact.cache, artifact.load, artifact.open):
        with pytest.raises(errors.PathNotFoundError, match="t.csv"):
            read()


# -- keywords a format does not take ---------------------------------------------------------


@pytest.fixture
def h5ad(conn: Any, tmp_path: Path) -> Path:
    path = tmp_path / "x.h5ad"
    small_adata().write_h5ad(path)
    return path


def test_engine_on_an_h5ad_is_unsupported(h5ad: Path) -> None:
    saved = ln.Artifact(h5ad, key="x.h5ad").save()
    for open_ in (lambda: ln.open(h5ad, engine="polars"),
                  lambda: saved.open(engine="polars"),
                  lambda: ln.Artifact(h5ad).open(engine="polars")):
        with pytest.raises(errors.UnsupportedFormatError) as info:
            open_()
        text = str(info.value)
        assert "open() of anndata (.h5ad) does not take engine=" in text
        assert "it takes no keyword arguments" in text
        assert "engine= is taken by open() of parquet, csv" in text
    with pytest.raises(errors.UnsupportedFormatError,
                       match=r"load\(\) of anndata \(\.h5ad\) does not take engine=; it takes "
                             r"as_sparse=, as_sparse_fmt=, backed=, chunk_size="):
        saved.load(engine="polars")


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_compression_is_unsupported_where_no_reader_takes_it(conn: Any, tmp_path: Path,
                                                             suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    truth = small_adata()
    truth.write_h5ad(path) if suffix == ".h5ad" else truth.write_zarr(path)
    artifact = ln.Artifact(path)
    with pytest.raises(errors.UnsupportedFormatError, match="does not take compression="):
        artifact.load(compression=None)
    with pytest.raises(errors.UnsupportedFormatError, match="does not take compression="):
        artifact.open(compression=None)
    if suffix == ".zarr":  # anndata.read_zarr takes no options at all
        with pytest.raises(errors.UnsupportedFormatError, match="it takes no keyword"):
            artifact.load(as_sparse=["X"])
    else:  # what read_h5ad takes still goes to it
        loaded = artifact.load(as_sparse=["X"])
        np.testing.assert_array_equal(loaded.X.toarray(), truth.X)


def test_table_keywords_follow_the_engine(conn: Any, tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "t.csv", b"a,b\n1,x\n2,y\n3,z\n")
    artifact = ln.Artifact(path, key="t.csv").save()
    with pytest.raises(errors.UnsupportedFormatError,
                       match=r"open\(\) of csv \(\.csv\) does not take n_rows=; it takes "
                             r"engine=, exclude_invalid_files="):
        artifact.open(n_rows=1)  # a polars keyword, with the pyarrow engine
    with artifact.open(engine="polars", n_rows=2) as lf:
        assert lf.collect()["a"].to_list() == [1, 2]
    with pytest.raises(errors.UnsupportedFormatError, match="does not take partitioning="):
        artifact.open(engine="polars", partitioning="hive")  # pyarrow's, with polars
    with pytest.raises(errors.UnsupportedFormatError, match="does not take nrows="):
        ln.Artifact.filter(key="t.csv").open(nrows=1)
    assert len(artifact.load(nrows=2)) == 2  # pandas.read_csv's keyword
    with pytest.raises(errors.UnsupportedFormatError, match="load.. of csv .* storage_options"):
        artifact.load(storage_options={})  # lamin-io gives the storage's own


def test_table_load_keywords_follow_file_or_folder(conn: Any, tmp_path: Path) -> None:
    """load() of a single table file takes the pandas reader's keywords only, of a folder
    pyarrow.dataset's only: the other's passed the check and failed as a raw TypeError."""
    from lamin_io.accessors._tables import load_table
    from lamin_io.storage import to_upath

    single = write_bytes(tmp_path / "t.csv", b"a,b\n1,x\n2,y\n3,z\n")
    folder = tmp_path / "parts.csv"
    folder.mkdir()
    write_bytes(folder / "p0.csv", b"a,b\n1,x\n")
    write_bytes(folder / "p1.csv", b"a,b\n2,y\n")
    saved = [ln.Artifact(p, key=p.name).save() for p in (single, folder)]
    for file_art, folder_art in (saved, (ln.Artifact(single), ln.Artifact(folder))):
        with pytest.raises(errors.UnsupportedFormatError,
                           match=r"load\(\) of csv \(\.csv\) does not take partitioning="):
            file_art.load(partitioning="hive")  # pyarrow.dataset's
        with pytest.raises(errors.UnsupportedFormatError,
                           match=r"load\(\) of csv \(\.csv, a folder\) does not take nrows="):
            folder_art.load(nrows=1)  # pandas.read_csv's
        assert len(file_art.load(nrows=2)) == 2
        assert len(folder_art.load(exclude_invalid_files=True)) == 2
    # the loader itself refuses them too, whoever calls it
    with pytest.raises(errors.UnsupportedFormatError, match="does not take partitioning="):
        load_table(to_upath(single), partitioning="hive")
    with pytest.raises(errors.UnsupportedFormatError, match="does not take nrows="):
        load_table(to_upath(folder), nrows=1)


def test_soma_keywords(conn: Any, tmp_path: Path) -> None:
    pytest.importorskip("tiledbsoma")
    truth = small_adata()
    artifact = ln.save_tiledbsoma_experiment([truth], key="x.tiledbsoma", mute=True)
    with pytest.raises(errors.UnsupportedFormatError, match="takes soma_type=, tiledb_timestamp="):
        artifact.open(engine="polars")
    with pytest.raises(errors.UnsupportedFormatError, match="does not take context="):
        artifact.open(context=None)  # lamin-io builds the context from the storage
    assert artifact.load(obs_id_name="obs_id").n_obs == truth.n_obs


# -- versions: the key of a family ----------------------------------------------------------


def _ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """lamin-io's records: others (asyncio's note on a session that the garbage collector
    of a loaded machine closes late, say) come from whatever ran before."""
    return [r for r in caplog.records if r.name.split(".")[0] == "lamin_io"]


def test_revises_keeps_the_key_or_says_it_changes(conn: Any, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    v1 = ln.Artifact(write_bytes(tmp_path / "a.csv", b"a\n1\n"), key="old/t.csv").save()
    v2 = ln.Artifact(write_bytes(tmp_path / "b.csv", b"a\n2\n"), revises=v1).save()
    assert (v2.key, v2.version) == ("old/t.csv", "2")  # the family's key, as in lamindb
    assert not _ours(caplog)
    with caplog.at_level(logging.WARNING, logger="lamin_io"):
        v3 = ln.Artifact(write_bytes(tmp_path / "c.csv", b"a\n3\n"), key="new/t.csv",
                         revises=v2).save()
    assert (v3.key, v3.version) == ("new/t.csv", "3")
    assert [r.getMessage() for r in _ours(caplog)] == [
        "the family of 'old/t.csv' now has key 'new/t.csv': version 3 was saved under the new "
        "key, so Artifact.get(key='new/t.csv') returns it and 'old/t.csv' keeps only the "
        "earlier versions"]
    assert ln.Artifact.get(key="new/t.csv") == v3
    assert v3.versions[0] == v1

