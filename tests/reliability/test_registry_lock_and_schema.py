"""The registry's lock and schema: a held lock, a newer schema, a migration killed midway.

Reused from earlier issues: ``tests/test_errors.py::test_locked_registry_is_typed`` (a lock
held in the same process) and ``test_newer_schema_is_refused``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import create_old_registry
from sqlalchemy import create_engine, inspect, select, text

import lamin_io as ln
from lamin_io import errors
from lamin_io.registry import _schema as s
from lamin_io.registry._db import normalize_url

_HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    c = sqlite3.connect(sys.argv[1], isolation_level=None)
    c.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    c.execute("ROLLBACK")
""")


def _state(url: str) -> tuple[list[str], dict[str, list[tuple[object, ...]]]]:
    """The tables, their columns, and every row: to compare before and after."""
    engine = create_engine(normalize_url(url))
    try:
        found = inspect(engine)
        layout = sorted(f"{t}:{','.join(c['name'] for c in found.get_columns(t))}"
                        for t in found.get_table_names())
        with engine.connect() as c:
            rows = {t: sorted(map(tuple, c.execute(text(f'SELECT * FROM "{t}"')).all()))
                    for t in found.get_table_names()}
    finally:
        engine.dispose()
    return layout, rows


def test_lock_held_by_another_process(tmp_path):
    db = tmp_path / "registry.db"
    ln.connect(db, tmp_path / "storage", busy_timeout=0.5)
    (tmp_path / "x.csv").write_text("a\n1\n")
    before = _state(str(db))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(errors.RegistryLockedError, match="busy_timeout") as info:
            ln.Artifact(tmp_path / "x.csv", key="x.csv").save(mute=True)
        assert isinstance(info.value, TimeoutError)
        assert "0.5s" in str(info.value)
        assert len(ln.Artifact.filter()) == 0  # readers are not blocked (WAL)
    finally:
        holder.communicate("", timeout=60)
    assert _state(str(db)) == before
    assert not list((tmp_path / "storage").rglob("*.csv"))
    assert ln.Artifact(tmp_path / "x.csv", key="x.csv").save(mute=True).key == "x.csv"


def test_newer_schema_is_refused_and_left_alone(registry_url, tmp_path):
    ln.connect(registry_url, tmp_path / "storage")
    ln.disconnect()
    engine = create_engine(normalize_url(registry_url))
    with engine.begin() as c:
        c.execute(s.meta.update().where(s.meta.c.name == "schema_version")
                  .values(value=str(s.SCHEMA_VERSION + 1)))
    engine.dispose()
    before = _state(registry_url)
    with pytest.raises(errors.SchemaVersionError, match="upgrade lamin-io"):
        ln.connect(registry_url, tmp_path / "storage")
    assert _state(registry_url) == before


@pytest.mark.parametrize("version", [1, s.SCHEMA_VERSION - 1])
def test_migration_killed_midway_changes_nothing(registry_url, tmp_path, cli_env, version):
    create_old_registry(registry_url, version)
    before = _state(registry_url)
    env = dict(cli_env, LAMIN_IO_KILL_AT="migration")
    done = subprocess.run(
        [sys.executable, "-c", f"import lamin_io as ln; ln.connect({registry_url!r}, "
                               f"{str(tmp_path / 'storage')!r})"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _state(registry_url) == before  # the migration's steps were never committed
    conn = ln.connect(registry_url, tmp_path / "storage")  # and it runs whole next time
    with conn.db.read() as c:
        assert c.execute(select(s.meta.c.value)).scalar() == str(s.SCHEMA_VERSION)
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert ln.Artifact(tmp_path / "x.csv", key="x.csv").save(mute=True).run is None
