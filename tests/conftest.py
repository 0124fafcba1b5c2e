"""Shared fixtures: a real S3-protocol server on loopback, isolated registries and storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING, Any

import _environ
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BUCKET = "lamin-io-test"

# Every test process adds environment variables while polars may read the environment from
# a thread of its own: see tests/_environ.py.
_environ.install()


def upload(local: Path, endpoint: str) -> Any:
    """Copy a local file or folder to a fresh place in the test bucket; its ``UPath``."""
    from lamin_io.storage import to_upath

    remote = to_upath(f"s3://{BUCKET}/{uuid.uuid4().hex}/{local.name}",
                      {"endpoint_url": endpoint})
    remote.fs.put(str(local), remote.path, recursive=local.is_dir())
    return remote


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1 at a free port, with one bucket, counting traffic."""
    from lamin_io.testing import S3Server

    os.environ.pop("AWS_PROFILE", None)
    with S3Server(BUCKET) as server:
        yield server


@pytest.fixture(autouse=True)
def _s3_server_answers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the S3 server: it still answers, or this test is the one to blame.

    A server that stopped answering would make every later S3 test wait out its clients'
    timeouts and retries (an hour in CI): once it has stopped, later S3 tests fail at once.
    """
    if "s3_server" in request.fixturenames and _S3_STOPPED:
        pytest.fail(f"the S3 test server stopped answering {_S3_STOPPED[0]}", pytrace=False)
    yield
    if "s3_server" not in request.fixturenames:  # (also those asked for during the test)
        return
    problem = request.getfixturevalue("s3_server").unanswered()
    if problem:
        _S3_STOPPED.append(f"after {request.node.nodeid}")
        pytest.fail(f"after this test, {problem}", pytrace=False)


_S3_STOPPED: list[str] = []  # where this process's S3 test server stopped answering


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: Any) -> str:
    """The endpoint URL of the session's S3 server."""
    return str(s3_server.endpoint)


#: An S3 server that checks each request's signature against the keys of its IAM users
#: (moto's IAM authentication, from the fifth request on: before it, the bucket, and a user
#: with its policy and key). moto checks policies by API operation names (``s3:HeadObject``)
#: rather than AWS's IAM actions (``s3:GetObject``), so the user may do anything: what is
#: tested is that a wrong key is refused, not the README's list of actions.
AUTH_SERVER = """\
import json, os, sys
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
import boto3
from lamin_io.testing import S3Server
with S3Server(sys.argv[1]) as server:  # 1: the bucket
    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="member")  # 2
    iam.put_user_policy(UserName="member", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))  # 3
    key = iam.create_access_key(UserName="member")["AccessKey"]  # 4
    print(json.dumps({"endpoint": server.endpoint, "key": key["AccessKeyId"],
                      "secret": key["SecretAccessKey"]}), flush=True)
    sys.stdin.read()  # until the test closes it
"""


@pytest.fixture(scope="session")
def auth_server() -> Iterator[dict[str, Any]]:
    """:data:`AUTH_SERVER` in a process of its own (moto's authentication is per process)."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    process = subprocess.Popen([sys.executable, "-c", AUTH_SERVER, "team-bucket"], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        info = json.loads(process.stdout.readline())
        yield {"bucket": "team-bucket", **info}
    finally:
        process.stdin.close()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def anndata_archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """anndata's archive of files written by old versions (see ``anndata_archives.py``).

    Downloaded once per test process (each xdist worker has its own copy, ~2 MB).
    """
    from anndata_archives import archives

    try:
        return archives(tmp_path_factory.mktemp("anndata-archives"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def _postgres_database(base_url: str) -> Iterator[str]:
    """Create a throw-away database on the test server; drop it afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"lamin_io_test_{uuid.uuid4().hex[:12]}"
    url = make_url(base_url.replace("postgresql://", "postgresql+psycopg://", 1))
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield url.set(database=name).set(drivername="postgresql").render_as_string(
        hide_password=False)
    from lamin_io.registry import disconnect

    disconnect()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep every test's data, cache and settings inside its own tmp_path."""
    for name in ("LAMIN_IO_REGISTRY", "LAMIN_IO_STORAGE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LAMIN_IO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LAMIN_IO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LAMIN_IO_CONFIG_DIR", str(tmp_path / "config"))
    yield
    from lamin_io.registry import _run, disconnect

    _run._active = None  # (a run a failed test left active must not outlive it)
    disconnect()


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a ``lamin-io`` subprocess, its settings and data in tmp_path.

    A copy of this process's environment: a test that also takes ``s3_endpoint`` (session
    scoped, so started first) passes the server's test credentials on.
    """
    env = os.environ.copy()
    env.update(LAMIN_IO_CONFIG_DIR=str(tmp_path / "config"),
               LAMIN_IO_DATA_DIR=str(tmp_path / "data"),
               LAMIN_IO_CACHE_DIR=str(tmp_path / "cache"))
    for name in ("LAMIN_IO_REGISTRY", "LAMIN_IO_STORAGE"):
        env.pop(name, None)
    return env


@pytest.fixture(params=["sqlite", "postgres"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh registry: a SQLite file, or a database on LAMIN_IO_TEST_POSTGRES."""
    if request.param == "sqlite":
        yield str(tmp_path / "registry.db")
        return
    base = os.environ.get("LAMIN_IO_TEST_POSTGRES")
    if not base:
        pytest.skip("LAMIN_IO_TEST_POSTGRES is not set")
    yield from _postgres_database(base)


@pytest.fixture(params=["local", "s3"])
def storage_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage_root(storage_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh storage root: a local directory or a unique prefix in the test bucket."""
    if storage_kind == "local":
        return str(tmp_path / "storage")
    request.getfixturevalue("s3_endpoint")
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def conn(storage_root: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A connection to a fresh SQLite registry and a fresh local or S3 storage root."""
    import lamin_io as ln

    endpoint = request.getfixturevalue("s3_endpoint") if storage_root.startswith("s3") else None
    return ln.connect(tmp_path / "registry.db", storage_root, endpoint_url=endpoint)


@pytest.fixture
def conn_any_db(storage_root: str, registry_url: str, request: pytest.FixtureRequest) -> Any:
    """Like ``conn`` but over every registry backend (SQLite, and PostgreSQL when set)."""
    import lamin_io as ln

    endpoint = request.getfixturevalue("s3_endpoint") if storage_root.startswith("s3") else None
    return ln.connect(registry_url, storage_root, endpoint_url=endpoint)


def grouped_h5ad(path: Path, n_obs: int, n_vars: int, groups: str, seed: int) -> Any:
    """Write a CSR AnnData (~4% dense) with a categorical obs column ``g``; return it."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, n_vars, density=0.04, format="csr", dtype=np.float32,
                  random_state=rng)
    obs = pd.DataFrame({"g": pd.Categorical(rng.choice(list(groups), n_obs))},
                       index=[f"c{i}" for i in range(n_obs)])
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))
    adata.write_h5ad(path)
    return adata


#: The artifact columns each registry schema version added.
SCHEMA_ADDED_COLUMNS = {2: "fingerprint", 3: "n_observations", 4: "lease_until", 5: "run_id"}
#: The tables each registry schema version added.
SCHEMA_ADDED_TABLES = {5: ("transform", "run", "run_input")}


def create_old_registry(registry: str | Path, version: int) -> None:
    """Write an empty registry as schema ``version`` laid it out (today's minus later parts)."""
    from sqlalchemy import Column, MetaData, Table, create_engine

    from lamin_io.registry import _schema as s
    from lamin_io.registry._db import normalize_url

    dropped_columns = {c for v, c in SCHEMA_ADDED_COLUMNS.items() if v > version}
    dropped_tables = {t for v, ts in SCHEMA_ADDED_TABLES.items() if v > version for t in ts}
    old = MetaData()
    for table in s.metadata.sorted_tables:
        if table.name in dropped_tables:
            continue
        columns = [Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                   for c in table.columns if c.name not in dropped_columns]
        Table(table.name, old, *columns)
    engine = create_engine(normalize_url(registry))
    old.create_all(engine)
    with engine.begin() as c:
        c.execute(s.meta.insert().values(name="schema_version", value=str(version)))
    engine.dispose()


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def snapshot(conn: Any) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The registry rows and the stored object names: to check that nothing changed."""
    from sqlalchemy import select

    from lamin_io.registry import _schema as s

    with conn.db.read() as c:
        rows = [row for table in (s.artifact, s.collection, s.collection_artifact, s.transform,
                                  s.run, s.run_input)
                for row in sorted(tuple(r) for r in c.execute(select(table)).all())]
    root = conn.root
    try:
        names = sorted(str(p) for p in root.fs.find(root.path))
    except FileNotFoundError:
        names = []
    return rows, names
