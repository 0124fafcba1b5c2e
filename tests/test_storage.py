"""The storage layer on its own: paths, suffixes, hashing, conditional writes, credentials."""

from __future__ import annotations

import hashlib
import uuid
from typing import TYPE_CHECKING

import pytest
from conftest import BUCKET, write_bytes

from lamin_io import errors
from lamin_io.storage import (
    StorageSettings,
    hash_path,
    relative_key,
    suffix_of,
    to_upath,
    upload,
)

if TYPE_CHECKING:
    from upath import UPath


@pytest.mark.parametrize(("name", "suffix"), [
    ("a.h5ad", ".h5ad"), ("a.h5ad.gz", ".h5ad.gz"), ("x/y.zarr/", ".zarr"),
    ("table", ""), ("t.tar.gz", ".tar.gz"), ("v1.2/data.csv", ".csv"), (".hidden", ""),
    ("pbmc.h5ad.tar.gz", ".h5ad.tar.gz"), ("x/a.CSV.tar.gz", ".CSV.tar.gz"),
    ("v1.2.tar.gz", ".tar.gz"), ("a.tar", ".tar"),
])
def test_suffix_of(name, suffix):
    assert suffix_of(name) == suffix


def test_to_upath_normalizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert to_upath("a/../b.csv").path == str(tmp_path / "b.csv")
    assert to_upath(f"file://{tmp_path}/c.csv").path == str(tmp_path / "c.csv")
    s3 = to_upath("s3://bucket/key.csv/", {"endpoint_url": "http://127.0.0.1:1"})
    assert str(s3) == "s3://bucket/key.csv"
    # bounded retries and timeouts (3 retries: 4 attempts), and s3fs adds none of its own
    assert s3.storage_options["config_kwargs"] == {
        "connect_timeout": 3, "read_timeout": 5,
        "retries": {"max_attempts": 3, "mode": "standard"}}
    assert s3.fs.retries == 1
    assert relative_key(to_upath(tmp_path / "r" / "x" / "y.csv"), to_upath(tmp_path / "r")) \
        == "x/y.csv"
    assert relative_key(to_upath(tmp_path / "rr.csv"), to_upath(tmp_path / "r")) is None
    with pytest.raises(errors.InvalidArgumentError):
        to_upath("")
    with pytest.raises(errors.InvalidArgumentError):
        to_upath(42)  # type: ignore[arg-type]


def test_hash_is_full_content_sha256(tmp_path):
    data = b"x" * (9 * 2**20 + 5)  # more than one streaming block
    f = write_bytes(tmp_path / "f.bin", data)
    digest, size, manifest = hash_path(to_upath(f), mute=True)
    assert digest == hashlib.sha256(data).hexdigest()
    assert size == len(data)
    assert manifest is None


def _destination(kind: str, s3_endpoint_factory, tmp_path) -> UPath:
    if kind == "local":
        return to_upath(tmp_path / "dest" / "obj.bin")
    endpoint = s3_endpoint_factory()
    return to_upath(f"s3://{BUCKET}/{uuid.uuid4().hex}/obj.bin", {"endpoint_url": endpoint})


def test_conditional_create_never_overwrites(storage_kind, tmp_path, request):
    dest = _destination(storage_kind, lambda: request.getfixturevalue("s3_endpoint"), tmp_path)
    first = write_bytes(tmp_path / "one.bin", b"first")
    second = write_bytes(tmp_path / "two.bin", b"second")
    upload(to_upath(first), dest, sha256=hashlib.sha256(b"first").hexdigest(), manifest=None,
           mute=True)
    with pytest.raises(errors.ObjectExistsError, match="overwrite") as info:
        upload(to_upath(second), dest, sha256=hashlib.sha256(b"second").hexdigest(),
               manifest=None, mute=True)
    assert isinstance(info.value, FileExistsError)
    assert dest.read_bytes() == b"first"


def test_upload_refuses_content_other_than_hashed(storage_kind, tmp_path, request):
    dest = _destination(storage_kind, lambda: request.getfixturevalue("s3_endpoint"), tmp_path)
    f = write_bytes(tmp_path / "f.bin", b"edited after hashing")
    with pytest.raises(errors.SourceChangedError, match="changed"):
        upload(to_upath(f), dest, sha256=hashlib.sha256(b"original").hexdigest(),
               manifest=None, mute=True)
    if storage_kind == "local":
        assert not dest.exists()
        assert list((tmp_path / "dest").iterdir()) == []  # no temporary left behind


def test_settings_hide_secrets():
    settings = StorageSettings(root="s3://b/p", endpoint_url="http://127.0.0.1:9",
                               options={"key": "AKIDSECRETKEY", "secret": "s3cr3t-value",
                                        "client_kwargs": {"aws_session_token": "tok-123"}})
    text = repr(settings)
    for secret in ("AKIDSECRETKEY", "s3cr3t-value", "tok-123"):
        assert secret not in text
    assert "key" not in settings.public_dict()
    assert settings.fsspec_options()["secret"] == "s3cr3t-value"


def test_filesystem_reset_when_credentials_change(s3_endpoint, monkeypatch):
    url = f"s3://{BUCKET}/x"
    fs1 = to_upath(url, {"endpoint_url": s3_endpoint}).fs
    assert to_upath(url, {"endpoint_url": s3_endpoint}).fs is fs1  # created once
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated-key")
    fs2 = to_upath(url, {"endpoint_url": s3_endpoint}).fs
    assert fs2 is not fs1  # a new client picks up the new credentials
    assert to_upath(url, {"endpoint_url": s3_endpoint}).fs is fs2


def test_engine_credentials_follow_the_environment(s3_endpoint, monkeypatch, tmp_path):
    """The engines' credentials come from the AWS chain once per environment, and anew
    when the environment or the credential files change (rotated keys, another config
    file): one polars credential provider, made once, follows every change."""
    from lamin_io.storage._engines import _aws_session, polars_credential_provider, s3_access

    path = to_upath(f"s3://{BUCKET}/x", {"endpoint_url": s3_endpoint})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    _aws_session.cache_clear()
    provider = polars_credential_provider(path)
    assert provider is not None
    assert provider()[0]["aws_access_key_id"] == "first-key"
    assert provider()[0]["aws_access_key_id"] == "first-key"
    assert _aws_session.cache_info().misses == 1  # one session for the check and both calls
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated-key")
    assert provider()[0]["aws_access_key_id"] == "rotated-key"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = file-key\naws_secret_access_key = file-secret\n")
    (tmp_path / "config").write_text("[default]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert s3_access(path).region == "eu-west-3"
    assert provider()[0] == {"aws_access_key_id": "file-key",
                             "aws_secret_access_key": "file-secret"}
    (tmp_path / "credentials").write_text(  # edited in place (aws configure, a rotation)
        "[default]\naws_access_key_id = edited-key\naws_secret_access_key = edited-secret\n")
    assert provider()[0]["aws_access_key_id"] == "edited-key"
