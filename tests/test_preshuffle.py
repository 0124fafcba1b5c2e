"""``preshuffle``: AnnData files rewritten in a random order, as zarr shards.

The truth is AnnData in memory: every shard row is the source row its ``source_file`` and
``source_row`` name, with its obs values and name, and every selected cell is in exactly
one shard once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import lamin_io as ln
from lamin_io import errors
from lamin_io.loaders import preshuffle
from lamin_io.loaders._preshuffle import CHUNK

if TYPE_CHECKING:
    from pathlib import Path

GENES = [f"g{i}" for i in range(30)]
SIZES = (1200, 900, 1000)


def _adata(seed: int, n_obs: int, kind: str, genes: list[str]) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, len(genes), density=0.3, format="csr", dtype=np.float32,
                  random_state=seed)
    x.data = np.round(x.data * 10).astype(np.float32) + 1
    types = sorted(rng.choice(["B", "T", "NK"][seed % 2:], n_obs))  # stored in runs
    obs = pd.DataFrame({"cell_type": pd.Categorical(types),
                        "n_counts": rng.integers(0, 100, n_obs).astype(np.int64)},
                       index=pd.Index([f"f{seed}_c{i}" for i in range(n_obs)], name="cell_id"))
    if seed == 0:
        obs["batch"] = pd.Categorical(rng.choice(["x", "y"], n_obs))
    matrix: Any = {"csr": x, "csc": x.tocsc(), "dense": x.toarray()}[kind]
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[ad.AnnData]]:
    """Cell types stored sorted, three layouts, one file with fewer genes, a named index."""
    folder = tmp_path_factory.mktemp("preshuffle")
    adatas = [_adata(0, SIZES[0], "csr", GENES), _adata(1, SIZES[1], "csc", GENES),
              _adata(2, SIZES[2], "dense", GENES[:25])]
    paths = [folder / "a.h5ad", folder / "b.zarr", folder / "c.h5ad"]
    for adata, path in zip(adatas, paths, strict=True):
        adata.write_zarr(path) if path.suffix == ".zarr" else adata.write_h5ad(path)
    return paths, adatas


def _collection(paths: list[Path]) -> Any:
    saved = [ln.Artifact(p, key=f"in/{p.name}").save() for p in paths]
    return ln.Collection(saved, key="atlas").save()


def _read(paths: list[Any]) -> list[ad.AnnData]:
    return [ad.read_zarr(p) for p in paths]


def _check_rows(shards: list[ad.AnnData], truth: dict[str, ad.AnnData], genes: list[str],
                keys: list[str]) -> None:
    """Every shard row equals its source row (X over ``genes``, obs ``keys``, name)."""
    for shard in shards:
        assert list(shard.var_names) == genes
        x = shard.X.toarray()
        for name, source in truth.items():
            mine = np.flatnonzero((shard.obs["source_file"] == name).to_numpy())
            rows = shard.obs["source_row"].to_numpy()[mine]
            dense = np.asarray(source.X.toarray() if sp.issparse(source.X) else source.X)
            where = pd.Index(source.var_names).get_indexer(genes)
            want = np.zeros((len(rows), len(genes)), dtype=np.float32)
            want[:, where >= 0] = dense[rows][:, where[where >= 0]]
            np.testing.assert_array_equal(x[mine], want)
            assert list(shard.obs_names[mine]) == list(source.obs_names[rows])
            for key in keys:
                assert list(shard.obs[key].iloc[mine]) == list(source.obs[key].iloc[rows])


def test_every_cell_once_in_a_random_order(conn: Any, files: Any, tmp_path: Path) -> None:
    paths, adatas = files
    spill = tmp_path / "spill"
    spill.mkdir()
    shuffled = _collection(paths).preshuffle("atlas-shuffled", shard_bytes=80 * 2**10,
                                             tmp_dir=spill, mute=True)
    assert shuffled.key == "atlas-shuffled"
    members = list(shuffled.artifacts)
    assert [a.key for a in members] == [f"atlas-shuffled/part-{i:05d}.zarr"
                                        for i in range(len(members))]
    assert len(members) == 3  # 3100 cells of ~68 bytes in 80 KiB shards (1024 cells at least)
    shards = _read([a.cache() for a in members])
    truth = {f"in/{p.name}": a for p, a in zip(paths, adatas, strict=True)}
    # the named index is the obs names, not a column; columns in their stored order
    assert list(shards[0].obs.columns) == ["cell_type", "n_counts", "source_file",
                                           "source_row"]
    _check_rows(shards, truth, GENES[:25], ["cell_type", "n_counts"])
    cells = sorted((f, int(r)) for s in shards for f, r in zip(
        s.obs["source_file"], s.obs["source_row"], strict=True))
    assert cells == sorted((f"in/{p.name}", r) for p, a in zip(paths, adatas, strict=True)
                           for r in range(a.n_obs))
    for shard in shards:  # each shard mixes the files, and the sorted types
        assert shard.obs["source_file"].nunique() == 3
        rows = shard.obs["source_row"].to_numpy()[(shard.obs["source_file"] == "in/a.h5ad")]
        assert not np.all(np.diff(rows) > 0)
        assert shard.uns["preshuffle"]["tag"] == "atlas-shuffled"
    group = zarr.open_group(str(members[0].cache()), mode="r")
    assert group["X/data"].chunks == (CHUNK,)  # X in small chunks: a block is a short read
    assert group["X/indices"].chunks == (CHUNK,)
    assert not any(spill.iterdir())  # the spilled rows and staged shards are gone


def test_same_key_and_seed_same_collection_others_differ(conn: Any, files: Any) -> None:
    collection = _collection(files[0])
    first = collection.preshuffle("shuffled", shard_bytes=80 * 2**10, mute=True)
    assert collection.preshuffle("shuffled", shard_bytes=80 * 2**10).uid == first.uid
    other = collection.preshuffle("shuffled-seed-1", seed=1, mute=True)
    assert other.uid != first.uid
    assert [list(s.obs_names) for s in _read([a.cache() for a in first.artifacts])] != [
        list(s.obs_names) for s in _read([a.cache() for a in other.artifacts])]
    # the same cells and seed under another key: shards of their own (their tag differs)
    twin = collection.preshuffle("twin", shard_bytes=80 * 2**10, mute=True)
    assert twin.key == "twin"
    assert {a.key for a in twin.artifacts} == {f"twin/part-{i:05d}.zarr" for i in range(3)}


def test_filter_outer_join_and_a_column_of_some_files(conn: Any, files: Any) -> None:
    paths, adatas = files
    shuffled = _collection(paths).preshuffle("t-cells", obs_filter={"cell_type": "T"},
                                             join="outer", obs_keys=["cell_type", "batch"],
                                             mute=True)
    shards = _read([a.cache() for a in shuffled.artifacts])
    assert sum(s.n_obs for s in shards) == sum(int((a.obs["cell_type"] == "T").sum())
                                               for a in adatas)
    truth = {f"in/{p.name}": a for p, a in zip(paths, adatas, strict=True)}
    _check_rows(shards, truth, sorted(GENES), ["cell_type"])
    for shard in shards:
        assert set(shard.obs["cell_type"]) == {"T"}
        only_a = (shard.obs["source_file"] == "in/a.h5ad").to_numpy()
        rows = shard.obs["source_row"].to_numpy()[only_a]
        assert list(shard.obs["batch"][only_a]) == list(adatas[0].obs["batch"].iloc[rows])
        assert shard.obs["batch"][~only_a].isna().all()  # "batch" is in a.h5ad alone


def test_paths_to_a_folder_and_a_loader_over_the_shards(files: Any, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    paths, adatas = files
    written = preshuffle(paths, tmp_path / "out", shard_bytes=80 * 2**10, seed=3,
                         mute=True)
    assert [p.name for p in written] == ["part-00000.zarr", "part-00001.zarr",
                                         "part-00002.zarr"]
    shards = _read(written)
    truth = {p.name: a for p, a in zip(paths, adatas, strict=True)}
    _check_rows(shards, truth, GENES[:25], ["cell_type", "n_counts"])
    x = np.vstack([s.X.toarray() for s in shards])
    seen: list[int] = []
    with ln.loaders.BlockLoader(written, batch_size=64, block_size=64) as loader:
        for batch, items in zip(loader, loader.batches(0), strict=True):
            assert batch["X"].dtype == torch.float32
            np.testing.assert_array_equal(batch["X"].numpy(), x[items])
            seen.extend(items.tolist())
    assert sorted(seen) == list(range(sum(SIZES)))


def test_column_and_value_types(tmp_path: Path) -> None:
    """Values of different types across files are widened; nullable numbers stay numbers."""
    first = ad.AnnData(sp.csr_matrix(np.arange(1, 7, dtype=np.int32).reshape(3, 2)),
                       obs=pd.DataFrame({"k": pd.array([1, None, 3], dtype="Int64"),
                                         "ok": pd.array([True, False, None], dtype="boolean"),
                                         "mixed": ["a", "b", "c"]},
                                        index=["a0", "a1", "a2"]),
                       var=pd.DataFrame(index=["g0", "g1"]))
    second = ad.AnnData(sp.csr_matrix(np.array([[0.5, 1.25]], dtype=np.float32)),
                        obs=pd.DataFrame({"k": pd.array([7], dtype="Int64"),
                                          "ok": pd.array([True], dtype="boolean"),
                                          "mixed": [1.5]}, index=["b0"]),
                        var=pd.DataFrame(index=["g0", "g1"]))
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    with pytest.raises(errors.InvalidArgumentError, match="'mixed'"):
        preshuffle(paths, tmp_path / "out", mute=True)
    (shard,) = _read(preshuffle(paths, tmp_path / "out", obs_keys=["k", "ok"], mute=True))
    order = [("a.h5ad", 0), ("a.h5ad", 1), ("a.h5ad", 2), ("b.h5ad", 0)]
    at = [order.index((f, int(r))) for f, r in zip(shard.obs["source_file"],
                                                    shard.obs["source_row"], strict=True)]
    x = np.vstack([first.X.toarray(), second.X.toarray()])
    assert shard.X.dtype == np.float64  # (int32 and float32 files: numpy's common type)
    np.testing.assert_array_equal(shard.X.toarray(), x[at])
    np.testing.assert_array_equal(shard.obs["k"].to_numpy(), np.array(
        [1, np.nan, 3, 7])[at])
    np.testing.assert_array_equal(shard.obs["ok"].to_numpy(dtype=float), np.array(
        [1, 0, np.nan, 1])[at])


def test_bad_input_is_refused_and_leaves_nothing(conn: Any, files: Any,
                                                 tmp_path: Path) -> None:
    paths, _ = files
    collection = _collection(paths)
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(errors.InvalidArgumentError, match="no cells"):
        collection.preshuffle("none", obs_filter={"cell_type": "unknown"}, tmp_dir=spill)
    with pytest.raises(errors.NameNotFoundError, match="'donor'"):
        collection.preshuffle("x", obs_keys=["donor"], tmp_dir=spill)
    with pytest.raises(errors.InvalidArgumentError, match="shard_bytes"):
        collection.preshuffle("x", shard_bytes=0)
    with pytest.raises(errors.InvalidArgumentError, match="seed"):
        collection.preshuffle("x", seed=-1)
    with pytest.raises(errors.InvalidArgumentError, match="tmp_dir"):
        collection.preshuffle("x", tmp_dir=tmp_path / "missing")
    with pytest.raises(errors.InvalidArgumentError, match="join"):
        collection.preshuffle("x", join=None)
    with pytest.raises(errors.InvalidKeyError):
        collection.preshuffle("")
    with pytest.raises(errors.NameNotFoundError, match="no layer 'counts'"):
        collection.preshuffle("x", layer="counts")
    with_raw = _adata(5, 50, "csr", GENES)
    with_raw.raw = with_raw.copy()
    with_raw.write_h5ad(tmp_path / "raw.h5ad")
    with pytest.raises(errors.InvalidArgumentError, match="raw.X"):
        preshuffle([tmp_path / "raw.h5ad"], tmp_path / "out", layer="raw.X")
    assert not any(spill.iterdir())
    assert [c.key for c in ln.Collection.filter()] == ["atlas"]
    assert len(ln.Artifact.filter()) == 3


def test_cli(files: Any, tmp_path: Path, cli_env: dict[str, str]) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lamin_io.cli", *args], env=cli_env,
                              capture_output=True, text=True, timeout=300, check=False)

    assert run("connect", "--registry", str(tmp_path / "r.db"), "--storage",
               str(tmp_path / "store")).returncode == 0
    ln.connect(tmp_path / "r.db", tmp_path / "store")
    _collection(files[0])
    done = run("preshuffle", "atlas", "atlas-shuffled", "--seed", "2", "--obs-key",
               "cell_type", "--shard-mb", "1", "--mute")
    assert done.returncode == 0, done.stderr
    assert "atlas-shuffled" in done.stdout
    assert "1 shard(s)" in done.stdout
    (shard,) = _read([a.cache() for a in ln.Collection.get(key="atlas-shuffled").artifacts])
    assert list(shard.obs.columns) == ["cell_type", "source_file", "source_row"]
    assert shard.n_obs == sum(SIZES)
    for args, code in ((("no-such-collection", "x"), 3),
                       (("atlas", "y", "--seed", "-1"), 1)):
        failed = run("preshuffle", *args)
        assert failed.returncode == code
        assert failed.stderr.startswith("error: ")
        assert len(failed.stderr.strip().splitlines()) == 1
