"""Hostile keys are refused before anything is written; every accepted key stays inside."""

from __future__ import annotations

import posixpath
import subprocess
import sys
import unicodedata
from urllib.parse import unquote

import pytest
from conftest import snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import lamin_io as ln
from lamin_io.errors import InvalidKeyError
from lamin_io.registry._keys import validate_key

_CONTROL = [chr(c) for c in (*range(0x00, 0x20), 0x7F)]

HOSTILE = [
    # traversal, in every spelling
    "../x.csv", "a/../../x.csv", "a/..", "./x.csv", "a/./x.csv", "a/.../x.csv",
    "%2e%2e/x.csv", "%2E%2E/x.csv", "a/%2e%2e/%2e%2e/x.csv", ".%2e/x.csv",
    "%252e%252e/x.csv", "%25252e%25252e/x.csv", "a%2f..%2fx.csv", "a%2F%2E%2E%2Fx.csv",
    "..%5cx.csv", "%5c%5cserver%5cshare%5cx.csv",
    # absolute, drive letters, UNC, backslashes, home
    "/etc/x.csv", "/x.csv", "C:/x.csv", "c:x.csv", "C:\\x.csv", "\\\\server\\share\\x.csv",
    "//server/share/x.csv", "a\\b.csv", "..\\x.csv", "~/x.csv",
    # empty components
    "a//b.csv", "a/", "/", "", " ", "a/b/",
    # URLs and whitespace at the ends
    "s3://bucket/x.csv", "file:///etc/x.csv", " x.csv", "x.csv ", "x.csv\t",
    # Unicode that becomes a slash or a dot
    "a\uff0f..\uff0fx.csv", "\uff0e\uff0e/x.csv", "a\u2215b.csv" if unicodedata.normalize(
        "NFKC", "\u2215") != "\u2215" else "\uff0e\uff0e\uff0fx.csv",
    "x\u2024\u2024/y.csv", "a/\ufe52\ufe52/x.csv", "\uff3cx.csv",
    # invisible and bidirectional characters
    "a\u202eb.csv", "a\u200bb.csv", "a\ufeffb.csv",
    # the reserved prefix, in any case or form
    ".lamin-io/x.csv", ".lamin-io/objects/x.csv", ".LAMIN-IO/x.csv", "\uff0elamin-io/x.csv",
    # too long for S3 once the storage prefix and lamin-io's names are added
    "a" * 1000 + ".csv", "/".join(["d" * 100] * 10) + ".csv", "\u00e9" * 500 + ".csv",
] + [f"a{c}b.csv" for c in _CONTROL]  # NUL, newline and every other control character


def test_there_are_enough_hostile_keys():
    assert len(set(HOSTILE)) >= 40


@pytest.mark.parametrize("key", sorted(set(HOSTILE)), ids=ascii)
def test_hostile_key_is_refused_and_nothing_written(key, tmp_path):
    conn = ln.connect(tmp_path / "registry.db", tmp_path / "storage")
    source = tmp_path / "x.csv"
    source.write_text("a\n1\n")
    existing = ln.Artifact(tmp_path / "x.csv", key="ok/x.csv").save(mute=True)
    before = snapshot(conn)
    (tmp_path / "y.csv").write_text("a\n2\n")
    with pytest.raises(InvalidKeyError):
        ln.Artifact(tmp_path / "y.csv", key=key).save(mute=True)
    with pytest.raises(InvalidKeyError):
        ln.Collection([existing], key=key.removesuffix(".csv") or key).save()
    assert snapshot(conn) == before


def test_long_key_limit_counts_the_storage_prefix(tmp_path, s3_endpoint):
    conn = ln.connect(tmp_path / "r.db", "s3://lamin-io-test/" + "p" * 400,
                      endpoint_url=s3_endpoint)
    (tmp_path / "y.csv").write_text("a\n2\n")
    key = "k" * 550 + ".csv"  # fine under a short prefix, too long under this one
    validate_key(key, suffix=".csv")
    before = snapshot(conn)
    with pytest.raises(InvalidKeyError, match="1024-byte key limit"):
        ln.Artifact(tmp_path / "y.csv", key=key).save(mute=True)
    assert snapshot(conn) == before


def test_cli_refuses_in_one_line(tmp_path, cli_env):
    (tmp_path / "y.csv").write_text("a\n2\n")
    subprocess.run([sys.executable, "-m", "lamin_io.cli", "connect", "--registry",
                    str(tmp_path / "r.db"), "--storage", str(tmp_path / "st")],
                   env=cli_env, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "lamin_io.cli", "save", str(tmp_path / "y.csv"),
                           "--key", "%2e%2e/y.csv"], env=cli_env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("error: unsafe key '%2e%2e/y.csv'")
    assert len(done.stderr.strip().splitlines()) == 1


def _inside(root: str, key: str) -> bool:
    joined = posixpath.normpath(posixpath.join(root, key))
    return joined.startswith(root + "/") and joined != root


_ALPHABET = st.sampled_from([
    "a", "b", "Z", "0", "_", "-", " ", ".", "/", "%", "2", "e", "f", "5", "c", "\\", ":",
    "~", "\u00e9", "\uff0e", "\uff0f", "\u2024", "\ufe52", "\uff3c", "\n", "\x00", "\u202e",
    "\u200b", "\uff21", "\ufb01",
])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_ALPHABET, min_size=1, max_size=24).map("".join))
def test_every_accepted_key_resolves_inside_the_root(key):
    try:
        validate_key(key, suffix=None)
    except InvalidKeyError:
        return
    root = "/srv/storage"
    # as written, percent-decoded (once and twice) and NFKC-normalized, it stays inside
    for form in (key, unquote(key), unquote(unquote(key)),
                 unicodedata.normalize("NFKC", key)):
        assert _inside(root, form), form
        assert "\\" not in form
        assert ".." not in form.split("/")
    assert key.split("/")[0].casefold() != ".lamin-io"
