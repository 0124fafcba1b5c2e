"""Lineage: runs of transforms, with the artifacts and collections they read and saved."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import grouped_h5ad

import lamin_io as ln
from lamin_io.errors import InvalidArgumentError, RegistryMismatchError


def _table(path: Path, value: int) -> Path:
    pd.DataFrame({"a": [value, value + 1]}).to_parquet(path)
    return path


def test_track_records_inputs_once_and_outputs(conn_any_db, tmp_path):
    raw = ln.Artifact(_table(tmp_path / "raw.parquet", 1), key="raw.parquet").save(mute=True)
    other = ln.Artifact(_table(tmp_path / "other.parquet", 5), key="o.parquet").save(mute=True)
    skipped = ln.Artifact(_table(tmp_path / "skip.parquet", 7), key="s.parquet").save(mute=True)
    with ln.track(params={"lr": 0.1, "layers": [2, 3]}) as run:
        assert ln.registry.active_run() == run
        df = ln.Artifact.get(key="raw.parquet").load()
        raw.cache()  # the same artifact read again: still one input
        raw.open().to_table()
        other.cache()
        skipped.load(is_run_input=False)
        out = ln.Artifact(_table(tmp_path / "clean.parquet", int(df.a.sum())),
                          key="clean.parquet").save(mute=True)
        out.load()  # its own output read back is no input
    assert ln.registry.active_run() is None
    assert [r.uid for r in run.inputs] == [raw.uid, other.uid]
    assert [r.uid for r in run.outputs] == [out.uid]
    assert out.run == run
    assert raw.run is None
    assert raw.transform is None
    assert run.status == "completed"
    assert run.finished_at is not None
    assert run.finished_at >= run.started_at
    assert run.params == {"lr": 0.1, "layers": [2, 3]}
    assert run.user
    assert run.host
    transform = out.transform
    source = Path(__file__).read_bytes()
    assert transform.name == Path(__file__).name
    assert transform.kind == "script"
    assert transform.hash == hashlib.sha256(source).hexdigest()
    assert transform.version == transform.hash[:12]
    assert transform.reference == str(Path(__file__).resolve())
    assert transform.runs == ln.Run.filter(transform=transform)
    assert [r.uid for r in transform.runs] == [run.uid]
    # saved outside a run: no run; the same content again returns the record, unchanged
    after = ln.Artifact(_table(tmp_path / "after.parquet", 9), key="after.parquet").save(mute=True)
    assert after.run is None
    with ln.track(name="again"):
        again = ln.Artifact(tmp_path / "clean.parquet", key="clean.parquet").save(mute=True)
    assert again.uid == out.uid
    assert again.run == run


def test_filter_by_run_and_transform(conn_any_db, tmp_path):
    with ln.track(name="first-step") as first:
        a = ln.Artifact(_table(tmp_path / "a.parquet", 1), key="a.parquet").save(mute=True)
    with ln.track(name="second-step") as second:
        b = ln.Artifact(_table(tmp_path / "b.parquet", 2), key="b.parquet").save(mute=True)
        c = ln.Collection([a, b], key="ab").save()
    assert ln.Artifact.filter(run=first) == ln.Artifact.filter(uid=a.uid)
    assert ln.Artifact.filter(run=second.uid) == ln.Artifact.filter(uid=b.uid)
    assert [x.uid for x in ln.Artifact.filter(transform="second-step")] == [b.uid]
    assert [x.uid for x in ln.Artifact.filter(transform=first.transform)] == [a.uid]
    assert [x.uid for x in ln.Collection.filter(run=second)] == [c.uid]
    assert ln.Artifact.filter(transform="no-such-step") == ln.Artifact.filter(uid="none")
    assert [r.uid for r in ln.Run.filter(transform="first-step")] == [first.uid]
    assert ln.Transform.get(name="second-step").kind == "script"
    assert ln.Run.get(second.uid).transform.name == "second-step"
    assert [r.uid for r in ln.Run.filter(status="completed", order_by="-started_at")] == \
        [second.uid, first.uid]


def test_versions_and_writable_copies(conn, tmp_path):
    v1 = ln.Artifact(_table(tmp_path / "t.parquet", 1), key="t.parquet").save(mute=True)
    store = tmp_path / "cells.zarr"
    ad.AnnData(np.ones((4, 3), dtype=np.float32)).write_zarr(store)
    z1 = ln.Artifact(store, key="cells.zarr").save(mute=True)
    with ln.track(name="revise") as run:
        v2 = ln.Artifact(_table(tmp_path / "t2.parquet", 2), key="t.parquet").save(mute=True)
        with z1.open("r+") as acc:  # a private copy, saved as a new version on close
            acc.add_column(where="obs", col_name="n", col=np.arange(4))
    z2 = ln.Artifact.get(key="cells.zarr")
    assert z2.version == "2"
    assert z2.run == run
    assert v2.run == run
    assert v2.versions[0].run is None
    assert v1.run is None
    assert [r.uid for r in run.inputs] == [z1.uid]  # one input for the copy and its reads
    assert {r.uid for r in run.outputs} == {v2.uid, z2.uid}


def test_collections_and_mapped_loaders(conn_any_db, tmp_path):
    members = []
    for i in range(2):
        grouped_h5ad(tmp_path / f"d{i}.h5ad", 20, 5, "ab", seed=i)
        members.append(ln.Artifact(tmp_path / f"d{i}.h5ad", key=f"d{i}.h5ad").save(mute=True))
    atlas = ln.Collection(members, key="atlas").save()
    with ln.track(name="train") as run:
        with atlas.mapped(obs_keys=["g"]) as ds:
            assert len(ds) == 40
        with atlas.loader(batch_size=8, obs_keys=["g"]) as loader:
            assert sum(len(b["g"]) for b in loader) == 40
        with ln.Artifact.filter(key="d0.h5ad").mapped() as ds:
            assert len(ds) == 20
        subset = ln.Collection(members[:1], key="subset").save()
    # the collection is the input (once), not each member; a member mapped alone is its own
    assert [(type(r).__name__, r.uid) for r in run.inputs] == \
        [("Collection", atlas.uid), ("Artifact", members[0].uid)]
    assert [r.uid for r in run.outputs] == [subset.uid]
    assert subset.run == run
    assert atlas.run is None


def test_mapped_in_dataloader_workers_adds_no_inputs(conn, tmp_path):
    torch = pytest.importorskip("torch")
    grouped_h5ad(tmp_path / "d.h5ad", 32, 4, "ab", seed=0)
    artifact = ln.Artifact(tmp_path / "d.h5ad", key="d.h5ad").save(mute=True)
    collection = ln.Collection([artifact], key="one").save()
    with ln.track(name="workers") as run:
        with collection.mapped() as ds:
            loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
            assert sum(len(b["X"]) for b in loader) == 32
    assert [r.uid for r in run.inputs] == [collection.uid]


def test_failures_mark_the_run_failed(conn_any_db, tmp_path):
    def half_done() -> None:
        ln.Artifact(_table(tmp_path / "half.parquet", 1), key="half.parquet").save(mute=True)
        _ = 1 / 0

    with pytest.raises(ZeroDivisionError), ln.track(name="broken") as run:
        half_done()
    assert run.status == "failed"
    assert run.error == "ZeroDivisionError: division by zero"
    assert [r.key for r in run.outputs] == ["half.parquet"]
    with pytest.raises(SystemExit), ln.track(name="exits") as run:
        sys.exit(3)
    assert run.status == "failed"
    with pytest.raises(SystemExit), ln.track(name="exits-ok") as run:
        sys.exit(0)
    assert run.status == "completed"
    assert ln.registry.active_run() is None
    with pytest.raises(InvalidArgumentError, match="no run is active"):
        ln.finish()


def _script(tmp_path: Path, registry: str, body: str) -> Path:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import lamin_io as ln
        ln.connect({registry!r}, {str(tmp_path / "storage")!r})
    """) + textwrap.dedent(body))
    return script


def test_scripts_end_their_runs(registry_url, tmp_path, cli_env):
    crash = _script(tmp_path, registry_url, """
        ln.track(params={"n": 1})
        raise RuntimeError("the model diverged")
    """)
    done = subprocess.run([sys.executable, str(crash)], env=cli_env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1
    assert "the model diverged" in done.stderr
    clean = _script(tmp_path, registry_url, """
        ln.track()
        print(ln.registry.active_run().uid)
    """)
    done = subprocess.run([sys.executable, str(clean)], env=cli_env, capture_output=True,
                          text=True, check=True)
    ln.connect(registry_url, tmp_path / "storage")
    failed, completed = ln.Run.filter(order_by="started_at")
    assert failed.status == "failed"
    assert failed.error == "RuntimeError: the model diverged"
    assert failed.params == {"n": 1}
    assert failed.transform.name == "job.py"
    assert completed.uid == done.stdout.strip()
    assert completed.status == "completed"
    # the script changed between the runs: two versions of the transform "job.py"
    assert len(ln.Transform.filter(name="job.py")) == 2
    # no script file (python -c): the work must be named
    done = subprocess.run([sys.executable, "-c", f"import lamin_io as ln; "
                           f"ln.connect({registry_url!r}, {str(tmp_path / 's')!r}); ln.track()"],
                          env=cli_env, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "name the work with lamin_io.track(name=" in done.stderr


def test_track_arguments(conn, tmp_path):
    with pytest.raises(InvalidArgumentError, match="JSON-serializable"):
        ln.track(name="x", params={"f": object()})
    with pytest.raises(InvalidArgumentError, match="must be a dict"):
        ln.track(name="x", params=[1])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="is not a file"):
        ln.track(source=tmp_path / "missing.py")
    assert ln.registry.active_run() is None
    notebook = tmp_path / "analysis.ipynb"
    notebook.write_text('{"cells": []}')
    first = ln.track(source=notebook)
    assert first.transform.kind == "notebook"
    assert first.transform.name == "analysis.ipynb"
    second = ln.track(name="next")  # tracking again finishes the active run first
    assert first.status == "completed"
    assert ln.registry.active_run() == second
    ln.finish()
    assert second.status == "completed"
    assert ln.registry.active_run() is None


def test_threads_share_the_run(conn_any_db, tmp_path):
    sources = [ln.Artifact(_table(tmp_path / f"in{i}.parquet", 10 * i), key=f"in{i}.parquet")
               .save(mute=True) for i in range(4)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for artifact in sources:  # every thread reads every input
                artifact.load()
            ln.Artifact(_table(tmp_path / f"out{i}.parquet", 100 + i),
                        key=f"out{i}.parquet").save(mute=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with ln.track(name="threads") as run:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert sorted(r.uid for r in run.inputs) == sorted(a.uid for a in sources)
    assert sorted(r.key for r in run.outputs) == sorted(f"out{i}.parquet" for i in range(6))


def test_relationships_outlive_sessions_and_threads(registry_url, tmp_path):
    ln.connect(registry_url, tmp_path / "storage")
    raw = ln.Artifact(_table(tmp_path / "raw.parquet", 1), key="raw.parquet").save(mute=True)
    with ln.track(name="step") as run:
        raw.load()
        out = ln.Artifact(_table(tmp_path / "out.parquet", 2), key="out.parquet").save(mute=True)
        collection = ln.Collection([out], key="c").save()
    queried = ln.Run.get(run.uid)
    found = ln.Artifact.get(key="out.parquet")
    ln.disconnect()  # every pooled session closed
    ln.connect(registry_url, tmp_path / "storage")
    seen: dict[str, object] = {}

    def read() -> None:
        seen["inputs"] = [r.uid for r in queried.inputs]
        seen["outputs"] = [r.uid for r in queried.outputs]
        seen["run"] = found.run.uid
        seen["members"] = [a.uid for a in ln.Collection.get(key="c").artifacts]

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert seen == {"inputs": [raw.uid], "outputs": [out.uid, collection.uid],
                    "run": run.uid, "members": [out.uid]}
    ln.connect(tmp_path / "other.db", tmp_path / "storage")
    for use in (lambda: queried.inputs, lambda: queried.outputs, lambda: found.run,
                lambda: queried.transform, lambda: found.view_lineage()):
        with pytest.raises(RegistryMismatchError, match="connect to"):
            use()
    ln.connect(registry_url, tmp_path / "storage")
    assert [r.uid for r in queried.inputs] == [raw.uid]


def test_a_run_stays_in_its_registry(tmp_path, caplog):
    ln.connect(tmp_path / "a.db", tmp_path / "storage")
    with ln.track(name="in-a") as run:
        ln.connect(tmp_path / "b.db", tmp_path / "storage")
        b = ln.Artifact(_table(tmp_path / "b.parquet", 1), key="b.parquet").save(mute=True)
        b.load()
        ln.connect(tmp_path / "a.db", tmp_path / "storage")
    assert "are not linked to it" in caplog.text
    assert run.outputs == ln.Artifact.filter(uid="none")
    assert len(run.inputs) == 0
    ln.connect(tmp_path / "b.db", tmp_path / "storage")
    assert b.run is None
    assert len(ln.Run.filter()) == 0


def test_view_lineage(conn, tmp_path, capsys):
    raw = ln.Artifact(_table(tmp_path / "raw.parquet", 1), key="raw.parquet").save(mute=True)
    with ln.track(name="clean") as cleaning:
        raw.load()
        clean = ln.Artifact(_table(tmp_path / "clean.parquet", 2),
                            key="clean.parquet").save(mute=True)
        both = ln.Collection([raw, clean], key="both").save()
    with ln.track(name="report") as report:
        both.cache()
        clean.load()
        final = ln.Artifact(_table(tmp_path / "final.parquet", 3),
                            key="final.parquet").save(mute=True)
    text = final.view_lineage()
    assert capsys.readouterr().out.strip() == text
    lines = text.splitlines()
    assert lines[0] == f"artifact final.parquet (v1, uid {final.uid})"
    assert lines[1].startswith(f"└── run {report.uid} · script report (")
    assert lines[1].endswith("· completed")
    assert f"collection both (v1, uid {both.uid})" in lines[2]
    assert f"run {cleaning.uid} · script clean" in lines[3]
    assert f"artifact raw.parquet (v1, uid {raw.uid})" in lines[4]
    assert "(saved outside a tracked run)" in lines[5]
    assert f"artifact clean.parquet (v1, uid {clean.uid})" in lines[6]
    assert lines[7].endswith("completed  (shown above)")  # the clean run, not expanded again
    assert len(lines) == 8
    shallow = final.view_lineage(depth=1)  # the inputs' runs are shown, not their inputs
    assert "... 1 input(s)" in shallow
    assert "raw.parquet" not in shallow
    assert final.view_lineage(depth=0).splitlines()[-1].endswith("... 2 input(s)")
    assert "read by:" in raw.view_lineage()
    assert f"run {cleaning.uid}" in raw.view_lineage().split("read by:")[1]
    text = report.view_lineage()
    assert text.splitlines()[0].startswith(f"run {report.uid}")
    assert text.splitlines()[-2:] == ["outputs:",
                                      f"    artifact final.parquet (v1, uid {final.uid})"]
    with pytest.raises(InvalidArgumentError, match="depth"):
        final.view_lineage(depth=-1)
    with pytest.raises(InvalidArgumentError, match=r"\.svg"):
        final.view_lineage(image=tmp_path / "graph.txt")
    dot = tmp_path / "graph.dot"
    final.view_lineage(image=dot)
    source = dot.read_text()
    for record in (raw, clean, both, final):
        assert record.uid in source
    assert f'"run_{report.uid}" -> "artifact_{final.uid}"' in source or \
        f"run_{report.uid} -> artifact_{final.uid}" in source


def test_lineage_image_with_dot(conn, tmp_path):
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot program is not installed")
    with ln.track(name="draw"):
        out = ln.Artifact(_table(tmp_path / "o.parquet", 1), key="o.parquet").save(mute=True)
    svg = tmp_path / "lineage.svg"
    out.view_lineage(image=svg)
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "o.parquet" in svg.read_text()


def test_deleting_an_input_unlinks_it(conn_any_db, tmp_path, capsys):
    a = ln.Artifact(_table(tmp_path / "a.parquet", 1), key="a.parquet").save(mute=True)
    b = ln.Artifact(_table(tmp_path / "b.parquet", 2), key="b.parquet").save(mute=True)
    with ln.track(name="reads-two") as run:
        a.load()
        b.load()
        out = ln.Artifact(_table(tmp_path / "c.parquet", 3), key="c.parquet").save(mute=True)
    a.delete()
    assert [r.uid for r in run.inputs] == [b.uid]
    assert f"run          {run.uid} (reads-two, completed)" in out.describe()
