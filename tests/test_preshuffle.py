"""``preshuffle``: a collection rewritten in a random order, as zarr shards.

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


def _adata(seed: int, n_obs: int, kind: str, genes: list[str]) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, len(genes), density=0.3, format="csr", dtype=np.float32,
                  random_state=seed)
    x.data = np.round(x.data * 10).astype(np.float32) + 1
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["B", "T", "NK"][seed % 2:],
                                                               n_obs)),
                        "n_counts": rng.integers(0, 100, n_obs).astype(np.int64)},
                       index=[f"f{seed}_c{i}" for i in range(n_obs)])
    if seed == 0:
        obs["batch"] = pd.Categorical(rng.choice(["x", "y"], n_obs))
    matrix: Any = {"csr": x, "csc": x.tocsc(), "dense": x.toarray()}[kind]
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[ad.AnnData]]:
    """Sorted cell types per file, three layouts, one file with fewer genes."""
    folder = tmp_path_factory.mktemp("preshuffle")
    adatas = [_adata(0, 120, "csr", GENES), _adata(1, 80, "csc", GENES),
              _adata(2, 100, "dense", GENES[:25])]
    paths = [folder / "a.h5ad", folder / "b.zarr", folder / "c.h5ad"]
    for adata, path in zip(adatas, paths, strict=True):
        adata.write_zarr(path) if path.suffix == ".zarr" else adata.write_h5ad(path)
    return paths, adatas


def _collection(conn: Any, paths: list[Path]) -> Any:
    saved = [ln.Artifact(p, key=f"in/{p.name}").save() for p in paths]
    return ln.Collection(saved, key="atlas").save()


def _shards(collection: Any) -> list[ad.AnnData]:
    return [ad.read_zarr(a.cache()) for a in collection.artifacts]


def _check_rows(shards: list[ad.AnnData], truth: dict[str, ad.AnnData], genes: list[str],
                keys: list[str]) -> None:
    """Every shard row equals its source row (X over ``genes``, obs ``keys``, name)."""
    for shard in shards:
        assert list(shard.var_names) == genes
        x = shard.X.toarray()
        for k in range(shard.n_obs):
            source = truth[shard.obs["source_file"].iloc[k]]
            row = int(shard.obs["source_row"].iloc[k])
            want = np.zeros(len(genes), dtype=np.float32)
            dense = np.asarray(source.X.toarray() if sp.issparse(source.X) else source.X)
            where = pd.Index(source.var_names).get_indexer(genes)
            want[where >= 0] = dense[row, where[where >= 0]]
            assert np.array_equal(x[k], want)
            assert shard.obs_names[k] == source.obs_names[row]
            for key in keys:
                assert shard.obs[key].iloc[k] == source.obs[key].iloc[row]


def test_every_cell_once_in_a_random_order(conn: Any, files: Any, tmp_path: Path) -> None:
    paths, adatas = files
    collection = _collection(conn, paths)
    spill = tmp_path / "spill"
    spill.mkdir()
    shuffled = preshuffle(collection, "atlas-shuffled", shard_bytes=60 * 40, tmp_dir=spill)
    assert shuffled.key == "atlas-shuffled"
    members = list(shuffled.artifacts)
    assert [a.key for a in members] == [f"atlas-shuffled/part-{i:05d}.zarr"
                                        for i in range(len(members))]
    # the shards follow shard_bytes: rows hold ~9 values of float32 and int32 here
    assert len(members) >= 4
    shards = _shards(shuffled)
    truth = {f"in/{p.name}": a for p, a in zip(paths, adatas, strict=True)}
    _check_rows(shards, truth, GENES[:25], ["cell_type", "n_counts"])
    cells = [(f, int(r)) for s in shards for f, r in zip(s.obs["source_file"],
                                                           s.obs["source_row"], strict=True)]
    assert sorted(cells) == sorted((f"in/{p.name}", r) for p, a in zip(
        paths, adatas, strict=True) for r in range(a.n_obs))
    # not in the stored order: each shard mixes the files, rows out of order
    for shard in shards:
        assert shard.obs["source_file"].nunique() == 3
        rows = shard.obs["source_row"].to_numpy()
        assert not np.all(np.diff(rows[shard.obs["source_file"] == "in/a.h5ad"]) > 0)
    # X in small chunks: a block of rows is a short read
    group = zarr.open_group(str(members[0].cache()), mode="r")
    assert group["X/data"].chunks == (CHUNK,)
    assert group["X/indices"].chunks == (CHUNK,)
    assert not any(spill.iterdir())  # the spilled rows are gone


def test_same_seed_same_shards_another_seed_another_order(conn: Any, files: Any) -> None:
    collection = _collection(conn, files[0])
    first = collection.preshuffle("shuffled", shard_bytes=10_000)
    again = collection.preshuffle("shuffled", shard_bytes=10_000)
    assert again.uid == first.uid
    other = collection.preshuffle("shuffled-seed-1", seed=1, shard_bytes=10_000)
    assert other.uid != first.uid
    names = [list(s.obs_names) for s in _shards(first)]
    assert names != [list(s.obs_names) for s in _shards(other)]


def test_filter_outer_join_and_a_column_of_some_files(conn: Any, files: Any) -> None:
    paths, adatas = files
    collection = _collection(conn, paths)
    shuffled = collection.preshuffle("t-cells", obs_filter={"cell_type": "T"}, join="outer",
                                     obs_keys=["cell_type", "batch"])
    shards = _shards(shuffled)
    total = sum(s.n_obs for s in shards)
    assert total == sum(int((a.obs["cell_type"] == "T").sum()) for a in adatas)
    truth = {f"in/{p.name}": a for p, a in zip(paths, adatas, strict=True)}
    _check_rows(shards, truth, sorted(GENES), ["cell_type"])
    for shard in shards:
        assert list(shard.obs.columns) == ["cell_type", "batch", "source_file",
                                           "source_row"]
        assert set(shard.obs["cell_type"]) == {"T"}
        only_a = shard.obs["source_file"] == "in/a.h5ad"
        # "batch" is in a.h5ad alone: missing in the others
        assert shard.obs.loc[~only_a.to_numpy(), "batch"].isna().all()
        assert shard.obs.loc[only_a.to_numpy(), "batch"].notna().all()


def test_paths_in_and_a_loader_over_the_shards(conn: Any, files: Any) -> None:
    torch = pytest.importorskip("torch")
    paths, adatas = files
    shuffled = preshuffle(paths, "from-paths", shard_bytes=60 * 40, seed=3)
    truth = {p.name: a for p, a in zip(paths, adatas, strict=True)}
    shards = _shards(shuffled)
    # the default obs keys: the columns every file has
    assert list(shards[0].obs.columns) == ["cell_type", "n_counts", "source_file",
                                           "source_row"]
    source = pd.concat([s.obs for s in shards])
    seen = 0
    with shuffled.loader(batch_size=32, block_size=64, obs_keys=["source_row"],
                         encode_labels=False) as loader:
        for batch in loader:
            x = batch["X"]
            assert x.dtype == torch.float32
            ids = batch["_store_idx"]
            assert len(x) == len(ids)
            seen += len(x)
    assert seen == len(source) == sum(a.n_obs for a in adatas)
    _check_rows(shards[:1], truth, GENES[:25], ["cell_type", "n_counts"])


def test_bad_input_is_refused_and_leaves_nothing(conn: Any, files: Any,
                                                 tmp_path: Path) -> None:
    collection = _collection(conn, files[0])
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(errors.InvalidArgumentError, match="no cells"):
        collection.preshuffle("none", obs_filter={"cell_type": "unknown"}, tmp_dir=spill)
    with pytest.raises(errors.NameNotFoundError, match="'donor'"):
        collection.preshuffle("x", obs_keys=["donor"], tmp_dir=spill)
    with pytest.raises(errors.InvalidArgumentError, match="shard_bytes"):
        collection.preshuffle("x", shard_bytes=0)
    with pytest.raises(errors.InvalidArgumentError, match="join"):
        collection.preshuffle("x", join=None)
    with pytest.raises(errors.InvalidKeyError):
        collection.preshuffle("")
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
    _collection(None, files[0])
    done = run("preshuffle", "atlas", "atlas-shuffled", "--seed", "2", "--obs-key",
               "cell_type", "--shard-mb", "1", "--mute")
    assert done.returncode == 0, done.stderr
    assert "atlas-shuffled" in done.stdout
    assert "1 shard(s)" in done.stdout
    shards = _shards(ln.Collection.get(key="atlas-shuffled"))
    assert list(shards[0].obs.columns) == ["cell_type", "source_file", "source_row"]
    missing = run("preshuffle", "no-such-collection", "x")
    assert missing.returncode == 3
    assert missing.stderr.startswith("error: ")
    assert len(missing.stderr.strip().splitlines()) == 1
