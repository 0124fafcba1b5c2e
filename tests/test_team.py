"""A registry shared by a team: one database and one bucket, used by several people at once.

Eight client processes save, version and track runs against one registry (SQLite, and
PostgreSQL when ``LAMIN_IO_TEST_POSTGRES`` is set) and one storage (local, and the loopback
S3 server); a forked child uses the registry beside its parent; switching credentials or
registries never reuses a client made for the previous ones (a wrong key is refused by an S3
server that checks signatures); and the PostgreSQL roles the README's "For a team" lists
are enough for what it says each may do, and refuse the rest with a typed error.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import _postgres_database, write_bytes
from sqlalchemy import select

import lamin_io as ln
from lamin_io import errors
from lamin_io.registry import _schema as s

if TYPE_CHECKING:
    from collections.abc import Iterator

N_CLIENTS = 8
N_OWN = 2  # files only one client saves


def _client(registry: str, storage: str, endpoint: str | None, folder: str, client: int,
            barrier: Any, results: Any) -> None:
    """One team member: reads the shared input, saves its own files, the shared file and a
    new version of the shared key, all in one tracked run; reports what it saved."""
    try:
        ln.connect(registry, storage, endpoint_url=endpoint)
        barrier.wait(timeout=120)
        base = Path(folder)
        with ln.track(name=f"client-{client}", params={"client": client}) as run:
            ln.Artifact.get(key="team/input.csv").load()
            own = [ln.Artifact(base / f"c{client}_{i}.csv", key=f"team/own/c{client}_{i}.csv")
                   .save(mute=True).uid for i in range(N_OWN)]
            shared = ln.Artifact(base / "shared.csv", key="team/shared.csv").save(mute=True)
            version = ln.Artifact(base / f"version_{client}.csv", key="team/versions.csv") \
                .save(mute=True)
        results.put(("ok", client, {"run": run.uid, "own": own, "shared": shared.uid,
                                    "version": version.uid}))
    except BaseException:
        results.put(("error", client, traceback.format_exc()))
        raise


def test_eight_clients_share_one_registry_and_storage(registry_url, storage_root, tmp_path,
                                                      request) -> None:
    endpoint = request.getfixturevalue("s3_endpoint") if storage_root.startswith("s3") else None
    folder = tmp_path / "src"
    write_bytes(folder / "input.csv", b"a\ninput\n")
    write_bytes(folder / "shared.csv", b"a\nshared\n")
    write_bytes(folder / "version_first.csv", b"a\nfirst version\n")
    for c in range(N_CLIENTS):
        write_bytes(folder / f"version_{c}.csv", f"a\nversion of client {c}\n".encode())
        for i in range(N_OWN):
            write_bytes(folder / f"c{c}_{i}.csv", f"a\n{c}-{i}\n".encode())
    conn = ln.connect(registry_url, storage_root, endpoint_url=endpoint)
    source = ln.Artifact(folder / "input.csv", key="team/input.csv").save(mute=True)
    first = ln.Artifact(folder / "version_first.csv", key="team/versions.csv").save(mute=True)

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(N_CLIENTS), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(registry_url, storage_root, endpoint,
                                               str(folder), c, barrier, results))
             for c in range(N_CLIENTS)]
    for p in procs:
        p.start()
    reports = _reports(results, procs)
    for p in procs:
        p.join(timeout=60)
    failures = [f"client {c}:\n{detail}" for status, c, detail in reports if status != "ok"]
    assert not failures, "\n".join(failures)
    assert [p.exitcode for p in procs] == [0] * N_CLIENTS
    assert len(reports) == N_CLIENTS
    saved = {c: detail for _, c, detail in reports}

    conn = ln.connect(registry_url, storage_root, endpoint_url=endpoint)
    with conn.db.read() as c:
        rows = c.execute(select(s.artifact)).all()
        run_rows = c.execute(select(s.run)).all()
        input_rows = c.execute(select(s.run_input)).all()
    # every row is there once, and ready: nothing lost, nothing duplicated, nothing half-saved
    assert Counter(r.status for r in rows) == {
        "ready": 1 + N_CLIENTS * N_OWN + 1 + 1 + N_CLIENTS}
    assert len({r.hash for r in rows}) == len(rows)
    assert len({r.uid for r in rows}) == len(rows)
    assert len({(r.storage_id, r.storage_key) for r in rows}) == len(rows)
    families = defaultdict(list)
    for r in rows:
        families[r.family_uid].append(r)
    for members in families.values():  # versions 1..n, exactly one latest: the last
        assert sorted(m.version_index for m in members) == list(range(1, len(members) + 1))
        assert [m.version_index for m in members if m.is_latest] == [len(members)]
    versions = ln.Artifact.filter(key="team/versions.csv")
    assert [v.version for v in versions] == [str(i) for i in range(1, N_CLIENTS + 2)]
    assert versions[0] == first
    assert {v.uid for v in versions[1:]} == {d["version"] for d in saved.values()}
    assert ln.Artifact.get(key="team/versions.csv").is_latest
    shared = ln.Artifact.get(key="team/shared.csv")
    assert {d["shared"] for d in saved.values()} == {shared.uid}  # one record for all
    own = ln.Artifact.filter(key__startswith="team/own/")
    assert sorted(a.uid for a in own) == sorted(u for d in saved.values() for u in d["own"])

    # storage holds exactly the objects the records point to: no orphan, none missing
    root = conn.root
    prefix = root.path.rstrip("/") + "/"
    stored = {p.removeprefix(prefix) for p in root.fs.find(root.path)}
    assert stored == {r.storage_key for r in rows}
    if storage_root.startswith("s3"):  # no multipart upload left unfinished either
        bucket, _, key_prefix = root.path.partition("/")
        pending = root.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix)
        assert not pending.get("Uploads")

    # one run a client, each with exactly its outputs and its one input
    assert len(run_rows) == N_CLIENTS
    assert {r.status for r in run_rows} == {"completed"}
    assert len(input_rows) == N_CLIENTS
    run_ids = {r.uid: r.id for r in run_rows}
    shared_row = next(r for r in rows if r.uid == shared.uid)
    shared_by = [uid for uid, run_id in run_ids.items() if shared_row.run_id == run_id]
    assert len(shared_by) == 1  # the client whose save made the record
    for detail in saved.values():
        run = ln.Run.get(detail["run"])
        expected = {*detail["own"], detail["version"]}
        if detail["run"] in shared_by:
            expected.add(shared.uid)
        assert {o.uid for o in run.outputs} == expected
        assert [i.uid for i in run.inputs] == [source.uid]


def _reports(results: Any, procs: list[Any], timeout: float = 300) -> list[Any]:
    """Collect one report a process, until all came or every process has ended."""
    reports: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(reports) < len(procs) and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=1))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break  # (one died before it could report: its exit code says so)
    return reports


def _forked_child(folder: str, results: Any) -> None:
    """In a forked child: use the connection the parent made, as a DataLoader worker would."""
    try:
        for i in range(10):
            assert ln.Artifact.get(key="parent.csv").load().to_dict() == {"a": {0: 1}}
            ln.Artifact(Path(folder) / f"child_{i}.csv", key=f"child/{i}.csv").save(mute=True)
        results.put("ok")
    except BaseException:
        results.put(traceback.format_exc())
        raise


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_the_registry_beside_its_parent(registry_url, tmp_path) -> None:
    """The child opens connections of its own: parent and child never share one (a shared
    PostgreSQL socket or SQLite handle would mix their transactions or fail)."""
    folder = tmp_path / "src"
    for i in range(10):
        write_bytes(folder / f"child_{i}.csv", f"a\nchild {i}\n".encode())
        write_bytes(folder / f"parent_{i}.csv", f"a\nparent {i}\n".encode())
    ln.connect(registry_url, tmp_path / "storage")
    ln.Artifact(write_bytes(folder / "parent.csv", b"a\n1\n"), key="parent.csv").save(mute=True)
    assert len(ln.Artifact.filter()) == 1  # the pool holds the connection this used
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(str(folder), results))
    child.start()
    for i in range(10):  # the parent goes on meanwhile, with its pooled connections
        assert ln.Artifact.get(key="parent.csv").version == "1"
        ln.Artifact(folder / f"parent_{i}.csv", key=f"parent/{i}.csv").save(mute=True)
    outcome = results.get(timeout=120)
    child.join(timeout=60)
    assert outcome == "ok", outcome
    assert child.exitcode == 0
    assert len(ln.Artifact.filter(key__startswith="child/")) == 10
    assert len(ln.Artifact.filter(key__startswith="parent/")) == 10


# -- switching credentials and registries --------------------------------------------------

@pytest.mark.parametrize("given", ["storage_options", "environment"])
def test_switching_credentials_never_reuses_a_client(auth_server, tmp_path, monkeypatch,
                                                     given) -> None:
    """Good key, then a wrong one (refused, with a typed error: no client of the good key
    answers), then the good one again (works)."""
    db, storage = tmp_path / "r.db", f"s3://{auth_server['bucket']}/{uuid.uuid4().hex}"
    endpoint = auth_server["endpoint"]
    good = {"key": auth_server["key"], "secret": auth_server["secret"]}
    wrong = {"key": good["key"], "secret": "not-the-secret"}

    def connect(keys: dict[str, str]) -> None:
        if given == "environment":  # the standard chain: the options hold no key
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["key"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["secret"])
            ln.connect(db, storage, endpoint_url=endpoint)
        else:
            ln.connect(db, storage, endpoint_url=endpoint, storage_options=dict(keys))

    connect(good)
    ln.Artifact(write_bytes(tmp_path / "x.parquet", _parquet()), key="x.parquet").save(mute=True)
    artifact = ln.Artifact.get(key="x.parquet")
    assert artifact.load()["a"].tolist() == [1, 2]
    assert artifact.open().to_table()["a"].to_pylist() == [1, 2]  # pyarrow's own client

    connect(wrong)
    for read in (lambda: ln.Artifact.get(key="x.parquet").load(),
                 lambda: ln.Artifact.get(key="x.parquet").open()):
        with pytest.raises(errors.StoragePermissionError, match="refused access"):
            read()
    with pytest.raises(errors.StoragePermissionError):
        ln.Artifact(write_bytes(tmp_path / "y.csv", b"a\n2\n"), key="y.csv").save(mute=True)
    assert [a.key for a in ln.Artifact.filter()] == ["x.parquet"]  # the failed save left none

    connect(good)
    assert ln.Artifact.get(key="x.parquet").open().to_table()["a"].to_pylist() == [1, 2]
    ln.Artifact(tmp_path / "y.csv", key="y.csv").save(mute=True)


def _parquet() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2]}), sink)
    return sink.getvalue()


def test_connect_and_disconnect_forget_every_client(s3_endpoint, tmp_path) -> None:
    """After reads through s3fs, pyarrow and pinned ranged reads, nothing cached survives."""
    from fsspec import get_filesystem_class

    from lamin_io.storage import _engines, _pinned

    ln.connect(tmp_path / "r.db", f"s3://lamin-io-test/{uuid.uuid4().hex}",
               endpoint_url=s3_endpoint)
    ln.Artifact(write_bytes(tmp_path / "x.parquet", _parquet()), key="x.parquet").save(mute=True)
    ln.Artifact.get(key="x.parquet").open().to_table()
    _pinned.PinnedObject(ln.Artifact.get(key="x.parquet").path).read_at(4, 0)

    def cached() -> dict[str, int]:
        return {"s3fs": len(get_filesystem_class("s3")._cache),  # noqa: SLF001
                "pyarrow": _engines._s3_filesystem.cache_info().currsize,  # noqa: SLF001
                "botocore": _pinned._client.cache_info().currsize}  # noqa: SLF001

    assert all(cached().values()), cached()
    ln.connect(tmp_path / "other.db", tmp_path / "storage")
    assert not any(cached().values()), cached()
    ln.connect(tmp_path / "r.db", f"s3://lamin-io-test/{uuid.uuid4().hex}",
               endpoint_url=s3_endpoint)
    ln.Artifact.get(key="x.parquet").open().to_table()
    assert cached()["pyarrow"]
    ln.disconnect()
    assert not any(cached().values()), cached()


def test_switching_registries_shows_the_new_ones_records(registry_url, tmp_path) -> None:
    ln.connect(registry_url, tmp_path / "storage-a")
    a = ln.Artifact(write_bytes(tmp_path / "a.csv", b"a\n1\n"), key="a.csv").save(mute=True)
    ln.connect(tmp_path / "b.db", tmp_path / "storage-b")
    ln.Artifact(write_bytes(tmp_path / "b.csv", b"a\n2\n"), key="b.csv").save(mute=True)
    assert [x.key for x in ln.Artifact.filter()] == ["b.csv"]
    with pytest.raises(errors.RegistryMismatchError):  # a record of A, while connected to B
        a.load()
    ln.connect(registry_url, tmp_path / "storage-a")
    assert [x.key for x in ln.Artifact.filter()] == ["a.csv"]
    assert a.load().to_dict() == {"a": {0: 1}}


# -- roles ---------------------------------------------------------------------------------


@pytest.fixture
def postgres_roles(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL registry and storage, created by its admin; a reader and a writer
    role on it, with the grants of the README's "For a team" table.

    Returns the registry URL of each role (``admin``, ``writer``, ``reader``) and the
    ``storage`` root.
    """
    import psycopg
    from sqlalchemy.engine import make_url

    base = os.environ.get("LAMIN_IO_TEST_POSTGRES")
    if not base:
        pytest.skip("LAMIN_IO_TEST_POSTGRES is not set")
    tag = uuid.uuid4().hex[:8]
    for admin_url in _postgres_database(base):
        storage = str(tmp_path / "team-storage")
        ln.connect(admin_url, storage)  # the schema, and the team's storage root
        ln.disconnect()
        plain = admin_url.replace("postgresql://", "postgresql+psycopg://", 1)
        urls = {"admin": admin_url, "storage": storage}
        grants = {
            "reader": ["GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}"],
            "writer": ["GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                       "TO {r}", "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {r}"],
        }
        database = make_url(plain).database
        dsn = make_url(plain).set(drivername="postgresql").render_as_string(
            hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as c:
            for role, statements in grants.items():
                name = f"lamin_io_{role}_{tag}"
                c.execute(f"CREATE ROLE {name} LOGIN")
                c.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
                c.execute(f"GRANT USAGE ON SCHEMA public TO {name}")
                for statement in statements:
                    c.execute(statement.format(r=name))
                urls[role] = make_url(plain).set(username=name, drivername="postgresql") \
                    .render_as_string(hide_password=False)
        try:
            yield urls
        finally:
            ln.disconnect()
            with psycopg.connect(dsn, autocommit=True) as c:
                for role in grants:
                    c.execute(f"DROP OWNED BY lamin_io_{role}_{tag}")
                    c.execute(f"DROP ROLE lamin_io_{role}_{tag}")


def test_database_roles_of_a_team(postgres_roles, tmp_path) -> None:
    """A writer saves, versions, tracks, deletes and collects garbage; a reader connects,
    lists and reads, and is refused any change with a typed error."""
    storage = postgres_roles["storage"]  # registered by the admin
    ln.connect(postgres_roles["writer"], storage)
    with ln.track(name="writer's run"):
        first = ln.Artifact(write_bytes(tmp_path / "a.csv", b"a\n1\n"), key="a.csv") \
            .save(mute=True)
        ln.Artifact(write_bytes(tmp_path / "a2.csv", b"a\n2\n"), key="a.csv").save(mute=True)
    doomed = ln.Artifact(write_bytes(tmp_path / "d.csv", b"a\n3\n"), key="d.csv").save(mute=True)
    doomed.delete()
    ln.gc(older_than=0)

    ln.connect(postgres_roles["reader"], storage)  # a current schema and root: only read
    assert [a.version for a in ln.Artifact.filter(key="a.csv")] == ["1", "2"]
    assert ln.Artifact.get(key="a.csv", version="1").load().to_dict() == {"a": {0: 1}}
    assert ln.Artifact.get(first.uid).run.transform.name == "writer's run"
    # the same database as another role is the same registry: the writer's records work
    assert first.run.transform.name == "writer's run"
    assert first.load().to_dict() == {"a": {0: 1}}
    with pytest.raises(errors.RegistryPermissionError, match="writer's privileges"):
        ln.Artifact(write_bytes(tmp_path / "b.csv", b"a\n4\n"), key="b.csv").save(mute=True)
    with pytest.raises(errors.RegistryPermissionError):
        ln.Artifact.get(key="a.csv").delete()
    with pytest.raises(errors.RegistryPermissionError):
        ln.track(name="reader's run")
    with pytest.raises(errors.RegistryPermissionError):  # registering another root writes
        ln.connect(postgres_roles["reader"], tmp_path / "another-storage")
    ln.connect(postgres_roles["reader"], storage)
    assert len(ln.Artifact.filter()) == 2
    assert sorted(p.name for p in Path(storage).rglob("*") if p.is_file()) == sorted(
        a.path.name for a in ln.Artifact.filter())  # the refused save stored nothing
