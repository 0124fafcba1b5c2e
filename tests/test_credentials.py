"""Credentials go where they were given, and nowhere else (against real S3 servers)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import BUCKET, write_bytes

import lamin_io as ln
from lamin_io import errors


@pytest.fixture(scope="module")
def second_server() -> Any:
    """Another S3 server on loopback: another endpoint, as another cloud would be."""
    from lamin_io.testing import S3Server

    with S3Server("elsewhere") as server:
        yield server


def test_credentials_for_one_endpoint_never_reach_another(s3_server, second_server,
                                                          tmp_path) -> None:
    db = tmp_path / "r.db"
    # an artifact saved earlier on the second endpoint, with that endpoint's credentials
    ln.connect(db, "s3://elsewhere/data", endpoint_url=second_server.endpoint,
               storage_options={"key": "KEY-FOR-ELSEWHERE", "secret": "s2"})
    f = write_bytes(tmp_path / "x.csv", b"a\n1\n")
    ln.Artifact(f, key="x.csv").save(mute=True)
    # now connected to the first endpoint with credentials meant for it only
    ln.connect(db, f"s3://{BUCKET}/data", endpoint_url=s3_server.endpoint,
               storage_options={"key": "KEY-FOR-HERE", "secret": "s1"})
    second_server.reset()
    art = ln.Artifact.get(key="x.csv")
    assert art.load().to_dict() == {"a": {0: 1}}  # read from the second endpoint
    keys = set(second_server.stats.access_keys)
    assert second_server.stats.requests > 0
    assert "KEY-FOR-HERE" not in keys  # the first endpoint's key was never sent there
    assert keys <= {"testing", None}  # the standard chain's (the environment's) instead


def test_an_explicit_storage_wins_over_saved_settings(tmp_path, monkeypatch) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "settings.json").write_text(json.dumps({
        "registry": str(tmp_path / "saved.db"), "storage": "s3://saved-bucket/data",
        "endpoint_url": "http://127.0.0.1:1", "anon": True}))
    monkeypatch.setenv("LAMIN_IO_CONFIG_DIR", str(config))
    conn = ln.connect(tmp_path / "r.db", "s3://other-bucket/data")
    assert conn.settings.endpoint_url is None  # not the saved storage's endpoint
    assert conn.settings.anon is False  # nor its anonymous access
    conn = ln.connect(tmp_path / "r.db", "s3://saved-bucket/data/")  # the saved one, spelt so
    assert conn.settings.endpoint_url == "http://127.0.0.1:1"
    assert conn.settings.anon is True
    conn = ln.connect(tmp_path / "r.db")  # nothing given: the saved storage and its settings
    assert (conn.settings.root, conn.settings.endpoint_url) == ("s3://saved-bucket/data",
                                                                "http://127.0.0.1:1")


@pytest.mark.parametrize("value", ["abc", b"abc", 3])
def test_in_lookup_takes_a_list_not_a_string(conn, value) -> None:
    with pytest.raises(errors.InvalidArgumentError, match=r"key__in=\["):
        ln.Artifact.filter(key__in=value)
    assert list(ln.Artifact.filter(key__in=["abc"])) == []
