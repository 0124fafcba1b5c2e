"""First mistakes with S3: a bucket that does not exist, no credentials at all.

Each gets a typed error whose message says what to do, in the API and as one line in the
command line; a cleanup that fails after a failed save logs one line. Run against the real
S3 server on loopback.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import pytest
from conftest import BUCKET, write_bytes

import lamin_io as ln
from lamin_io import errors

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from lamin_io.registry import Connection

#: Variables through which botocore, pyarrow or polars could find credentials.
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _forget_s3_clients() -> None:
    """Drop cached filesystems and sessions, so no credentials outlive the test's setting."""
    from fsspec import get_filesystem_class

    from lamin_io.storage._engines import _aws_session, _s3_filesystem

    get_filesystem_class("s3").clear_instance_cache()
    _aws_session.cache_clear()
    _s3_filesystem.cache_clear()


def _no_credentials_env(base: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in AWS_CREDENTIAL_VARIABLES}
    empty = write_bytes(tmp_path / "empty-aws-file", b"")
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_CONFIG_FILE=str(empty),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    return env


@pytest.fixture
def no_credentials(s3_endpoint: str, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """No AWS credentials anywhere (the server, started first, needs none); the endpoint."""
    for name, value in _no_credentials_env(dict(os.environ), tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in AWS_CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    _forget_s3_clients()
    yield s3_endpoint
    _forget_s3_clients()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamin_io.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def registry_rows(conn: Connection) -> list[object]:
    from sqlalchemy import select

    from lamin_io.registry import _schema as s

    with conn.db.read() as c:
        return list(c.execute(select(s.artifact)).all())


def assert_one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- a bucket that does not exist ------------------------------------------------------------


def test_missing_bucket(tmp_path: Path, s3_endpoint: str) -> None:
    bucket = f"nope-{uuid.uuid4().hex[:12]}"
    conn = ln.connect(tmp_path / "r.db", f"s3://{bucket}/x", endpoint_url=s3_endpoint)
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    options = {"endpoint_url": s3_endpoint}
    attempts = [
        lambda: ln.Artifact(f, key="t.csv").save(mute=True),  # upload into the root
        lambda: ln.open(f"s3://{bucket}/x/t.csv", storage_options=options),
        lambda: ln.open(f"s3://{bucket}/x/t.h5ad", storage_options=options),
        lambda: ln.open(f"s3://{bucket}/x/t.parquet", engine="polars", storage_options=options),
        lambda: ln.Artifact(f"s3://{bucket}/x/t.csv"),  # a source in the root's bucket
    ]
    for attempt in attempts:
        with pytest.raises(errors.BucketNotFoundError) as info:
            attempt()
        text = str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        assert f"bucket {bucket!r} does not exist at endpoint {s3_endpoint}" in text
        assert "create it" in text
        assert "fix the bucket name" in text
    assert registry_rows(conn) == []  # no record left behind, pending or ready


def test_missing_key_in_an_existing_bucket_is_still_a_missing_path(s3_endpoint: str) -> None:
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/t.csv"
    with pytest.raises(errors.PathNotFoundError, match="check the path") as info:
        ln.open(url, storage_options={"endpoint_url": s3_endpoint})
    assert not isinstance(info.value, errors.BucketNotFoundError)


def test_missing_bucket_in_the_cli(cli_env: dict[str, str], tmp_path: Path,
                                   s3_endpoint: str) -> None:
    bucket = f"nope-{uuid.uuid4().hex[:12]}"
    proc = cli(cli_env, "connect", "--registry", str(tmp_path / "r.db"),
               "--storage", f"s3://{bucket}/x", "--endpoint-url", s3_endpoint)
    assert proc.returncode == 0, proc.stderr
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    proc = cli(cli_env, "save", str(f), "--key", "t.csv", "--mute")
    assert proc.returncode == 3  # not found
    line = assert_one_line(proc.stderr)
    assert line.startswith(f"error: bucket {bucket!r} does not exist at endpoint {s3_endpoint}")
    proc = cli(cli_env, "ls")  # the registry alone answers, and holds nothing
    assert proc.returncode == 0, proc.stderr
    assert "0 artifact(s)" in proc.stderr


# -- no credentials ----------------------------------------------------------------------------


def assert_credentials_hint(exc: BaseException) -> None:
    text = str(exc)
    assert isinstance(exc, errors.CredentialsError)
    assert isinstance(exc, PermissionError)
    for needed in ("no AWS credentials found", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_PROFILE", "anon=True", "public bucket"):
        assert needed in text, (needed, text)


def test_no_credentials_in_the_api(no_credentials: str, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    endpoint = no_credentials
    conn = ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/{uuid.uuid4().hex}",
                      endpoint_url=endpoint)
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    with caplog.at_level(logging.DEBUG, logger="lamin_io"):
        with pytest.raises(errors.CredentialsError) as info:
            ln.Artifact(f, key="t.csv").save(mute=True)
    assert_credentials_hint(info.value)
    assert endpoint in str(info.value)
    # the cleanup after the failed upload fails for the same reason: one line, no traceback
    # (asyncio may report the sessions of the filesystems the fixture dropped: not ours)
    cleanup = [r for r in caplog.records
               if r.name.startswith("lamin_io") and r.levelno >= logging.WARNING]
    assert len(cleanup) == 1, [r.getMessage() for r in cleanup]
    assert cleanup[0].exc_info is None
    message = cleanup[0].getMessage()
    assert "\n" not in message
    assert message.startswith("cleanup after the failed save: removing the partial upload")
    assert "NoCredentialsError" in message
    assert len(registry_rows(conn)) == 0  # the pending record was removed all the same
    for url in (f"s3://{BUCKET}/x.csv", f"s3://{BUCKET}/x.parquet", f"s3://{BUCKET}/x.h5ad"):
        with pytest.raises(errors.CredentialsError) as info:
            ln.open(url, storage_options={"endpoint_url": endpoint})
        assert_credentials_hint(info.value)


def test_no_credentials_for_the_engines(no_credentials: str) -> None:
    """pyarrow, polars and TileDB never fall back to unsigned requests on their own."""
    from lamin_io.storage import (
        polars_credential_provider,
        polars_storage_options,
        pyarrow_filesystem,
        tiledb_config,
        to_upath,
    )

    path = to_upath(f"s3://{BUCKET}/x.parquet", {"endpoint_url": no_credentials})
    for translate in (pyarrow_filesystem, polars_storage_options, polars_credential_provider,
                      tiledb_config):
        with pytest.raises(errors.CredentialsError) as info:
            translate(path)
        assert_credentials_hint(info.value)
    anon = to_upath(f"s3://{BUCKET}/x.parquet", {"endpoint_url": no_credentials, "anon": True})
    assert type(pyarrow_filesystem(anon)).__name__ == "S3FileSystem"
    assert (polars_storage_options(anon) or {})["aws_skip_signature"] == "true"
    assert polars_credential_provider(anon) is None
    missing_profile = to_upath(f"s3://{BUCKET}/x.parquet",
                               {"endpoint_url": no_credentials, "profile": "no-such-profile"})
    with pytest.raises(errors.CredentialsError, match="no-such-profile"):
        pyarrow_filesystem(missing_profile)


def test_anonymous_access_only_when_asked(no_credentials: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lamin_io.storage import to_upath

    table = pa.table({"a": [1, 2, 3]})
    local = tmp_path / "t.parquet"
    pq.write_table(table, local)
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}/t.parquet"
    # a public object (written with keys given explicitly): anon=True reads it; without
    # anon=True and without credentials, nothing falls back to unsigned requests
    owner = to_upath(url, {"endpoint_url": no_credentials, "key": "testing",
                           "secret": "testing"})
    owner.fs.pipe(owner.path, local.read_bytes(), ACL="public-read")
    anon = {"endpoint_url": no_credentials, "anon": True}
    assert ln.open(url, storage_options=anon).to_table().equals(table)
    with ln.open(url, engine="polars", storage_options=anon) as lf:
        assert lf.collect()["a"].to_list() == [1, 2, 3]
    with pytest.raises(errors.CredentialsError):
        ln.open(url, storage_options={"endpoint_url": no_credentials})


def test_no_credentials_in_the_cli(cli_env: dict[str, str], tmp_path: Path,
                                   s3_endpoint: str) -> None:
    env = _no_credentials_env(cli_env, tmp_path)
    proc = cli(env, "connect", "--registry", str(tmp_path / "r.db"),
               "--storage", f"s3://{BUCKET}/{uuid.uuid4().hex}", "--endpoint-url", s3_endpoint)
    assert proc.returncode == 0, proc.stderr
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    proc = cli(env, "save", str(f), "--key", "t.csv", "--mute")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    # the failed cleanup's one line of log, then the error
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("WARNING cleanup after the failed save")
    assert lines[1].startswith("error: no AWS credentials found")
    assert "anon=True" in lines[1]
    assert "testing" not in proc.stderr  # no secret of the parent's environment


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_pyarrow_network_failure_is_unreachable_not_unknown() -> None:
    """pyarrow names its network failure ``AWS Error NETWORK_CONNECTION``: no S3 error code."""
    from lamin_io.storage import pyarrow_filesystem, storage_error, to_upath

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    url = "s3://bucket/k.parquet"
    fs = pyarrow_filesystem(to_upath(url, {"endpoint_url": endpoint, "anon": True,
                                           "config_kwargs": {"retries": {"max_attempts": 0}}}))
    with pytest.raises(OSError, match="AWS Error") as info:  # (pyarrow's own, unwrapped)
        fs.open_input_file("bucket/k.parquet")
    typed = storage_error(info.value, url, endpoint)
    assert isinstance(typed, errors.StorageUnreachableError), (repr(info.value), typed)
    assert endpoint in str(typed)


def test_errors_of_the_callers_own_code_in_a_polars_block_pass_unchanged(
        tmp_path: Path, s3_endpoint: str) -> None:
    pytest.importorskip("polars")
    ln.connect(tmp_path / "r.db", f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_endpoint)
    artifact = ln.Artifact(write_bytes(tmp_path / "t.csv", b"a\n1\n"), key="t.csv").save(
        mute=True)
    def collect_then_fail(mine: Exception) -> None:
        with artifact.open(engine="polars") as lf:
            assert lf.collect()["a"].to_list() == [1]
            raise mine

    for mine in (TimeoutError("the caller's deadline"), BrokenPipeError("the caller's pipe")):
        with pytest.raises(type(mine)) as info:
            collect_then_fail(mine)
        assert info.value is mine  # not reported as the storage's failure
