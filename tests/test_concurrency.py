"""Several processes writing one registry: no lost and no duplicated records."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from sqlalchemy import func, select

import lamin_io as ln
from lamin_io.registry import _schema as s

N_PROCS = 4
N_FILES = 4


def _writer(registry: str, storage: str, endpoint: str | None, folder: str, worker: int,
            barrier: mp.synchronize.Barrier) -> None:
    ln.connect(registry, storage, endpoint_url=endpoint)
    barrier.wait()
    base = Path(folder)
    ln.Artifact(base / "shared.csv", key="shared.csv").save(mute=True)  # same content
    for i in range(N_FILES):
        ln.Artifact(base / f"w{worker}_{i}.csv", key=f"own/w{worker}_{i}.csv").save(mute=True)
    ln.Artifact(base / f"same_key_{worker}.csv", key="versions.csv").save(mute=True)


def test_concurrent_writers(registry_url, storage_root, tmp_path, request):
    endpoint = request.getfixturevalue("s3_endpoint") if storage_root.startswith("s3") else None
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "shared.csv").write_text("a\nshared\n")
    for w in range(N_PROCS):
        (folder / f"same_key_{w}.csv").write_text(f"a\nversion-from-{w}\n")
        for i in range(N_FILES):
            (folder / f"w{w}_{i}.csv").write_text(f"a\n{w}-{i}\n")
    ln.connect(registry_url, storage_root, endpoint_url=endpoint)  # create the schema
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(N_PROCS)
    procs = [ctx.Process(target=_writer, args=(registry_url, storage_root, endpoint,
                                               str(folder), w, barrier))
             for w in range(N_PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * N_PROCS

    conn = ln.connect(registry_url, storage_root, endpoint_url=endpoint)
    with conn.db.read() as c:
        statuses = c.execute(select(s.artifact.c.status, func.count())
                             .group_by(s.artifact.c.status)).all()
    assert dict(statuses) == {"ready": 1 + N_PROCS * N_FILES + N_PROCS}
    assert len(ln.Artifact.filter(key="shared.csv")) == 1
    assert len(ln.Artifact.filter(key__startswith="own/")) == N_PROCS * N_FILES
    versions = ln.Artifact.filter(key="versions.csv")
    assert sorted(int(v.version) for v in versions) == list(range(1, N_PROCS + 1))
    assert sum(v.is_latest for v in versions) == 1
    assert ln.Artifact.get(key="versions.csv").version == str(N_PROCS)
