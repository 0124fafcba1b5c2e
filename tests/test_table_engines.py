"""Tables past one machine: ``open(engine="dask")`` and ``open(engine="ray")``.

A collection of parquet (and csv) artifacts hands itself to Dask and to Ray with the same
files and storage settings, each computed on a real local cluster of two worker processes
(``distributed.LocalCluster``, ``ray.init(num_cpus=2)``), locally and on the loopback S3
server. Pushdown is checked by what the server sent: a one-column read of files whose other
column is large fetches a small part of their bytes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import lamin_io as ln
from lamin_io import errors

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

N_FILES, N_ROWS = 3, 2000
#: Bytes of incompressible payload a row: the column a projection leaves unread.
PAYLOAD = 256


@pytest.fixture(scope="module")
def dask_client(s3_server: Any) -> Iterator[Any]:
    """Two worker processes; started after the S3 server, they see its AWS environment."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def ray_cluster(s3_server: Any) -> Iterator[None]:
    """Two worker processes; started after the S3 server, they see its AWS environment."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(0)
    return [pd.DataFrame({
        "x": np.arange(i * N_ROWS, (i + 1) * N_ROWS, dtype=np.int64),
        "g": rng.choice(["a", "b", "c"], N_ROWS),
        "payload": [os.urandom(PAYLOAD) for _ in range(N_ROWS)]}) for i in range(N_FILES)]


@pytest.fixture
def tables(conn: Any, tmp_path: Path) -> tuple[Any, pd.DataFrame]:
    """A collection of parquet artifacts in the connection's storage, and all its rows."""
    frames = _frames()
    artifacts = []
    for i, frame in enumerate(frames):
        path = tmp_path / f"part{i}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path,
                       row_group_size=500, compression="none")
        artifacts.append(ln.Artifact(path, key=f"parts/part{i}.parquet").save(mute=True))
    return ln.Collection(artifacts, key="parts").save(), pd.concat(frames, ignore_index=True)


def _sent(request: pytest.FixtureRequest, conn: Any) -> Any:
    """The S3 server's counters when the storage is on S3 (else ``None``), reset now."""
    if not str(conn.settings.root).startswith("s3://"):
        return None
    server = request.getfixturevalue("s3_server")
    server.reset()
    return server.stats


def _rows(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame[columns].sort_values("x").reset_index(drop=True)


def test_dask_dataframe_with_pushdown(dask_client: Any, conn: Any, tables: Any,
                                      request: pytest.FixtureRequest) -> None:
    import dask.dataframe as dd

    collection, truth = tables
    df = collection.open(engine="dask")
    assert isinstance(df, dd.DataFrame)
    assert df.npartitions >= N_FILES
    stats = _sent(request, conn)
    got = df[df.x % 7 == 0][["x", "g"]].compute()  # on the cluster's two workers
    want = truth[truth.x % 7 == 0]
    pd.testing.assert_frame_equal(_rows(got, ["x", "g"]), _rows(want, ["x", "g"]),
                                  check_dtype=False)
    if stats is not None:  # the payload column was never fetched
        assert stats.bytes_sent < N_FILES * N_ROWS * PAYLOAD / 4, stats.bytes_sent
    explicit = collection.open(engine="dask", columns=["x"], filters=[("x", ">=", 5000)])
    assert list(explicit.columns) == ["x"]
    assert sorted(explicit.compute()["x"]) == list(range(5000, N_FILES * N_ROWS))


def test_ray_dataset_with_pushdown(ray_cluster: None, conn: Any, tables: Any,
                                   request: pytest.FixtureRequest) -> None:
    import ray.data

    collection, truth = tables
    ds = collection.open(engine="ray")
    assert isinstance(ds, ray.data.Dataset)
    stats = _sent(request, conn)
    got = ds.select_columns(["x", "g"]).filter(expr="x >= 3000").to_pandas()
    want = truth[truth.x >= 3000]
    pd.testing.assert_frame_equal(_rows(got, ["x", "g"]), _rows(want, ["x", "g"]),
                                  check_dtype=False)
    if stats is not None:
        assert stats.bytes_sent < N_FILES * N_ROWS * PAYLOAD / 4, stats.bytes_sent
    explicit = collection.open(engine="ray", columns=["x"]).filter(expr="x < 100")
    assert sorted(explicit.to_pandas()["x"]) == list(range(100))
    with pytest.raises(errors.InvalidArgumentError, match="engine 'ray' refused.*filter"):
        collection.open(engine="ray", filter=pc.field("x") < 100)


@pytest.mark.parametrize("engine", ["dask", "ray"])
def test_csv_artifacts(engine: str, request: pytest.FixtureRequest, conn: Any,
                       tmp_path: Path) -> None:
    request.getfixturevalue("dask_client" if engine == "dask" else "ray_cluster")
    frames = [pd.DataFrame({"x": np.arange(i * 10, (i + 1) * 10), "y": np.arange(10) * 0.5})
              for i in range(2)]
    for i, frame in enumerate(frames):
        frame.to_csv(tmp_path / f"t{i}.csv", index=False)
        ln.Artifact(tmp_path / f"t{i}.csv", key=f"csv/t{i}.csv").save(mute=True)
    opened = ln.Artifact.filter(key__startswith="csv/").open(engine=engine)
    got = opened.compute() if engine == "dask" else opened.to_pandas()
    pd.testing.assert_frame_equal(_rows(got, ["x", "y"]),
                                  _rows(pd.concat(frames), ["x", "y"]), check_dtype=False)


@pytest.mark.parametrize("engine", ["dask", "ray"])
def test_what_the_engines_cannot_read_is_refused_before_reading(engine: str,
                                                                tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(errors.UnsupportedFormatError, match=f"engine '{engine}' cannot open"):
        ln.open(tmp_path / "t.jsonl", engine=engine)
    hive = tmp_path / "sales.parquet" / "region=eu"
    hive.mkdir(parents=True)
    pq.write_table(pa.table({"a": [1]}), hive / "part.parquet")
    with pytest.raises(errors.UnsupportedFormatError, match="hive"):
        ln.open(tmp_path / "sales.parquet", engine=engine)
