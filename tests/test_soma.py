"""TileDB-SOMA: save, append, open, query and load, locally and on the S3 server.

Every result is checked against the same selection of the AnnData objects in memory.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import BUCKET, snapshot, write_bytes

import lamin_io as ln
from lamin_io import errors
from lamin_io.storage import tiledb_config, to_upath

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

soma = pytest.importorskip("tiledbsoma")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The S3 server for these tests, in a process of its own (overrides conftest's).

    tiledbsoma holds the GIL while it waits for some S3 answers, so a server thread in the
    test process (conftest's ``s3_server``) could never answer them: TileDB then times out.
    """
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    os.environ.pop("AWS_PROFILE", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3
        import botocore.exceptions

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except botocore.exceptions.EndpointConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def make_adata(n_obs: int, first: int, categories: list[str], seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.0, (n_obs, 30)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(categories, n_obs)),
                        "n_counts": x.sum(axis=1).astype(np.float64)},
                       index=[f"cell{first + i}" for i in range(n_obs)])
    var = pd.DataFrame(index=[f"gene{i}" for i in range(30)])
    return ad.AnnData(X=x, obs=obs, var=var)


@pytest.fixture
def adatas() -> tuple[ad.AnnData, ad.AnnData]:
    """60 and 40 cells x 30 genes; the second brings a new cell type, 'NK'."""
    return make_adata(60, 0, ["B", "T"], 0), make_adata(40, 60, ["B", "NK", "T"], 1)


def dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def assert_same_cells(got: ad.AnnData, truth: ad.AnnData) -> None:
    assert list(got.obs_names) == list(truth.obs_names)
    assert list(got.var_names) == list(truth.var_names)
    np.testing.assert_array_equal(dense(got.X), dense(truth.X))
    assert list(got.obs["cell_type"].astype(str)) == list(truth.obs["cell_type"].astype(str))
    np.testing.assert_allclose(got.obs["n_counts"], truth.obs["n_counts"])


def query(exp: Any, value_filter: str) -> ad.AnnData:
    obs_query = soma.AxisQuery(value_filter=value_filter)
    with exp.axis_query("RNA", obs_query=obs_query) as q:
        return q.to_anndata(X_name="data")


def test_save_open_and_query(conn, adatas) -> None:
    a1, _ = adatas
    v1 = ln.save_tiledbsoma_experiment([a1], key="atlas/pbmc.tiledbsoma", description="pbmc")
    assert (v1.key, v1.suffix, v1.n_observations) == ("atlas/pbmc.tiledbsoma", ".tiledbsoma", 60)
    assert v1.n_files is not None
    assert "n_obs        60" in v1.describe()
    assert ln.Artifact.filter(n_observations__gte=60).one() == v1
    with v1.open() as exp:
        assert isinstance(exp, soma.Experiment)
        assert exp.mode == "r"
        assert exp.obs.count == 60
        got = query(exp, "cell_type == 'B'")
    assert_same_cells(got, a1[a1.obs["cell_type"] == "B"])


def test_append_makes_a_new_version(conn, adatas) -> None:
    a1, a2 = adatas
    v1 = ln.save_tiledbsoma_experiment(a1, key="atlas/pbmc.tiledbsoma", description="pbmc")
    v2 = ln.save_tiledbsoma_experiment([a2], revises=v1)
    assert (v2.key, v2.description, v2.version) == (v1.key, "pbmc", "2")
    assert v2.is_latest
    assert not v1.is_latest
    assert (v1.n_observations, v2.n_observations) == (60, 100)
    assert ln.Artifact.get(key="atlas/pbmc.tiledbsoma") == v2
    both = ad.concat([a1, a2])
    with v2.open() as exp:
        assert exp.obs.count == 100
        assert_same_cells(query(exp, "cell_type == 'NK'"), a2[a2.obs["cell_type"] == "NK"])
        assert_same_cells(query(exp, "cell_type == 'B'"), both[both.obs["cell_type"] == "B"])
    with v1.open() as exp:  # the registered version stays as it was
        assert exp.obs.count == 60
        assert_same_cells(query(exp, "n_counts > 30"), a1[a1.obs["n_counts"] > 30])
    assert_same_cells(v2.load(), both)
    assert_same_cells(v1.load(), a1)
    v1.verify()  # its manifest still matches the stored folder
    with pytest.raises(errors.NameNotFoundError, match="RNA"):
        v2.load(measurement_name="ATAC")


def test_a_missing_file_is_never_read(conn, adatas) -> None:
    art = ln.save_tiledbsoma_experiment([adatas[0]], key="pbmc.tiledbsoma")
    stored = art.path
    fragment = next(f for f in sorted(stored.fs.find(stored.path)) if "/X/" in f
                    and "__fragments" in f)
    stored.fs.rm(fragment)
    with pytest.raises(errors.CorruptArtifactError, match="manifest"):
        art.open()
    with pytest.raises(errors.CorruptArtifactError, match="manifest"):
        art.load()


def test_files_and_several_adatas(conn, adatas, tmp_path: Path) -> None:
    a1, a2 = adatas
    a1.write_h5ad(tmp_path / "a1.h5ad")
    a2.write_zarr(tmp_path / "a2.zarr")
    art = ln.save_tiledbsoma_experiment([tmp_path / "a1.h5ad", str(tmp_path / "a2.zarr")],
                                        key="both.tiledbsoma")
    assert art.n_observations == 100
    assert_same_cells(art.load(), ad.concat([a1, a2]))


def test_open_without_registry(conn, adatas) -> None:
    a1, _ = adatas
    art = ln.save_tiledbsoma_experiment([a1], key="pbmc.tiledbsoma")
    url = str(art.path)
    options = {"endpoint_url": conn.settings.endpoint_url} if url.startswith("s3://") else None
    ln.disconnect()
    with ln.open(url, storage_options=options) as exp:
        assert isinstance(exp, soma.Experiment)
        assert_same_cells(query(exp, "cell_type == 'T'"), a1[a1.obs["cell_type"] == "T"])
    with ln.open(url, "w", storage_options=options) as exp:  # no registry: the raw object
        assert isinstance(exp, soma.Experiment)
        assert exp.mode == "w"


def _write_then_fail(exp: Any) -> None:
    with exp:
        exp.metadata["half"] = "done"
        raise RuntimeError("boom")


def test_write_mode_on_an_artifact(conn, adatas) -> None:
    a1, _ = adatas
    v1 = ln.save_tiledbsoma_experiment([a1], key="pbmc.tiledbsoma")
    with v1.open("w") as exp:
        assert isinstance(exp.soma, soma.Experiment)
        assert exp.mode == "w"
        assert "obs" in exp
        exp.metadata["qc"] = "passed"
    v2 = exp.result
    assert exp.closed
    assert v2 != v1
    assert (v2.version, v2.is_latest) == ("2", True)
    assert v2.n_observations == 60
    with v2.open() as new, v1.open() as old:
        assert new.metadata["qc"] == "passed"
        assert "qc" not in old.metadata  # the registered version is immutable
    assert_same_cells(v2.load(), a1)

    before = snapshot(conn)
    with v2.open("w") as exp:  # nothing written: the same content, the same version
        pass
    assert exp.result == v2
    exp = v2.open("w")
    with pytest.raises(RuntimeError, match="boom"):
        _write_then_fail(exp)  # an error inside the block saves nothing
    assert exp.closed
    assert exp.result is None
    with pytest.raises(errors.WriteNotSupportedError, match="'r' or 'w'"):
        v2.open("r+")
    assert snapshot(conn) == before


def test_open_paths_modes_and_kinds(tmp_path: Path, adatas) -> None:
    a1, _ = adatas
    path = tmp_path / "exp.tiledbsoma"
    soma.io.from_anndata(str(path), a1, "RNA")
    with ln.open(path) as exp:
        assert isinstance(exp, soma.Experiment)
        assert_same_cells(query(exp, "cell_type == 'B'"), a1[a1.obs["cell_type"] == "B"])
    with ln.open(path, "w") as exp:
        assert isinstance(exp, soma.Experiment)
        assert exp.mode == "w"
    with pytest.raises(errors.WriteNotSupportedError, match="no 'r\\+'"):
        ln.open(path, "r+")
    with pytest.raises(errors.PathNotFoundError):
        ln.open(tmp_path / "missing.tiledbsoma")
    with pytest.raises(errors.PathNotFoundError, match="save_tiledbsoma_experiment"):
        ln.open(tmp_path / "missing.tiledbsoma", "w")
    (tmp_path / "empty.tiledbsoma").mkdir()
    with pytest.raises(errors.UnsupportedFormatError, match="no TileDB-SOMA"):
        ln.open(tmp_path / "empty.tiledbsoma")

    soma.Collection.create(str(tmp_path / "c.tiledbsoma")).close()
    soma.Measurement.create(str(tmp_path / "m.tiledbsoma")).close()
    with ln.open(tmp_path / "c.tiledbsoma") as coll:
        assert isinstance(coll, soma.Collection)
    with ln.open(tmp_path / "m.tiledbsoma") as ms:
        assert isinstance(ms, soma.Measurement)
    from lamin_io.accessors._soma import count_observations, load_soma

    with pytest.raises(errors.UnsupportedFormatError, match="Collection"):
        load_soma(to_upath(tmp_path / "c.tiledbsoma"))
    assert count_observations(to_upath(tmp_path / "c.tiledbsoma")) is None
    assert count_observations(to_upath(path)) == 60


def test_bad_inputs_change_nothing(conn, adatas, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    a1, a2 = adatas
    v1 = ln.save_tiledbsoma_experiment([a1], key="pbmc.tiledbsoma")
    table = ln.Artifact(write_bytes(tmp_path / "t.csv", b"a\n1\n"), key="t.csv").save()
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    before = snapshot(conn)
    named = a2.copy()
    named.obs.index.name = "barcode"
    genes = a2.copy()
    genes.var.index.name = "symbol"
    cases: list[tuple[type[Exception], str, Any, dict[str, Any]]] = [
        (errors.InvalidKeyError, "tiledbsoma", [a2], {"key": "pbmc.h5ad"}),
        (errors.InvalidKeyError, "reserved", [a2], {"key": ".lamin-io/x.tiledbsoma"}),
        (errors.InvalidArgumentError, "empty", [], {"key": "x.tiledbsoma"}),
        (errors.InvalidArgumentError, "int", [a2, 42], {"key": "x.tiledbsoma"}),
        (errors.PathNotFoundError, "missing", [tmp_path / "missing.h5ad"],
         {"key": "x.tiledbsoma"}),
        (errors.InvalidArgumentError, "no obs column 'obs_id'", [named],
         {"key": "x.tiledbsoma"}),
        (errors.InvalidArgumentError, "no var column 'var_id'", [genes],
         {"key": "x.tiledbsoma"}),
        (errors.InvalidArgumentError, "more than once", [a2, a2], {"key": "x.tiledbsoma"}),
        (errors.InvalidArgumentError, ".csv", [a2], {"revises": table}),
        (errors.InvalidArgumentError, "measurement_name", [a2],
         {"key": "x.tiledbsoma", "measurement_name": ""}),
        # the same cells again: tiledbsoma's registration refuses the repeated obs ids
        (errors.InvalidArgumentError, "cannot write", [a1], {"revises": v1}),
    ]
    for error, match, items, kwargs in cases:
        with pytest.raises(error, match=match):
            ln.save_tiledbsoma_experiment(items, **kwargs)
    assert snapshot(conn) == before
    assert list(staging.iterdir()) == []  # no staging folder left behind
    assert v1.is_latest


# -- appending obsm and varm ------------------------------------------------------------------


def with_embeddings(n_obs: int, first: int, genes: list[str], seed: int, *, pcs: int = 3,
                    loadings: int = 2) -> ad.AnnData:
    """An AnnData with obsm["X_pca"] and varm["PCs"], as scanpy leaves them."""
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(rng.poisson(1.0, (n_obs, len(genes))).astype(np.float32),
                       obs=pd.DataFrame(index=[f"cell{first + i}" for i in range(n_obs)]),
                       var=pd.DataFrame(index=genes))
    adata.obsm["X_pca"] = rng.normal(size=(n_obs, pcs)).astype(np.float32)
    adata.varm["PCs"] = rng.normal(size=(len(genes), loadings))
    return adata


def genes(lo: int, hi: int) -> list[str]:
    return [f"gene{i}" for i in range(lo, hi)]


@pytest.fixture
def local_conn(tmp_path: Path) -> Any:
    return ln.connect(tmp_path / "r.db", tmp_path / "storage")


def test_append_carries_obsm_and_varm_keeping_first_varm(local_conn) -> None:
    """obsm rows come with their cells; varm rows of shared genes stay as first written."""
    a1 = with_embeddings(30, 0, genes(0, 10), 0)
    a2 = with_embeddings(20, 30, genes(6, 14), 1)  # genes 6..9 are shared
    a2_loadings = a2.varm["PCs"].copy()
    v1 = ln.save_tiledbsoma_experiment([a1], key="emb.tiledbsoma", mute=True)
    with pytest.warns(UserWarning, match=r"adatas\[0\]: varm 'PCs' differs for 4 gene\(s\) "
                      r"written before \(e.g. 'gene6', 'gene7', 'gene8', 'gene9'\); the "
                      r"experiment keeps their first values"):
        v2 = ln.save_tiledbsoma_experiment([a2], revises=v1, mute=True)
    np.testing.assert_array_equal(a2.varm["PCs"], a2_loadings)  # the caller's object as it was
    loaded = v2.load()
    assert list(loaded.obs_names) == list(a1.obs_names) + list(a2.obs_names)
    np.testing.assert_allclose(loaded.obsm["X_pca"],
                               np.concatenate([a1.obsm["X_pca"], a2.obsm["X_pca"]]))
    pcs = pd.DataFrame(loaded.varm["PCs"], index=loaded.var_names)
    np.testing.assert_allclose(pcs.loc[genes(0, 10)], a1.varm["PCs"])  # first written
    np.testing.assert_allclose(pcs.loc[genes(10, 14)], a2.varm["PCs"][4:])  # new genes
    assert_same_cells_x(loaded, ad.concat([a1, a2], join="outer"))
    # the same policy among the AnnData of one call, and no warning where rows agree
    a3 = with_embeddings(10, 50, genes(0, 10), 2)
    a3.varm["PCs"] = a1.varm["PCs"].copy()
    with pytest.warns(UserWarning, match=r"adatas\[1\]: varm 'PCs' differs for 4 gene"):
        both = ln.save_tiledbsoma_experiment([a1, a2], key="both.tiledbsoma", mute=True)
    pcs = pd.DataFrame(both.load().varm["PCs"], index=genes(0, 14))
    np.testing.assert_allclose(pcs.loc[genes(6, 10)], a1.varm["PCs"][6:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v3 = ln.save_tiledbsoma_experiment([a3], revises=v1, mute=True)
    assert v3.n_observations == 40


def assert_same_cells_x(got: ad.AnnData, truth: ad.AnnData) -> None:
    truth = truth[:, list(got.var_names)]
    np.testing.assert_array_equal(dense(got.X), np.nan_to_num(dense(truth.X)))


def test_append_refuses_what_it_cannot_carry(local_conn, tmp_path: Path) -> None:
    a1 = with_embeddings(30, 0, genes(0, 10), 0)
    v1 = ln.save_tiledbsoma_experiment([a1], key="emb.tiledbsoma", mute=True)
    before = snapshot(local_conn)
    wide = with_embeddings(10, 30, genes(0, 10), 1, pcs=5)
    with pytest.raises(errors.InvalidArgumentError,
                       match=r"adatas\[0\]: obsm 'X_pca' has 5 columns, the experiment has 3"):
        ln.save_tiledbsoma_experiment([wide], revises=v1, mute=True)
    narrow = with_embeddings(10, 30, genes(0, 10), 1, loadings=1)
    with pytest.raises(errors.InvalidArgumentError,
                       match=r"varm 'PCs' has 1 columns, the experiment has 2"):
        ln.save_tiledbsoma_experiment([narrow], revises=v1, mute=True)
    two = [with_embeddings(10, 30, genes(0, 10), 1), with_embeddings(10, 40, genes(0, 10), 2,
                                                                     pcs=4)]
    with pytest.raises(errors.InvalidArgumentError,
                       match=r"adatas\[1\]: obsm 'X_pca' has 4 columns, adatas\[0\] has 3"):
        ln.save_tiledbsoma_experiment(two, key="new.tiledbsoma", mute=True)
    graph = with_embeddings(10, 30, genes(0, 10), 1)
    graph.obsp["connectivities"] = np.eye(10, dtype=np.float32)
    with pytest.raises(errors.InvalidArgumentError,
                       match=r"adatas\[0\] has obsp 'connectivities': appending to a "
                             r"TileDB-SOMA experiment cannot carry obsp or varp"):
        ln.save_tiledbsoma_experiment([graph], revises=v1, mute=True)
    genes_graph = with_embeddings(10, 30, genes(0, 10), 1)
    genes_graph.varp["correlation"] = np.eye(10)
    with pytest.raises(errors.InvalidArgumentError, match=r"has varp 'correlation'"):
        ln.save_tiledbsoma_experiment([a1.copy(), genes_graph], key="x.tiledbsoma", mute=True)
    assert snapshot(local_conn) == before
    # a new experiment's first AnnData may carry obsp: nothing is appended to
    first = ln.save_tiledbsoma_experiment([graph], key="graph.tiledbsoma", mute=True)
    np.testing.assert_array_equal(first.load().obsp["connectivities"].toarray(), np.eye(10))
    with pytest.raises(errors.InvalidArgumentError, match="append_obsm_varm"):
        ln.save_tiledbsoma_experiment([with_embeddings(5, 90, genes(0, 10), 3)], revises=v1,
                                      append_obsm_varm=False, mute=True)


def test_tiledb_config_translates_storage_settings() -> None:
    path = to_upath("s3://bucket/x.tiledbsoma",
                    {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIAEXAMPLE",
                     "secret": "s3cr3t-value", "client_kwargs": {"region_name": "eu-west-1"}})
    config = tiledb_config(path)
    assert config is not None
    assert {k: v for k, v in config.items() if "timeout" not in k and "tries" not in k} == {
        "vfs.s3.endpoint_override": "127.0.0.1:9000", "vfs.s3.scheme": "http",
        "vfs.s3.use_virtual_addressing": "false", "vfs.s3.region": "eu-west-1",
        "vfs.s3.aws_access_key_id": "AKIAEXAMPLE",
        "vfs.s3.aws_secret_access_key": "s3cr3t-value"}
    # bounded like every client (lamin_io.storage._options): TileDB's reads at most 3 s
    assert (config["vfs.s3.connect_timeout_ms"], config["vfs.s3.request_timeout_ms"],
            config["vfs.s3.connect_max_tries"]) == ("3000", "3000", "3")
    tuned = tiledb_config(to_upath("s3://bucket/x.tiledbsoma", {"anon": True, "config_kwargs": {
        "connect_timeout": 1, "read_timeout": 2, "retries": {"total_max_attempts": 6}}}))
    assert tuned is not None
    assert (tuned["vfs.s3.connect_timeout_ms"], tuned["vfs.s3.request_timeout_ms"],
            tuned["vfs.s3.connect_max_tries"]) == ("1000", "2000", "5")
    anon = tiledb_config(to_upath("s3://bucket/x.tiledbsoma", {"anon": True}))
    assert anon is not None
    assert anon["vfs.s3.no_sign_request"] == "true"
    assert anon["vfs.s3.scheme"] == "https"
    assert not any("aws_" in k for k in anon)
    assert tiledb_config(to_upath("/tmp/x.tiledbsoma")) is None


def test_secrets_stay_out_of_errors_and_logs(s3_endpoint: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"s3://{BUCKET}/nothing-here.tiledbsoma"
    options = {"endpoint_url": s3_endpoint, "key": "AKIAEXAMPLE", "secret": "s3cr3t-value"}
    for mode in ("r", "w"):
        with pytest.raises(errors.PathNotFoundError) as info:
            ln.open(url, mode, storage_options=options)
        assert "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in caplog.text


def test_append_is_one_input_and_one_output_of_the_run(conn, adatas) -> None:
    a1, a2 = adatas
    v1 = ln.save_tiledbsoma_experiment([a1], key="atlas/pbmc.tiledbsoma")
    with ln.track(name="append-cells") as run:
        v2 = ln.save_tiledbsoma_experiment([a2], revises=v1)
    assert [r.uid for r in run.inputs] == [v1.uid]  # the copy appended to: one read
    assert [r.uid for r in run.outputs] == [v2.uid]
    assert v2.run == run
    assert v1.run is None
