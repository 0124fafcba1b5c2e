"""``lamin-io connect`` never writes a registry password to settings.json or the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner

from lamin_io.cli import cli
from lamin_io.registry._connection import config_file, save_settings, url_without_password

if TYPE_CHECKING:
    from pathlib import Path

CANARY = "Canary-Pw-7f3e91"


@pytest.mark.parametrize(("url", "expected"), [
    (f"postgresql://postgres:{CANARY}@db.example.org:5432/lamin",
     "postgresql://postgres@db.example.org:5432/lamin"),
    (f"postgresql+psycopg://u:{CANARY}@h/db?sslmode=require",
     "postgresql+psycopg://u@h/db?sslmode=require"),
    (f"postgresql://u@h/db?password={CANARY}&sslmode=require",
     "postgresql://u@h/db?sslmode=require"),
])
def test_url_without_password_drops_it(url: str, expected: str) -> None:
    clean, dropped = url_without_password(url)
    assert dropped
    assert CANARY not in clean
    assert clean == expected


@pytest.mark.parametrize("url", [
    "postgresql://postgres@db.example.org/lamin",
    "sqlite:////tmp/registry.db",
    "/tmp/registry.db",
])
def test_url_without_password_keeps_other_urls(url: str) -> None:
    assert url_without_password(url) == (url, False)


def test_save_settings_never_writes_a_password() -> None:
    path = save_settings({"registry": f"postgresql+psycopg://u:{CANARY}@h/db", "storage": "/x"})
    text = path.read_text()
    assert CANARY not in text
    assert json.loads(text)["registry"] == "postgresql+psycopg://u@h/db"


def _fake_connect(url_seen: list[str]) -> Any:
    """Stand in for a PostgreSQL server: a connection object as ``connect`` returns it."""

    def fake(registry: str, storage: str | None, **_: Any) -> Any:
        from lamin_io.registry._db import normalize_url

        url_seen.append(registry)
        url = normalize_url(registry)
        display = url.replace(f":{CANARY}@", ":***@")
        return SimpleNamespace(db=SimpleNamespace(url=url, display=display), registry=display,
                               settings=SimpleNamespace(root=storage or "/data/storage",
                                                        endpoint_url=None))

    return fake


def test_cli_connect_saves_no_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lamin_io.registry

    seen: list[str] = []
    monkeypatch.setattr(lamin_io.registry, "connect", _fake_connect(seen))
    url = f"postgresql://postgres:{CANARY}@db.example.org/lamin"
    result = CliRunner().invoke(cli, ["connect", "--registry", url,
                                      "--storage", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert seen == [url]  # this session still connects with the password it was given
    saved = config_file().read_text()
    assert CANARY not in saved
    assert json.loads(saved)["registry"] == "postgresql+psycopg://postgres@db.example.org/lamin"
    assert CANARY not in result.output
    assert CANARY not in (result.stderr or "")
    assert "PGPASSWORD" in result.output + (result.stderr or "")


def test_cli_connect_password_from_environment_is_not_saved(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import lamin_io.registry

    monkeypatch.setenv("LAMIN_IO_REGISTRY", f"postgresql://u:{CANARY}@h/db")

    def from_env(registry: str | None, storage: str | None, **kw: Any) -> Any:
        return _fake_connect([])(registry or os.environ["LAMIN_IO_REGISTRY"], storage, **kw)

    monkeypatch.setattr(lamin_io.registry, "connect", from_env)
    result = CliRunner().invoke(cli, ["connect"])
    assert result.exit_code == 0, result.output
    assert CANARY not in config_file().read_text()
    assert CANARY not in result.output


def test_cli_connect_unreachable_server_leaks_nothing(tmp_path: Path) -> None:
    env = os.environ.copy()
    env.update(LAMIN_IO_CONFIG_DIR=str(tmp_path / "config"),
               LAMIN_IO_DATA_DIR=str(tmp_path / "data"), PGCONNECT_TIMEOUT="2")
    env.pop("LAMIN_IO_REGISTRY", None)
    url = f"postgresql://postgres:{CANARY}@127.0.0.1:1/lamin"
    proc = subprocess.run([sys.executable, "-m", "lamin_io.cli", "connect", "--registry", url,
                           "--storage", str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 4, proc.stderr  # unreachable: retry
    assert "unreachable" in proc.stderr
    assert CANARY not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    settings = tmp_path / "config" / "settings.json"
    assert not settings.exists() or CANARY not in settings.read_text()


def test_cli_connect_postgres_saves_no_password(tmp_path: Path) -> None:
    base = os.environ.get("LAMIN_IO_TEST_POSTGRES")
    if not base:
        pytest.skip("LAMIN_IO_TEST_POSTGRES is not set")
    from conftest import _postgres_database
    from sqlalchemy.engine import make_url

    databases = _postgres_database(base)
    url = next(databases)
    password = make_url(url).password
    if not password:
        pytest.skip("LAMIN_IO_TEST_POSTGRES has no password to leak")
    try:
        env = os.environ.copy()
        env.update(LAMIN_IO_CONFIG_DIR=str(tmp_path / "config"),
                   LAMIN_IO_DATA_DIR=str(tmp_path / "data"),
                   LAMIN_IO_CACHE_DIR=str(tmp_path / "cache"))
        for name in ("LAMIN_IO_REGISTRY", "LAMIN_IO_STORAGE", "PGPASSWORD"):
            env.pop(name, None)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run([sys.executable, "-m", "lamin_io.cli", *args], env=env,
                                  capture_output=True, text=True, timeout=120, check=False)
            assert proc.returncode == 0, (proc.stdout, proc.stderr)
            return proc

        proc = run("connect", "--registry", url, "--storage", str(tmp_path / "store"))
        assert password not in proc.stdout + proc.stderr
        assert password not in (tmp_path / "config" / "settings.json").read_text()
        env["PGPASSWORD"] = password  # later commands take the password from libpq's sources
        assert password not in run("ls").stdout
    finally:
        next(databases, None)  # runs the fixture helper's clean-up (drops the database)
