"""Canary secrets never leak: reprs, errors, CLI output, settings, registry bytes, DEBUG logs.

The canaries: an S3 secret key and session token (in the environment, and in
``storage_options``), and a PostgreSQL password (the test server trusts every password,
so any value connects). Reused: ``tests/test_cli_secrets.py`` (``lamin-io connect`` never
saves a password).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

import lamin_io as ln
from lamin_io.registry._db import normalize_url
from lamin_io.storage._redact import REDACTED, redact

SECRET = "CanarySecret-9b1f0e55a7"
TOKEN = "CanaryToken-2c7d1e9aa4//more+token/part"
OPTION_SECRET = "CanaryOptionSecret-51de77"
PASSWORD = "CanaryPassword-64aa03"
CANARIES = (SECRET, TOKEN, OPTION_SECRET, PASSWORD)


def _registry_bytes(url: str, tmp_path: Path) -> str:
    if url.startswith("postgresql"):
        engine = create_engine(normalize_url(url))
        with engine.connect() as c:
            text_ = "\n".join(repr(c.execute(text(f'SELECT * FROM "{t}"')).all())
                              for t in inspect(engine).get_table_names())
        engine.dispose()
        return text_
    return b"".join(p.read_bytes() for p in tmp_path.glob("registry.db*")).decode("latin-1")


def _leaks(*texts: str) -> list[str]:
    return [c for c in CANARIES for t in texts if c in t]


@pytest.fixture
def canary_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)


def test_redact_fields_and_values(canary_env):
    assert redact(f"headers={{'x-amz-security-token': b'{TOKEN}', 'a': 1}}") == \
        f"headers={{'x-amz-security-token': b'{REDACTED}', 'a': 1}}"
    assert redact(f"?X-Amz-Security-Token={TOKEN}&x=1") == f"?X-Amz-Security-Token={REDACTED}&x=1"
    assert SECRET not in redact(f"found {SECRET} in a message")  # the environment's secret


def test_canaries_never_leak(registry_url, s3_endpoint, tmp_path, canary_env, cli_env):
    registry = registry_url
    if registry.startswith("postgresql"):
        url = make_url(normalize_url(registry)).set(password=PASSWORD)
        registry = url.render_as_string(hide_password=False)
    storage = f"s3://lamin-io-test/{uuid.uuid4().hex}"
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    shown: list[str] = []
    try:
        conn = ln.connect(registry, storage, endpoint_url=s3_endpoint,
                          storage_options={"key": "testing", "secret": OPTION_SECRET,
                                           "token": TOKEN})
        shown += [repr(conn), str(conn), repr(conn.settings), repr(conn.db.engine.url)]
        path = tmp_path / "t.parquet"
        pd.DataFrame({"a": range(1000)}).to_parquet(path)
        artifact = ln.Artifact(path, key="t.parquet").save(mute=True)  # upload: signed PUTs
        assert artifact.load()["a"].sum() == 499500
        assert artifact.open().to_table().num_rows == 1000
        artifact.cache()
        with ln.track(name="canary-run", params={"n": 1}) as run:
            artifact.load()
        shown += [repr(artifact), artifact.describe(), repr(run), run.describe(),
                  repr(ln.Artifact.filter())]
        for bad in (lambda: ln.Artifact.get(key="missing.csv"),
                    lambda: ln.Artifact(f"{storage}/nothing-here.csv").save(),
                    lambda: ln.connect(registry, "s3://no-such-bucket-canary/x",
                                       endpoint_url=s3_endpoint).root.fs.ls("no-such")):
            try:
                bad()
            except Exception as exc:  # noqa: BLE001
                shown.append("".join(traceback.format_exception(exc)))
        ln.connect(registry, storage, endpoint_url=s3_endpoint,
                   storage_options={"key": "testing", "secret": OPTION_SECRET, "token": TOKEN})
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    log_text = logs.getvalue()
    assert "x-amz-security-token" in log_text.lower() or "Sending http request" in log_text
    assert REDACTED in log_text  # botocore logged the token header: redacted
    env = dict(cli_env, LAMIN_IO_REGISTRY=registry, LAMIN_IO_STORAGE=storage,
               AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    cli = [subprocess.run([sys.executable, "-m", "lamin_io.cli", "-v", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
           for args in (["ls"], ["describe", "t.parquet"], ["cache", "t.parquet"],
                        ["lineage", "t.parquet"], ["describe", "missing.csv"],
                        ["connect", "--registry", registry, "--storage", storage])]
    assert [p.returncode for p in cli] == [0, 0, 0, 0, 3, 0]
    settings = Path(cli_env["LAMIN_IO_CONFIG_DIR"]) / "settings.json"
    assert json.loads(settings.read_text())["storage"] == storage
    assert _leaks(*shown, log_text, *(p.stdout + p.stderr for p in cli),
                  settings.read_text(), _registry_bytes(registry_url, tmp_path)) == []


def test_anonymous_access_needs_no_credentials(s3_endpoint, tmp_path, monkeypatch):
    """anon=True reads with the AWS environment cleared (the test server's bucket is open)."""
    ln.connect(tmp_path / "r.db", f"s3://lamin-io-test/{uuid.uuid4().hex}",
               endpoint_url=s3_endpoint)
    path = tmp_path / "t.csv"
    path.write_text("a\n1\n")
    artifact = ln.Artifact(path, key="t.csv").save(mute=True)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    public: Any = ln.connect(tmp_path / "r.db", artifact.storage_root, endpoint_url=s3_endpoint,
                             anon=True)
    assert public.settings.anon
    assert ln.Artifact.get(key="t.csv").load()["a"].tolist() == [1]

