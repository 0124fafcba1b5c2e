"""Sharding epochs across ranks, and reading epochs without growth."""

from __future__ import annotations

import gc
import tracemalloc
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lamin_io import errors
from lamin_io.loaders import DistributedSampler, MappedCollection

if TYPE_CHECKING:
    from pathlib import Path


class _Sized:
    def __init__(self, n: int, key: int = 0) -> None:
        self.n, self.order_key = n, key

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n", [1, 7, 100, 101])
@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_share_each_epoch(n: int, ranks: int, drop_last: bool) -> None:
    samplers = [DistributedSampler(_Sized(n), ranks, r, seed=5, drop_last=drop_last)
                for r in range(ranks)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        assert len({len(share) for share in shares}) == 1  # the same count on every rank
        assert all(len(share) == len(s) for share, s in zip(shares, samplers, strict=True))
        taken = [i for share in shares for i in share]
        order = samplers[0].epoch_order()
        if drop_last:
            assert len(taken) == len(set(taken)) == (n // ranks) * ranks
        else:  # every item, and the padding repeats the start of the epoch's order
            assert set(taken) == set(range(n))
            pad = len(taken) - n
            assert sorted(taken) == sorted([*range(n), *np.resize(order[:n], pad).tolist()])
    # a new epoch, a new order; the same epoch, the same order
    samplers[0].set_epoch(0)
    first = samplers[0].epoch_order()
    samplers[0].set_epoch(1)
    assert n < 7 or len(first) < 7 or not np.array_equal(first, samplers[0].epoch_order())
    samplers[0].set_epoch(0)
    np.testing.assert_array_equal(first, samplers[0].epoch_order())


def test_order_follows_the_dataset_key_and_weights_draw_by_label() -> None:
    a = DistributedSampler(_Sized(50, key=1), 1, 0, seed=0).epoch_order()
    b = DistributedSampler(_Sized(50, key=2), 1, 0, seed=0).epoch_order()
    assert not np.array_equal(a, b)
    weights = np.zeros(50)
    weights[[3, 7]] = 1.0
    drawn = list(DistributedSampler(_Sized(50), 2, 1, weights=weights, num_samples=40))
    assert len(drawn) == 40
    assert set(drawn) <= {3, 7}
    with pytest.raises(errors.InvalidArgumentError, match="weights"):
        DistributedSampler(_Sized(3), 1, 0, weights=[1, -1, 0])
    with pytest.raises(errors.InvalidArgumentError, match="rank"):
        DistributedSampler(_Sized(3), 2, 2)


@pytest.fixture(scope="module")
def two_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("epochs")
    paths = []
    for i, n in enumerate((90, 70)):
        rng = np.random.default_rng(i)
        x = sp.random(n, 25, density=0.2, format="csr", dtype=np.float32, random_state=i)
        obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["a", "b", "c"], n))},
                           index=[f"f{i}c{j}" for j in range(n)])
        path = folder / (f"f{i}.h5ad" if i == 0 else f"f{i}.zarr")
        adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(25)]))
        adata.write_h5ad(path) if path.suffix == ".h5ad" else adata.write_zarr(path)
        paths.append(path)
    return paths


def test_epochs_do_not_grow(two_files: list[Path]) -> None:
    """Three epochs of shuffled batches: open handles, cached objects and traced memory
    stay where the first epoch left them."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from lamin_io.loaders import collate

    def epoch(loader: Any) -> int:
        return sum(int(batch["X"].shape[0]) for batch in loader)

    with MappedCollection(two_files, obs_keys=["cell_type"]) as ds:
        sampler = DistributedSampler(ds, 1, 0, seed=3)
        loader = DataLoader(ds, batch_size=16, sampler=sampler, collate_fn=collate)
        sampler.set_epoch(0)
        assert epoch(loader) == len(ds)
        gc.collect()
        caches = [len(store._cache) for store in ds._stores]  # noqa: SLF001
        tracemalloc.start()
        try:
            sampler.set_epoch(1)
            epoch(loader)
            gc.collect()
            after_one, _ = tracemalloc.get_traced_memory()
            for e in (2, 3):
                sampler.set_epoch(e)
                assert epoch(loader) == len(ds)
            gc.collect()
            after_three, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [len(store._cache) for store in ds._stores] == caches  # noqa: SLF001
        assert after_three - after_one < 1 << 20  # two more epochs keep under 1 MB more
        assert torch.is_tensor(next(iter(loader))["X"])
    assert all(store.closed for store in ds._stores)  # noqa: SLF001


def _rank(rank: int, init: str, paths: list[str], out: str) -> None:
    import json

    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from lamin_io.loaders import collate

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        with MappedCollection(paths, obs_keys=["cell_type"]) as ds:
            sampler = DistributedSampler(ds, seed=11)  # ranks from torch.distributed
            loader = DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=collate)
            seen: dict[int, list[int]] = {}
            for epoch in (0, 1):
                sampler.set_epoch(epoch)
                seen[epoch] = list(sampler)
                n_batches = sum(1 for _ in loader)
                counts = [None, None]
                dist.all_gather_object(counts, n_batches)
                assert counts[0] == counts[1]
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"seen": seen, "batches": n_batches, "n": len(ds)}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_gloo_share_the_epoch(two_files: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import json

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "rank")
    mp.start_processes(_rank, args=(init, [str(p) for p in two_files], out), nprocs=2,
                       join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(2)]
    n = ranks[0]["n"]
    assert ranks[0]["batches"] == ranks[1]["batches"]
    for epoch in ("0", "1"):
        a, b = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert len(a) == len(b) == -(-n // 2)
        assert set(a) | set(b) == set(range(n))
        assert len(set(a) & set(b)) <= len(a) * 2 - n  # only the padding repeats
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # set_epoch reshuffles
