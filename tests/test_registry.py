"""Artifacts and collections on real registries (SQLite, PostgreSQL) and storage (local, S3)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import write_bytes

import lamin_io as ln
from lamin_io import errors


def _adata(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.random((20, 5), dtype=np.float32))
    a.obs["cell_type"] = pd.Categorical(rng.choice(["B", "T", "NK"], 20))
    return a


def test_save_twice_gives_one_record(conn_any_db, tmp_path):
    f = write_bytes(tmp_path / "a.csv", b"x,y\n1,2\n")
    first = ln.Artifact(f, key="p/a.csv").save()
    second = ln.Artifact(f, key="p/a.csv").save()
    assert first == second
    assert len(ln.Artifact.filter()) == 1


def test_same_content_other_key_warns_and_stores_once(conn_any_db, tmp_path, caplog):
    f = write_bytes(tmp_path / "a.csv", b"x,y\n1,2\n")
    first = ln.Artifact(f, key="p/a.csv").save()
    with caplog.at_level(logging.WARNING):
        second = ln.Artifact(f, key="q/b.csv").save()
    assert second.uid == first.uid
    assert second.key == "p/a.csv"
    assert "p/a.csv" in caplog.text
    assert len(ln.Artifact.filter()) == 1


def test_files_differing_in_one_byte_hash_apart(conn, tmp_path):
    data = bytearray(np.random.default_rng(0).bytes(3 * 2**20))
    a = write_bytes(tmp_path / "a.bin", bytes(data))
    data[2 * 2**20 + 7] ^= 1  # flip one bit deep inside the file
    b = write_bytes(tmp_path / "b.bin", bytes(data))
    ra, rb = ln.Artifact(a).save(), ln.Artifact(b).save()
    assert ra.hash != rb.hash
    assert ra.size == rb.size == 3 * 2**20


def test_local_to_storage_to_cache_is_byte_identical(conn, tmp_path):
    payload = np.random.default_rng(1).bytes(2 * 2**20 + 13)
    f = write_bytes(tmp_path / "blob.h5ad", payload)
    art = ln.Artifact(f, key="raw/blob.h5ad").save()
    f.unlink()
    local = art.cache()
    assert local.read_bytes() == payload
    again = ln.Artifact.get(key="raw/blob.h5ad").cache()
    assert again == local
    assert again.read_bytes() == payload


def test_edited_cache_copy_is_fetched_again(conn, tmp_path, storage_kind):
    if storage_kind == "local":
        pytest.skip("local storage has no cache copy: cache() returns the stored file")
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    art = ln.Artifact(f, key="t.csv").save()
    local = art.cache()
    local.write_bytes(b"a\n999\n")
    assert art.cache().read_bytes() == b"a\n1\n"


def test_a_cache_entry_from_before_inodes_were_recorded_is_kept(conn, tmp_path, storage_kind,
                                                                  request):
    """A sidecar holding size and modification time only still vouches for its copy."""
    if storage_kind == "local":
        pytest.skip("local storage has no cache copy: cache() returns the stored file")
    art = ln.Artifact(write_bytes(tmp_path / "t.csv", b"a\n1\n"), key="t.csv").save()
    local = art.cache()
    sidecar = local.parent / ".stat.json"
    old = {rel: state[:2] for rel, state in json.loads(sidecar.read_text()).items()}
    sidecar.write_text(json.dumps(old))
    server = request.getfixturevalue("s3_server")
    server.reset()
    assert art.cache() == local
    assert server.stats.gets() == []  # kept, not downloaded again
    local.write_bytes(b"a\n2\n")  # an edited copy still is
    assert art.cache().read_bytes() == b"a\n1\n"


def test_folder_manifest_round_trip(conn, tmp_path):
    folder = tmp_path / "store.zarr"
    write_bytes(folder / "zarr.json", b'{"zarr_format": 3}')
    write_bytes(folder / "X" / "c" / "0", b"\x00" * 1000)
    write_bytes(folder / "X" / "c" / "1", b"\x01" * 10)
    art = ln.Artifact(folder, key="data/store.zarr").save()
    assert art.n_files == 3
    assert art.size == 1000 + 10 + len(b'{"zarr_format": 3}')
    assert [e[0] for e in art.manifest.entries] == ["X/c/0", "X/c/1", "zarr.json"]
    local = art.cache()
    assert (local / "X" / "c" / "0").read_bytes() == b"\x00" * 1000
    # a folder differing in a single file hashes apart
    write_bytes(folder / "X" / "c" / "1", b"\x02" * 10)
    assert ln.Artifact(folder, key="data/store.zarr").save().hash != art.hash


def test_load_anndata_and_tables(conn, tmp_path):
    adata = _adata()
    adata.write_h5ad(tmp_path / "a.h5ad")
    adata.write_zarr(tmp_path / "a.zarr")
    df = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    df.to_parquet(tmp_path / "t.parquet")
    df.to_csv(tmp_path / "t.csv", index=False)
    loaded = ln.Artifact(tmp_path / "a.h5ad", key="a.h5ad").save().load()
    np.testing.assert_array_equal(loaded.X, adata.X)
    pd.testing.assert_frame_equal(loaded.obs, adata.obs)
    loaded_z = ln.Artifact(tmp_path / "a.zarr", key="a.zarr").save().load()
    np.testing.assert_array_equal(loaded_z.X, adata.X)
    pd.testing.assert_frame_equal(ln.Artifact(tmp_path / "t.parquet").save().load(), df)
    pd.testing.assert_frame_equal(ln.Artifact(tmp_path / "t.csv").save().load(), df)


def test_versions(conn_any_db, tmp_path):
    f = tmp_path / "t.csv"
    write_bytes(f, b"a\n1\n")
    v1 = ln.Artifact(f, key="t.csv", description="first").save()
    write_bytes(f, b"a\n2\n")
    v2 = ln.Artifact(f, key="t.csv").save()  # same key, new content: a new version
    write_bytes(f, b"a\n3\n")
    v3 = ln.Artifact(f, key="t.csv", revises=v2, version="final").save()
    assert [v.version for v in v1.versions] == ["1", "2", "final"]
    assert (v1.is_latest, v2.is_latest, v3.is_latest) == (False, False, True)
    assert ln.Artifact.get(key="t.csv") == v3
    assert ln.Artifact.get(key="t.csv", version="1") == v1
    assert len(ln.Artifact.filter(key="t.csv", is_latest=True)) == 1
    v3.delete()
    assert ln.Artifact.get(key="t.csv") == v2
    assert v2.is_latest
    write_bytes(f, b"a\n4\n")
    with pytest.raises(errors.InvalidArgumentError, match="already exists"):
        ln.Artifact(f, key="t.csv", version="1").save()


def test_filter_lookups(conn_any_db, tmp_path):
    for i, name in enumerate(["proj/a.csv", "proj/b.parquet", "other/c.csv"]):
        suffix = Path(name).suffix
        if suffix == ".parquet":
            pd.DataFrame({"i": [i]}).to_parquet(tmp_path / f"{i}{suffix}")
        else:
            write_bytes(tmp_path / f"{i}{suffix}", f"i\n{i}\n".encode())
        ln.Artifact(tmp_path / f"{i}{suffix}", key=name,
                    description=f"PBMC set {i}").save()
    assert {a.key for a in ln.Artifact.filter(key__startswith="proj/")} == {
        "proj/a.csv", "proj/b.parquet"}
    assert [a.key for a in ln.Artifact.filter(suffix=".parquet")] == ["proj/b.parquet"]
    assert len(ln.Artifact.filter(description__contains="PBMC")) == 3
    assert len(ln.Artifact.filter(description__contains="pbmc")) == 0
    assert len(ln.Artifact.filter(description__icontains="pbmc")) == 3
    assert len(ln.Artifact.filter(size__gt=0, key__endswith=".csv")) == 2
    assert len(ln.Artifact.filter(key__startswith="proj_")) == 0  # '_' is no wildcard
    df = ln.Artifact.filter().df()
    assert list(df["key"]) == ["proj/a.csv", "proj/b.parquet", "other/c.csv"]
    with pytest.raises(errors.InvalidArgumentError, match="cannot filter on 'colour'"):
        ln.Artifact.filter(colour="red")
    with pytest.raises(errors.ArtifactNotFoundError) as info:
        ln.Artifact.get(key="missing.csv")
    assert isinstance(info.value, LookupError)
    with pytest.raises(errors.MultipleResultsError):
        ln.Artifact.get(suffix=".csv")


def test_ordering_and_pages(conn_any_db, tmp_path):
    sizes = {"a.csv": 30, "b.csv": 10, "c.csv": 20, "d.csv": 10}
    for name, size in sizes.items():
        ln.Artifact(write_bytes(tmp_path / name, name[0].encode() * size), key=name).save()
    keys = lambda found: [a.key for a in found]  # noqa: E731
    assert keys(ln.Artifact.filter()) == ["a.csv", "b.csv", "c.csv", "d.csv"]  # as saved
    assert keys(ln.Artifact.filter(order_by="size")) == ["b.csv", "d.csv", "c.csv", "a.csv"]
    assert keys(ln.Artifact.filter(order_by=["-size", "-key"])) == [
        "a.csv", "c.csv", "d.csv", "b.csv"]
    assert keys(ln.Artifact.filter(order_by="-created_at", limit=2)) == ["d.csv", "c.csv"]
    pages = [keys(ln.Artifact.filter(order_by="key", limit=3, offset=o)) for o in (0, 3, 6)]
    assert pages == [["a.csv", "b.csv", "c.csv"], ["d.csv"], []]
    assert keys(ln.Artifact.filter(size=10, order_by="-key", limit=1)) == ["d.csv"]
    with pytest.raises(errors.InvalidArgumentError, match="cannot order by 'colour'"):
        ln.Artifact.filter(order_by="colour")
    with pytest.raises(errors.InvalidArgumentError, match="limit and offset"):
        ln.Artifact.filter(limit=-1)


def test_in_place_registration_does_not_copy(conn, tmp_path):
    root = conn.root
    target = root / "raw" / "in_place.csv"
    target.fs.makedirs(target.parent.path, exist_ok=True)
    target.fs.pipe_file(target.path, b"a\n1\n")
    art = ln.Artifact(str(target)).save()
    assert art.key == "raw/in_place.csv"
    assert not art.is_managed
    assert art.path.path == target.path
    assert not (root / ".lamin-io" / "objects").exists()
    art.delete()
    assert target.exists()  # files registered in place stay on delete


def test_delete_removes_managed_object(conn, tmp_path):
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    art = ln.Artifact(f, key="t.csv").save()
    stored = art.path
    assert stored.exists()
    art.delete()
    assert not stored.exists()
    with pytest.raises(errors.ArtifactNotFoundError):
        ln.Artifact.get(key="t.csv")


def test_collections(conn_any_db, tmp_path):
    arts = []
    for i in range(3):
        f = write_bytes(tmp_path / f"{i}.csv", f"i\n{i}\n".encode())
        arts.append(ln.Artifact(f, key=f"c/{i}.csv").save())
    c1 = ln.Collection([arts[2], arts[0]], key="atlas", description="two").save()
    assert [a.key for a in c1.artifacts] == ["c/2.csv", "c/0.csv"]
    assert ln.Collection([arts[2], arts[0]], key="atlas").save() == c1
    c2 = ln.Collection(arts, key="atlas").save()
    assert [c.version for c in c2.versions] == ["1", "2"]
    assert ln.Collection.get(key="atlas") == c2
    assert not c1.is_latest
    assert [p.read_bytes() for p in c2.cache()] == [b"i\n0\n", b"i\n1\n", b"i\n2\n"]
    with pytest.raises(errors.RegistryError, match="atlas"):
        arts[0].delete()
    c1.delete()
    c2.delete()
    arts[0].delete()


def test_describe_and_repr(conn, tmp_path, capsys):
    f = write_bytes(tmp_path / "t.csv", b"a\n1\n")
    unsaved = ln.Artifact(f, key="t.csv", description="demo")
    assert "unsaved" in repr(unsaved)
    art = unsaved.save()
    assert "t.csv" in repr(art)
    assert art.uid in repr(art)
    text = art.describe()
    assert "demo" in text
    assert art.hash in text
    assert text in capsys.readouterr().out


def test_a_record_of_another_registry_is_refused_until_reconnected(tmp_path):
    """A record read from registry A, used while connected to B, never reads B's rows."""
    a_url, b_url = tmp_path / "a.db", tmp_path / "b.db"
    ln.connect(a_url, tmp_path / "a-storage")
    first = ln.Artifact(write_bytes(tmp_path / "x.csv", b"a\n1\n"), key="x.csv").save()
    ln.Artifact(write_bytes(tmp_path / "x2.csv", b"a\n2\n"), key="x.csv",
                revises=first).save()
    collection = ln.Collection([first], key="set").save()
    queried = ln.Artifact.get(key="x.csv", version="1")
    ln.connect(b_url, tmp_path / "b-storage")
    # the same ids exist in B, with other content
    ln.Artifact(write_bytes(tmp_path / "y.csv", b"b\n3\n"), key="y.csv").save()
    ln.Collection([ln.Artifact.get(key="y.csv")], key="other").save()
    for use in (lambda: collection.artifacts, lambda: first.versions, lambda: first.path,
                lambda: queried.cache(), lambda: queried.load(), lambda: first.is_latest,
                lambda: ln.Collection([first], key="mixed").save(),
                lambda: ln.Artifact(write_bytes(tmp_path / "z.csv", b"z\n4\n"), key="x.csv",
                                    revises=first).save(), collection.delete):
        with pytest.raises(errors.RegistryMismatchError, match="a.db") as info:
            use()
        assert "b.db" in str(info.value)
    assert [a.key for a in ln.Artifact.filter()] == ["y.csv"]  # B unchanged
    ln.connect(a_url, tmp_path / "a-storage")  # back to A: the records work again
    assert [a.key for a in collection.artifacts] == ["x.csv"]
    assert [v.version for v in first.versions] == ["1", "2"]
    assert queried.cache().read_bytes() == b"a\n1\n"
    assert list(queried.load()["a"]) == [1]


def test_records_keep_working_in_other_threads(conn, tmp_path):
    """Relationships are queried when read (no session to detach from), from any thread."""
    from concurrent.futures import ThreadPoolExecutor

    first = ln.Artifact(write_bytes(tmp_path / "x.csv", b"a\n1\n"), key="x.csv").save()
    ln.Artifact(write_bytes(tmp_path / "x2.csv", b"a\n2\n"), key="x.csv", revises=first).save()
    collection = ln.Collection([first], key="set").save()
    found = ln.Collection.get(key="set")
    with ThreadPoolExecutor(4) as pool:
        keys = list(pool.map(lambda _: [a.key for a in found.artifacts], range(8)))
        versions = list(pool.map(lambda _: [v.version for v in first.versions], range(8)))
    assert keys == [["x.csv"]] * 8
    assert versions == [["1", "2"]] * 8
    assert collection.artifacts[0].cache().read_bytes() == b"a\n1\n"
