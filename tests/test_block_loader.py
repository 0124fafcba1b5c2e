"""``BlockLoader``: random blocks of neighbouring rows, read a fetch at a time.

The truth is AnnData in memory: every batch holds the rows of the cells its epoch's order
names, and every epoch yields each selected cell once, in each shuffle mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lamin_io import errors
from lamin_io.loaders import BlockLoader, MappedCollection
from lamin_io.loaders._block import Plan, epoch_batches, epoch_order

if TYPE_CHECKING:
    from pathlib import Path

torch = pytest.importorskip("torch")

GENES = [f"g{i}" for i in range(12)]
MODES = ["block", "random", False]


def _adata(seed: int, n_obs: int, kind: str) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, len(GENES), density=0.4, format="csr", dtype=np.float32,
                  random_state=seed)
    x.data = np.round(x.data * 10).astype(np.float32) + 1
    types = ["B", "T", "NK", "Mono"][seed % 2:]
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(types, n_obs)),
                        "donor": pd.Categorical(rng.choice(["d1", "d2"], n_obs))},
                       index=[f"f{seed}_c{i}" for i in range(n_obs)])
    matrix: Any = {"csr": x, "csc": x.tocsc(), "dense": x.toarray()}[kind]
    adata = ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=GENES))
    adata.obsm["X_pca"] = rng.random((n_obs, 3)).astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[ad.AnnData]]:
    folder = tmp_path_factory.mktemp("block")
    adatas = [_adata(0, 70, "csr"), _adata(1, 45, "csc"), _adata(2, 50, "dense")]
    paths = [folder / "a.h5ad", folder / "b.zarr", folder / "c.h5ad"]
    for adata, path in zip(adatas, paths, strict=True):
        adata.write_zarr(path) if path.suffix == ".zarr" else adata.write_h5ad(path)
    return paths, adatas


def _truth(adatas: list[ad.AnnData]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X, cell types and obsm of every cell of the files, in collection order."""
    x = np.vstack([np.asarray(a.X.toarray() if sp.issparse(a.X) else a.X) for a in adatas])
    labels = np.concatenate([a.obs["cell_type"].astype(str).to_numpy() for a in adatas])
    pca = np.vstack([a.obsm["X_pca"] for a in adatas])
    return x, labels, pca


@pytest.mark.parametrize("shuffle", MODES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("n", [0, 1, 17, 100])
def test_epoch_order_is_a_permutation_of_blocks(n: int, block_size: int, shuffle: Any) -> None:
    order = epoch_order(n, seed=3, epoch=1, key=7, shuffle=shuffle, block_size=block_size)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    again = epoch_order(n, seed=3, epoch=1, key=7, shuffle=shuffle, block_size=block_size)
    np.testing.assert_array_equal(order, again)  # a pure function
    if shuffle == "block":  # runs of block_size neighbours, each starting at a block edge
        i = 0
        while i < n:
            start = int(order[i])
            assert start % block_size == 0
            length = min(block_size, n - start)
            np.testing.assert_array_equal(order[i:i + length],
                                          np.arange(start, start + length))
            i += length
    if shuffle is False:
        np.testing.assert_array_equal(order, np.arange(n))


def test_epochs_seeds_and_collections_give_other_orders() -> None:
    base = epoch_order(1000, seed=0, epoch=0, key=1)
    for other in (epoch_order(1000, seed=1, epoch=0, key=1),
                  epoch_order(1000, seed=0, epoch=1, key=1),
                  epoch_order(1000, seed=0, epoch=0, key=2)):
        assert not np.array_equal(base, other)
    with pytest.raises(errors.InvalidArgumentError, match="shuffle"):
        epoch_order(10, seed=0, epoch=0, key=0, shuffle="sorted")


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", MODES)
def test_epoch_batches_hold_every_item_once(shuffle: Any, drop_last: bool) -> None:
    n, batch = 1003, 32
    batches = epoch_batches(n, batch, seed=0, epoch=2, key=5, shuffle=shuffle,
                            block_size=8, fetch_factor=4, drop_last=drop_last)
    assert all(len(b) == batch for b in batches[:-1])
    items = np.concatenate(batches)
    assert len(np.unique(items)) == len(items)  # none twice
    assert len(items) == (n - n % batch if drop_last else n)
    if shuffle == "block":  # a fetch holds whole blocks, shuffled among its batches
        fetch = np.concatenate(batches[:4])
        assert len(np.unique(fetch // 8)) <= len(fetch) // 8 + 1


@pytest.mark.parametrize("shuffle", MODES)
def test_batches_equal_anndata(files: Any, shuffle: Any) -> None:
    paths, adatas = files
    x, labels, pca = _truth(adatas)
    with BlockLoader(paths, batch_size=16, shuffle=shuffle, block_size=4, fetch_factor=3,
                     obs_keys=["cell_type"], obsm_keys=["X_pca"]) as loader:
        decode = {v: k for k, v in loader.dataset.encoders["cell_type"].items()}
        assert len(loader) == -(-165 // 16)
        got = list(loader)
        want = loader.batches(0)
        assert len(got) == len(want) == len(loader)
        for batch, items in zip(got, want, strict=True):
            assert batch["X"].dtype == torch.float32
            np.testing.assert_array_equal(batch["X"].numpy(), x[items])
            np.testing.assert_array_equal(batch["obsm_X_pca"].numpy(), pca[items])
            assert [decode[int(v)] for v in batch["cell_type"]] == labels[items].tolist()
        assert sorted(np.concatenate(want).tolist()) == list(range(165))  # each cell once


def test_sparse_batches_equal_dense_ones(files: Any) -> None:
    paths, _ = files
    with MappedCollection(paths, obs_keys=["cell_type"]) as ds:
        dense = list(BlockLoader(ds, batch_size=20, seed=4))
        sparse = list(BlockLoader(ds, batch_size=20, seed=4, sparse=True))
        for a, b in zip(dense, sparse, strict=True):
            assert b["X"].layout == torch.sparse_csr
            torch.testing.assert_close(b["X"].to_dense(), a["X"])
            torch.testing.assert_close(b["cell_type"], a["cell_type"])


@pytest.mark.parametrize("which", [[0, 1], [0, 1, 2]], ids=["sparse", "sparse+dense"])
def test_a_merged_read_gives_the_same_batches(files: Any, which: list[int]) -> None:
    """A fetch's blocks joined into one a key: each selected batch is unchanged."""
    paths, _ = files
    with MappedCollection([paths[i] for i in which], obs_keys=["cell_type"],
                          obsm_keys=["X_pca"]) as ds:
        read = ds.__getitems__(np.random.default_rng(1).permutation(ds.n_obs)[:-4])
        merged = read.merged()
        for rows in (np.arange(len(read)), np.random.default_rng(0).permutation(len(read))[
                :40]):
            a, b = read.select(rows), merged.select(rows)
            np.testing.assert_array_equal(b.dense("X"), a.dense("X"))
            assert (b.csr("X") != a.csr("X")).nnz == 0
            np.testing.assert_array_equal(b.dense("obsm_X_pca"), a.dense("obsm_X_pca"))
            np.testing.assert_array_equal(b.labels("cell_type"), a.labels("cell_type"))
        one = {len(merged._parts[k]) for k in merged._keys}  # noqa: SLF001
        assert one == ({1} if len(which) == 2 else {1, 3})  # (sparse and dense: apart)


def test_each_iteration_is_the_next_epoch_unless_set(files: Any) -> None:
    paths, _ = files
    with BlockLoader(paths, batch_size=32, drop_last=True) as loader:
        first = [b["_store_idx"].tolist() for b in loader]
        second = [b["_store_idx"].tolist() for b in loader]
        assert len(first) == len(second) == 165 // 32
        assert first != second  # another epoch, another order
        loader.set_epoch(0)
        assert [b["_store_idx"].tolist() for b in loader] == first
        loader.set_epoch(1)
        assert [b["_store_idx"].tolist() for b in loader] == second


def test_obs_filter_selects_and_a_stop_leaves_nothing_running(files: Any) -> None:
    paths, adatas = files
    _, labels, _ = _truth(adatas)
    with BlockLoader(paths, batch_size=8, fetch_factor=2, obs_keys=["cell_type"],
                     obs_filter={"cell_type": ["T", "NK"]}) as loader:
        decode = {v: k for k, v in loader.dataset.encoders["cell_type"].items()}
        seen = [decode[int(v)] for batch in loader for v in batch["cell_type"]]
        assert sorted(seen) == sorted(labels[np.isin(labels, ["T", "NK"])].tolist())
        it = iter(loader)
        next(it)
        it.close()  # stopped after a batch: the fetch in flight is finished, not leaked
    assert loader.dataset.closed


def test_bad_arguments_are_typed_errors(files: Any) -> None:
    paths, _ = files
    with pytest.raises(errors.InvalidArgumentError, match="batch_size"):
        BlockLoader(paths, batch_size=0)
    with pytest.raises(errors.InvalidArgumentError, match="shuffle"):
        BlockLoader(paths, shuffle="sorted")
    with MappedCollection(paths) as ds, pytest.raises(errors.InvalidArgumentError,
                                                      match="obs_keys"):
        BlockLoader(ds, obs_keys=["cell_type"])


def test_collection_loader(files: Any, conn: Any) -> None:
    import lamin_io as ln

    paths, adatas = files
    saved = [ln.Artifact(p, key=f"atlas/{p.name}").save() for p in paths]
    collection = ln.Collection([saved[2], saved[0]], key="atlas").save()
    x, _, _ = _truth([adatas[2], adatas[0]])
    with collection.loader(batch_size=25, obs_keys="cell_type", num_workers=1) as loader:
        assert loader.dataset.n_obs == 120
        for batch, items in zip(loader, loader.batches(0), strict=True):
            np.testing.assert_array_equal(batch["X"].numpy(), x[items])
    # the loader's own keywords go to it, the others to mapped()
    with collection.loader(batch_size=10, shuffle="random", weights=np.ones(120),
                           num_samples=50, obs_keys="cell_type") as loader:
        assert loader.shuffle == "random"
        assert sum(len(b["cell_type"]) for b in loader) == 50
    import inspect

    keywords = {p.name for p in inspect.signature(BlockLoader).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(BlockLoader.KEYWORDS) == keywords


def test_a_plan_takes_a_batch_from_each_worker_in_turn() -> None:
    batches = [np.array([i]) for i in range(7)]  # fetches of 2: [0 1] [2 3] [4 5] [6]
    order = [int(b[0]) for b in Plan.fresh(batches, 2, 2).batches()]
    assert order == [0, 2, 1, 3, 4, 6, 5]  # worker 0: 0 1 4 5; worker 1: 2 3 6
    assert [int(b[0]) for b in Plan.fresh(batches, 2, 0).batches()] == list(range(7))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_yield_the_planned_batches(files: Any, method: str) -> None:
    paths, adatas = files
    x, labels, _ = _truth(adatas)
    with BlockLoader(paths, batch_size=10, block_size=4, fetch_factor=2,
                     obs_keys=["cell_type"], num_workers=2,
                     multiprocessing_context=method) as loader:
        decode = {v: k for k, v in loader.dataset.encoders["cell_type"].items()}
        got = list(loader)
        want = loader.batches(0)
        assert len(got) == len(want) == len(loader)
        for batch, items in zip(got, want, strict=True):
            np.testing.assert_array_equal(batch["X"].numpy(), x[items])
            assert [decode[int(v)] for v in batch["cell_type"]] == labels[items].tolist()
        assert sorted(np.concatenate(want).tolist()) == list(range(165))
        # the next epoch, from new workers, is another order of the same cells
        again = np.concatenate(loader.batches(1))
        assert sum(len(b["X"]) for b in loader) == 165
        assert not np.array_equal(again, np.concatenate(want))


def test_workers_send_batches_as_read_and_yield_the_same_ones(tmp_path: Path) -> None:
    """Workers send batches as read (made dense in the main process): they are unchanged,
    also for a layer some files lack (NaN rows there)."""
    paths = []
    for seed, n in ((0, 40), (1, 30)):
        adata = _adata(seed, n, "csr")
        if seed == 0:
            adata.layers["counts"] = adata.X.copy() * 2
        paths.append(tmp_path / f"{seed}.h5ad")
        adata.write_h5ad(paths[-1])
    options = {"batch_size": 8, "block_size": 4, "fetch_factor": 2, "seed": 5,
               "layers_keys": ["X", "counts"], "fill_missing": True}
    with BlockLoader(paths, **options) as one, BlockLoader(
            paths, num_workers=2, multiprocessing_context="fork", **options) as two:
        # the same batches, in the workers' turns (see Plan.order)
        mine = {tuple(items): batch for items, batch in zip(one.batches(0), one,
                                                            strict=True)}
        for items, b in zip(two.batches(0), two, strict=True):
            a = mine[tuple(items)]
            for key in ("X", "counts"):
                assert b[key].layout == torch.strided
                np.testing.assert_array_equal(b[key].numpy(), a[key].numpy())
            assert torch.isnan(b["counts"]).any() or not (b["_store_idx"] == 1).any()
        x_only = {**options, "layers_keys": ["X"]}  # (CSR: the layer every file has)
        sparse = {tuple(items): b for items, b in zip(
            one.batches(0), BlockLoader(paths, sparse=True, **x_only), strict=True)}
        with BlockLoader(paths, num_workers=2, sparse=True, **x_only) as both:
            for items, b in zip(both.batches(0), both, strict=True):
                assert b["X"].layout == torch.sparse_csr  # (workers, sparse: the same CSR)
                torch.testing.assert_close(b["X"].to_dense(),
                                           sparse[tuple(items)]["X"].to_dense())
    with MappedCollection(paths, layers_keys=["X", "counts"], fill_missing=True) as ds:
        none_have_it = ds.__getitems__(np.arange(40, 46)).dense("counts")
        assert none_have_it.shape == (6, len(GENES))  # (the layer's width, all NaN)
        assert np.isnan(none_have_it).all()
        with pytest.raises(errors.NameNotFoundError, match="no sparse form"):
            ds.__getitems__(np.arange(35, 46)).csr("counts")


def _cells(batch: dict[str, Any], where: dict[tuple[float, ...], int]) -> list[int]:
    """The collection positions of a batch's cells (told apart by their random obsm row)."""
    return [where[tuple(row)] for row in batch["obsm_X_pca"].numpy().tolist()]


def _stop_after(loader: BlockLoader, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    it = iter(loader)
    got = [next(it) for _ in range(n)]
    state = loader.state_dict()
    it.close()  # (the run stops here, as at a crash after a checkpoint)
    return got, state


@pytest.mark.parametrize(("workers", "n"), [(0, 0), (0, 4), (0, 6), (2, 5), (2, 1)])
def test_resume_with_the_same_workers_yields_the_rest_exactly(files: Any, workers: int,
                                                               n: int) -> None:
    paths, adatas = files
    _, _, pca = _truth(adatas)
    where = {tuple(row): i for i, row in enumerate(pca.tolist())}
    settings = {"batch_size": 10, "block_size": 4, "fetch_factor": 3, "seed": 9,
                "obsm_keys": ["X_pca"], "num_workers": workers,
                "multiprocessing_context": "fork"}
    with BlockLoader(paths, **settings) as loader:
        loader.set_epoch(2)
        whole = [_cells(b, where) for b in loader]
    with BlockLoader(paths, **settings) as first:
        first.set_epoch(2)
        got, state = _stop_after(first, n)
        assert [_cells(b, where) for b in got] == whole[:n]
    assert state["epoch"] == 2
    assert state["runs"] == [[n, workers, 1]]
    with BlockLoader(paths, **settings) as second:
        second.load_state_dict(state)
        assert [_cells(b, where) for b in second] == whole[n:]
        assert second.state_dict()["epoch"] == 3  # the epoch is done: the next one starts


@pytest.mark.parametrize("runs", [[(0, 7), (2, None)], [(2, 5), (0, None)],
                                  [(0, 3), (2, 4), (0, None)]])
def test_resume_with_other_workers_yields_exactly_the_cells_left(files: Any,
                                                                  runs: list[Any]) -> None:
    paths, adatas = files
    _, _, pca = _truth(adatas)
    where = {tuple(row): i for i, row in enumerate(pca.tolist())}
    settings = {"batch_size": 10, "block_size": 4, "fetch_factor": 3, "seed": 1,
                "obsm_keys": ["X_pca"], "multiprocessing_context": "fork"}
    seen: list[int] = []
    state = None
    for workers, n in runs:
        with BlockLoader(paths, num_workers=workers, **settings) as loader:
            if state is not None:
                loader.load_state_dict(state)
            if n is None:  # the last run goes to the end of the epoch
                seen += [c for b in loader for c in _cells(b, where)]
            else:
                got, state = _stop_after(loader, n)
                seen += [c for b in got for c in _cells(b, where)]
    assert sorted(seen) == list(range(165))  # every cell once: none twice, none missing


def test_a_state_of_other_settings_is_refused(files: Any) -> None:
    paths, _ = files
    with BlockLoader(paths, batch_size=10, seed=1) as loader:
        state = loader.state_dict()
        assert state == {"epoch": 0, "runs": [], "fingerprint": state["fingerprint"]}
    for other in ({"seed": 2}, {"obs_filter": {"donor": "d1"}}, {"shuffle": "random"}):
        with BlockLoader(paths, **{"batch_size": 10, "seed": 1, **other}) as loader, \
                pytest.raises(errors.InvalidArgumentError, match="another collection"):
            loader.load_state_dict(state)
    with BlockLoader(paths[:2], batch_size=10, seed=1) as loader, \
            pytest.raises(errors.InvalidArgumentError, match="another collection"):
        loader.load_state_dict(state)
    with BlockLoader(paths, batch_size=10, seed=1, num_replicas=2, rank=0) as loader, \
            pytest.raises(errors.InvalidArgumentError, match="another collection"):
        loader.load_state_dict(state)  # (2 ranks of 10: another global batch)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_ranks_share_each_epoch(files: Any, replicas: int, drop_last: bool) -> None:
    paths, _ = files
    shares = []
    for rank in range(replicas):
        with BlockLoader(paths, batch_size=8, block_size=4, fetch_factor=2, seed=5,
                         drop_last=drop_last, num_replicas=replicas, rank=rank) as loader:
            batches = loader.batches(0)
            assert len(batches) == len(loader)
            assert sum(len(b["_store_idx"]) for b in loader) == sum(len(b) for b in batches)
            shares.append(np.concatenate(batches))
    assert len({len(s) for s in shares}) == 1  # the same number of cells, hence batches
    cells = np.concatenate(shares)
    if drop_last:
        assert len(np.unique(cells)) == len(cells) == 165 - 165 % (8 * replicas)
    else:  # every cell, and only the padding twice
        assert set(cells.tolist()) == set(range(165))
        assert len(cells) == 165 + (-165) % replicas


def _rank(rank: int, init: str, paths: list[str], out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        with BlockLoader(paths, batch_size=8, block_size=4, fetch_factor=2, seed=3,
                         obsm_keys=["X_pca"]) as loader:  # ranks from torch.distributed
            rows = [b["obsm_X_pca"].numpy().tolist() for b in loader]
            counts: list[Any] = [None, None]
            dist.all_gather_object(counts, len(rows))
            assert counts[0] == counts[1] == len(loader)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_gloo_share_the_epoch(files: Any, tmp_path: Path) -> None:
    import json

    import torch.multiprocessing as mp

    paths, adatas = files
    _, _, pca = _truth(adatas)
    where = {tuple(row): i for i, row in enumerate(pca.tolist())}
    mp.start_processes(_rank, args=(f"file://{tmp_path / 'rendezvous'}",
                                    [str(p) for p in paths], str(tmp_path / "rank")),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [[where[tuple(row)] for batch in json.loads((tmp_path / f"rank.{r}").read_text())
              for row in batch] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 83  # 165 cells padded to 166
    assert set(ranks[0]) | set(ranks[1]) == set(range(165))
    assert len(set(ranks[0]) & set(ranks[1])) <= 1  # only the padding repeats


@pytest.mark.parametrize(("first", "then"), [((1, 0, 4), (2, 0)), ((2, 2, 3), (1, 0)),
                                             ((3, 0, 2), (2, 2)), ((2, 0, 0), (3, 0))])
def test_resume_with_other_ranks_yields_exactly_the_cells_left(files: Any, first: Any,
                                                                then: Any) -> None:
    paths, adatas = files
    _, _, pca = _truth(adatas)
    where = {tuple(row): i for i, row in enumerate(pca.tolist())}
    settings = {"block_size": 4, "fetch_factor": 2, "seed": 2, "obsm_keys": ["X_pca"],
                "multiprocessing_context": "fork"}
    global_batch = 12  # the same in both runs: ranks x a rank's batch
    (ranks, workers, n), (ranks_then, workers_then) = first, then
    seen: list[int] = []
    for rank in range(ranks):  # every rank stops after n batches (as after a checkpoint)
        with BlockLoader(paths, batch_size=global_batch // ranks, num_replicas=ranks,
                         rank=rank, num_workers=workers, **settings) as loader:
            got, state = _stop_after(loader, n)
            seen += [c for b in got for c in _cells(b, where)]
    assert state["runs"] == [[n, workers, ranks]]
    counts = set()
    for rank in range(ranks_then):
        with BlockLoader(paths, batch_size=global_batch // ranks_then,
                         num_replicas=ranks_then, rank=rank, num_workers=workers_then,
                         **settings) as loader:
            loader.load_state_dict(state)
            rest = [_cells(b, where) for b in loader]
            counts.add(len(rest))
            seen += [c for b in rest for c in b]
    assert len(counts) == 1  # every rank: as many batches
    assert set(seen) == set(range(165))  # none missing
    padding = (-165) % ranks + ranks_then  # at most: each run's padding
    assert len(seen) - 165 <= padding  # none twice but for the padding


def _off_by(shares: np.ndarray, target: np.ndarray, n_eff: float) -> np.ndarray:
    """How many standard errors each class's share lies from its target."""
    return np.abs(shares - target) / np.sqrt(target * (1 - target) / n_eff)


@pytest.mark.parametrize("shuffle", ["block", "random"])
def test_weighted_draws_give_every_class_its_share(shuffle: str) -> None:
    # classes in runs of very unequal length: 40 cells, 2,000 in runs of 7, the rest
    labels = np.full(200_000, 2)
    labels[1000:1040] = 0
    for start in range(5000, 5000 + 2000 // 7 * 50, 50):
        labels[start:start + 7] = 1
    counts = np.bincount(labels)
    weights = (1.0 / counts)[labels] * np.array([1.0, 1.0, 2.0])[labels]  # C: twice
    target = np.array([1.0, 1.0, 2.0]) / 4
    draws, block = 1_000_000, 16
    order = epoch_order(len(labels), seed=0, epoch=0, key=1, shuffle=shuffle,
                        block_size=block, weights=weights, num_samples=draws)
    assert len(order) == draws
    n_eff = draws / block  # draws counted as if a block were one (a block scheme's error)
    shares = np.bincount(labels[order], minlength=3) / draws
    assert np.all(_off_by(shares, target, n_eff) < 4)
    # the check has teeth: a sampler giving class 0 twice its weight fails it
    biased = weights * np.where(labels == 0, 2.0, 1.0)
    wrong = epoch_order(len(labels), seed=0, epoch=0, key=1, shuffle=shuffle,
                        block_size=block, weights=biased, num_samples=draws)
    assert np.any(_off_by(np.bincount(labels[wrong], minlength=3) / draws, target,
                          n_eff) >= 4)
    if shuffle == "block":  # draws of a block lie together
        blocks = order // block
        assert np.count_nonzero(np.diff(blocks)) + 1 == len(np.unique(blocks))


def test_weighted_loader_reads_the_drawn_cells(files: Any) -> None:
    paths, adatas = files
    x, labels, pca = _truth(adatas)
    where = {tuple(row): i for i, row in enumerate(pca.tolist())}
    with MappedCollection(paths, obs_keys=["cell_type"], obsm_keys=["X_pca"]) as ds:
        weights = ds.get_label_weights("cell_type")
        loader = BlockLoader(ds, batch_size=16, block_size=4, fetch_factor=2, seed=3,
                             weights=weights, num_samples=300)
        assert len(loader) == -(-300 // 16)
        got = list(loader)
        want = loader.batches(0)
        for batch, items in zip(got, want, strict=True):
            np.testing.assert_array_equal(batch["X"].numpy(), x[items])
        cells = np.concatenate(want)
        assert len(cells) == 300
        assert len(np.unique(cells)) < 300  # drawn with replacement
        # a stop and a resume with workers: the rest of the same draws
        first = BlockLoader(ds, batch_size=16, block_size=4, fetch_factor=2, seed=3,
                            weights=weights, num_samples=300)
        some, state = _stop_after(first, 5)
        second = BlockLoader(ds, batch_size=16, block_size=4, fetch_factor=2, seed=3,
                             weights=weights, num_samples=300, num_workers=2,
                             multiprocessing_context="fork")
        second.load_state_dict(state)
        resumed = [where[tuple(r)] for b in [*some, *second] for r in
                   b["obsm_X_pca"].numpy().tolist()]
        assert sorted(resumed) == sorted(cells.tolist())  # every draw, once
    with pytest.raises(errors.InvalidArgumentError, match="weights"):
        BlockLoader(paths, weights=np.ones(3))


def test_s3_blocks_fetch_little_more_than_they_use(s3_server: Any, tmp_path: Path) -> None:
    """At block 64, the bytes received stay within 1.5x the bytes of the rows read."""
    from conftest import upload

    rng = np.random.default_rng(0)
    x = sp.random(6000, 400, density=0.05, format="csr", dtype=np.float32, random_state=1)
    adata = ad.AnnData(X=x, obs=pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(["a", "b"], 6000))},
        index=[f"c{i}" for i in range(6000)]))
    path = tmp_path / "big.h5ad"
    adata.write_h5ad(path)
    remote = upload(path, s3_server.endpoint)
    with BlockLoader([str(remote)], batch_size=64, block_size=64, fetch_factor=4,
                     obs_filter={"cell_type": "a"}, obs_keys=["cell_type"],
                     storage_options={"endpoint_url": s3_server.endpoint}) as loader:
        s3_server.reset()
        rows = np.concatenate(loader.batches(0))
        got = sum(len(b["X"]) for b in loader)
        received = s3_server.stats.bytes_sent
    kept = loader.dataset.indices[rows]  # the file's rows the epoch read
    assert got == len(rows) == int((adata.obs["cell_type"] == "a").sum())
    used = int(np.diff(x.indptr)[kept].sum()) * 8 + len(kept) * 8  # data, indices, indptr
    assert received <= 1.5 * used, (received, used)
