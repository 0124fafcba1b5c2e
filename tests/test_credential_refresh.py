"""Temporary credentials keep refreshing in objects that live long (against the S3 server).

The AWS chain here is a ``credential_process`` that hands out the key named in a file, with
an expiry a few seconds away, as STS, SSO or an instance role would. Each reader is opened
once, reads, and reads again with the same object after the key was rotated and the
credentials it had expired: the server records which access key each request was signed
with (it does not check signatures, so what counts is what lamin-io sent).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import BUCKET, upload

import lamin_io as ln
from lamin_io.storage import (
    POLARS_CREDENTIALS_TTL,
    polars_credential_provider,
    polars_storage_options,
    pyarrow_filesystem,
    s3_access,
    tiledb_config,
    to_upath,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

#: Seconds from when the credential process runs to the expiry it writes.
LIFETIME = 3

#: The credential process: the key in ``<dir>/key``, expiring LIFETIME seconds from now
#: (rounded up to the second); the expiry is appended to ``<dir>/issued``.
PROCESS = """\
import datetime, json, math, pathlib, sys, time
folder = pathlib.Path(sys.argv[1])
expires = math.ceil(time.time()) + int(sys.argv[2])
with open(folder / "issued", "a") as f:
    f.write(f"{expires}\\n")
print(json.dumps({
    "Version": 1,
    "AccessKeyId": (folder / "key").read_text().strip(),
    "SecretAccessKey": "rotating-secret",
    "SessionToken": "rotating-token",
    "Expiration": datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
    .strftime("%Y-%m-%dT%H:%M:%SZ"),
}))
"""


def forget_clients() -> None:
    """Drop cached filesystems, clients and botocore sessions (no credentials leak across)."""
    from lamin_io.storage import reset_clients

    reset_clients()


class RotatingCredentials:
    """The credential source of the test: rotate the key, wait out what was handed out."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def rotate(self, key: str) -> None:
        """Make ``key`` the one the process hands out from now on."""
        (self.folder / "key").write_text(key)

    def issued(self) -> int:
        """How many times the process ran."""
        return len((self.folder / "issued").read_text().split())

    def wait_until_expired(self, at_least_until: float = 0.0) -> None:
        """Sleep until every credential handed out so far has expired (and ``at_least_until``).

        SDKs renew credentials some minutes before they expire, so they may have asked
        again already; waiting out the last expiry written makes the test independent of
        when each SDK chooses to renew.
        """
        last = max(int(t) for t in (self.folder / "issued").read_text().split())
        deadline = max(last + 0.05, at_least_until)
        time.sleep(max(0.0, deadline - time.time()))


def _config(folder: Path, section: str = "[default]") -> str:
    """A config file section whose credentials come from the test's credential process."""
    command = f'"{sys.executable}" -S "{folder / "process.py"}" "{folder}" {LIFETIME}'
    return f"{section}\ncredential_process = {command}\nregion = us-east-1\n"


@pytest.fixture
def rotating(s3_endpoint: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[RotatingCredentials]:
    """The AWS chain is a credential_process handing out key ONE (then what is rotated in).

    No other source: no key variables, no profile, an empty credentials file, no instance
    metadata. The session's S3 server (``s3_endpoint``) is started first, with its own keys.
    """
    folder = tmp_path / "aws"
    folder.mkdir()
    (folder / "process.py").write_text(PROCESS)
    (folder / "issued").write_text("")
    (folder / "credentials").write_text("")
    (folder / "config").write_text(_config(folder))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    credentials = RotatingCredentials(folder)
    credentials.rotate("KEY-ONE")
    forget_clients()
    yield credentials
    forget_clients()


def signed_with(s3_server: Any) -> set[str | None]:
    """The access keys of the requests since the last reset (and reset)."""
    keys = set(s3_server.stats.access_keys)
    assert s3_server.stats.requests > 0, "nothing was read"
    s3_server.reset()
    return keys


@pytest.fixture
def table(tmp_path: Path) -> pd.DataFrame:
    df = pd.DataFrame({"id": np.arange(5000), "value": np.random.default_rng(0).random(5000)})
    df.to_parquet(tmp_path / "t.parquet", row_group_size=1000)
    return df


@pytest.fixture
def adata(tmp_path: Path) -> ad.AnnData:
    """Dense X of 2 MB: more than the head and tail an h5ad open reads ahead."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.random((2000, 250), dtype=np.float32),
                       obs=pd.DataFrame({"g": rng.integers(0, 5, 2000)},
                                        index=[f"c{i}" for i in range(2000)]))
    adata.write_h5ad(tmp_path / "a.h5ad")
    adata.write_zarr(tmp_path / "a.zarr")
    return adata


# -- each long-lived reader signs with the rotated key, without being opened again ---------


def test_pyarrow_dataset_keeps_refreshing(rotating, s3_server, s3_endpoint, table,
                                          tmp_path) -> None:
    remote = upload(tmp_path / "t.parquet", s3_endpoint)
    s3_server.reset()
    dataset = ln.open(remote)
    pd.testing.assert_frame_equal(dataset.to_table().to_pandas(), table)
    assert signed_with(s3_server) == {"KEY-ONE"}
    rotating.rotate("KEY-TWO")
    rotating.wait_until_expired()
    pd.testing.assert_frame_equal(dataset.to_table().to_pandas(), table)
    assert signed_with(s3_server) == {"KEY-TWO"}


def test_polars_scan_keeps_refreshing(rotating, s3_server, s3_endpoint, table,
                                      tmp_path) -> None:
    remote = upload(tmp_path / "t.parquet", s3_endpoint)
    s3_server.reset()
    with ln.open(remote, engine="polars") as lf:
        assert lf.collect().to_pandas().equals(table)
        asked_by = time.time()  # polars asked for credentials before now
        assert signed_with(s3_server) == {"KEY-ONE"}
        rotating.rotate("KEY-TWO")
        # polars keeps what the provider returned until the expiry it was told (whole
        # seconds): at most POLARS_CREDENTIALS_TTL after it asked
        rotating.wait_until_expired(math.floor(asked_by) + POLARS_CREDENTIALS_TTL + 0.05)
        assert lf.collect().to_pandas().equals(table)
        assert signed_with(s3_server) == {"KEY-TWO"}


@pytest.mark.parametrize("name", ["a.h5ad", "a.zarr"])
def test_anndata_accessor_keeps_refreshing(rotating, s3_server, s3_endpoint, adata, tmp_path,
                                           name) -> None:
    """h5ad on S3 reads through pyarrow's native client (one per endpoint, cached); zarr
    through s3fs, whose aiobotocore client resolves the chain itself."""
    remote = upload(tmp_path / name, s3_endpoint)
    assert not {"key", "secret", "token"} & set(remote.storage_options)  # none injected
    s3_server.reset()
    with ln.open(remote) as acc:
        pd.testing.assert_frame_equal(acc.obs, adata.obs)
        np.testing.assert_array_equal(acc[:1000].X, adata.X[:1000])
        assert signed_with(s3_server) == {"KEY-ONE"}
        rotating.rotate("KEY-TWO")
        rotating.wait_until_expired()
        np.testing.assert_array_equal(acc[1000:].X, adata.X[1000:])
        assert signed_with(s3_server) == {"KEY-TWO"}


#: An S3 server in a process of its own (tiledbsoma holds the GIL while it waits for S3, so
#: a server thread of the test process could not answer), telling the access keys it saw.
SERVER = """\
import json, sys
from lamin_io.testing import S3Server
with S3Server(sys.argv[1]) as server:
    print(server.endpoint, flush=True)
    for _ in sys.stdin:  # each line asks for the keys signed with since the last one
        stats = server.stats
        print(json.dumps({"requests": stats.requests,
                          "keys": sorted({str(k) for k in stats.access_keys})}), flush=True)
        server.reset()
"""


class ServerProcess:
    """:data:`SERVER` started, with its endpoint and the keys its requests were signed with."""

    def __init__(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, BUCKET], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None
        self.endpoint = self.process.stdout.readline().strip()
        assert self.endpoint.startswith("http://"), "the server did not start"

    def signed_with(self) -> set[str]:
        """The access keys of the requests since the last call (some requests were made)."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write("keys\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        assert answer["requests"] > 0, "nothing was read"
        return set(answer["keys"])

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    server = ServerProcess()
    try:
        yield server
    finally:
        server.stop()


#: Opens a SOMA experiment once and reads from it twice, the parent rotating the key in
#: between: in a process of its own, since TileDB's AWS SDK reads the AWS config files once
#: per process (an earlier test's TileDB would have read other files).
SOMA_READER = """\
import sys
import lamin_io as ln
with ln.open(sys.argv[1], storage_options={"endpoint_url": sys.argv[2]}) as exp:
    print(len(exp.obs.read().concat()), flush=True)
    sys.stdin.readline()  # the parent rotates the key and waits out the one handed out
    print(len(exp.ms["RNA"].X["data"].read().tables().concat()), flush=True)
"""


def test_tiledbsoma_experiment_keeps_refreshing(server_process, rotating, tmp_path) -> None:
    """TileDB's own AWS SDK resolves the chain, and renews it while the context lives."""
    soma_io = pytest.importorskip("tiledbsoma.io")

    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.random((50, 20), dtype=np.float32),
                       obs=pd.DataFrame({"g": rng.integers(0, 3, 50)},
                                        index=[f"c{i}" for i in range(50)]),
                       var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))
    local = tmp_path / "x.tiledbsoma"
    soma_io.from_anndata(str(local), adata, measurement_name="RNA")
    remote = upload(local, server_process.endpoint)
    assert server_process.signed_with() == {"KEY-ONE"}  # the upload, through s3fs
    with (tmp_path / "reader.err").open("w") as err:
        reader = subprocess.Popen(
            [sys.executable, "-c", SOMA_READER, str(remote), server_process.endpoint],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    assert reader.stdin is not None
    assert reader.stdout is not None
    try:
        first = reader.stdout.readline()
        assert first.strip() == str(adata.n_obs), (tmp_path / "reader.err").read_text()
        assert server_process.signed_with() == {"KEY-ONE"}
        rotating.rotate("KEY-TWO")
        rotating.wait_until_expired()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        second = reader.stdout.readline()
        assert second.strip() == str(adata.X.size), (tmp_path / "reader.err").read_text()
        assert server_process.signed_with() == {"KEY-TWO"}
    finally:
        reader.stdin.close()
        assert reader.wait(timeout=60) == 0, (tmp_path / "reader.err").read_text()


def fresh_tiledb_config(path: Any) -> dict[str, str]:
    """``tiledb_config(path)`` in a new process: one whose TileDB has read no AWS files yet."""
    code = ("import json, sys\nfrom lamin_io.storage import tiledb_config, to_upath\n"
            "print(json.dumps(tiledb_config(to_upath(sys.argv[1], json.loads(sys.argv[2])))))")
    out = subprocess.run([sys.executable, "-c", code, str(path),
                          json.dumps(dict(path.storage_options))],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_tiledb_gets_keys_after_the_config_files_changed(rotating, s3_endpoint) -> None:
    """TileDB's AWS SDK read the config files once: after they change, it gets the chain's
    current credentials as keys rather than its stale view of the files."""
    path = to_upath("s3://bucket/x.tiledbsoma", {"endpoint_url": s3_endpoint})
    tiledb_config(path)  # TileDB has read the files by now (in this process or earlier)
    with (rotating.folder / "config").open("a") as f:
        f.write("\n# edited\n")
    rotating.rotate("KEY-TWO")
    config = tiledb_config(path) or {}
    assert config["vfs.s3.aws_access_key_id"] == "KEY-TWO"
    assert config["vfs.s3.aws_session_token"] == "rotating-token"


# -- what each engine is handed ------------------------------------------------------------


def test_chain_credentials_are_not_frozen_into_settings(rotating, s3_endpoint) -> None:
    path = to_upath("s3://bucket/x.parquet", {"endpoint_url": s3_endpoint})
    access = s3_access(path)
    assert (access.credentials, access.key, access.secret, access.token) == (
        "chain", None, None, None)
    assert rotating.issued() > 0  # the chain was checked: it has credentials
    assert "KEY-ONE" not in repr(access)
    storage = polars_storage_options(path) or {}
    assert not any(k.startswith("aws_access") or "secret" in k or "token" in k
                   for k in storage)
    config = fresh_tiledb_config(path)
    assert not [k for k in config if k.startswith("vfs.s3.aws_")]  # TileDB's SDK resolves
    provider = polars_credential_provider(path)
    assert provider is not None
    creds, expiry = provider()
    assert creds["aws_access_key_id"] == "KEY-ONE"
    assert creds["aws_session_token"] == "rotating-token"
    assert 0 < expiry - time.time() <= POLARS_CREDENTIALS_TTL
    client = pyarrow_filesystem(path)
    rotating.rotate("KEY-TWO")
    assert pyarrow_filesystem(path) is client  # one client, renewing its own credentials
    with (rotating.folder / "config").open("a") as f:
        f.write("\n# edited\n")  # another credential source: the next open reads it anew
    assert pyarrow_filesystem(path) is not client


def test_a_named_profile(rotating, s3_endpoint, monkeypatch) -> None:
    """profile= the environment's is the chain; a role profile assumed from it is handed on
    as role_arn; another profile is frozen for pyarrow and TileDB, renewed for polars."""
    folder = rotating.folder
    (folder / "config").write_text(
        _config(folder) + _config(folder, "[profile other]")
        + "[profile ops]\nrole_arn = arn:aws:iam::123456789012:role/ops\n"
          "source_profile = default\nexternal_id = ext-1\nrole_session_name = nightly\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3_endpoint)  # the role is checked there (moto)
    forget_clients()

    def path(profile: str) -> Any:
        return to_upath("s3://bucket/x.parquet", {"endpoint_url": s3_endpoint,
                                                  "profile": profile})

    assert s3_access(path("default")).credentials == "chain"
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert s3_access(path("other")).credentials == "chain"
    monkeypatch.delenv("AWS_PROFILE")

    role = s3_access(path("ops"))
    assert (role.credentials, role.key, role.role_arn, role.external_id,
            role.role_session_name) == ("role", None, "arn:aws:iam::123456789012:role/ops",
                                        "ext-1", "nightly")
    config = fresh_tiledb_config(path("ops"))
    assert {k: v for k, v in config.items() if k.startswith("vfs.s3.aws_")} == {
        "vfs.s3.aws_role_arn": "arn:aws:iam::123456789012:role/ops",
        "vfs.s3.aws_external_id": "ext-1", "vfs.s3.aws_session_name": "nightly"}

    frozen = s3_access(path("other"))
    assert (frozen.credentials, frozen.key) == ("frozen", "KEY-ONE")
    assert (tiledb_config(path("other")) or {})["vfs.s3.aws_access_key_id"] == "KEY-ONE"
    provider = polars_credential_provider(path("other"))
    assert provider is not None
    assert provider()[0]["aws_access_key_id"] == "KEY-ONE"
    assert "aws_access_key_id" not in (polars_storage_options(path("other")) or {})
    rotating.rotate("KEY-TWO")
    rotating.wait_until_expired()
    assert provider()[0]["aws_access_key_id"] == "KEY-TWO"  # polars renews any profile


def test_given_keys_are_passed_as_given(rotating, s3_endpoint) -> None:
    path = to_upath("s3://bucket/x.parquet", {"endpoint_url": s3_endpoint, "key": "GIVEN",
                                              "secret": "given-secret"})
    before = rotating.issued()
    access = s3_access(path)
    assert (access.credentials, access.key) == ("given", "GIVEN")
    assert (polars_storage_options(path) or {})["aws_access_key_id"] == "GIVEN"
    assert polars_credential_provider(path) is None
    assert rotating.issued() == before  # the chain was not asked


def test_provider_works_in_a_forked_child(rotating, s3_endpoint) -> None:
    """The provider pickles without secrets and, in a forked child (where the botocore
    sessions and their lock are made anew), answers with the current key."""
    import pickle

    path = to_upath("s3://bucket/x.parquet", {"endpoint_url": s3_endpoint})
    provider = polars_credential_provider(path)
    assert provider is not None
    assert provider()[0]["aws_access_key_id"] == "KEY-ONE"
    data = pickle.dumps(provider)
    assert b"KEY-ONE" not in data
    rotating.rotate("KEY-TWO")
    rotating.wait_until_expired()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no test machinery, just answer through the pipe
        signal.alarm(60)  # never outlive a hang
        try:
            key = pickle.loads(data)()[0]["aws_access_key_id"]
            os.write(write, key.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    assert answer == "KEY-TWO"

