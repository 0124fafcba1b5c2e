"""One epoch of a :class:`~lamin_io.loaders.BlockLoader` as torch's ``IterableDataset``.

Its own module: importing it imports torch, which ``lamin_io.loaders`` does not.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from lamin_io.loaders._collate import collate

if TYPE_CHECKING:
    from collections.abc import Iterator

    from lamin_io.loaders._block import Plan
    from lamin_io.loaders._mapped import Batch, MappedCollection

__all__ = ["Fetches", "densify"]


class Fetches(IterableDataset):
    """One epoch of a :class:`BlockLoader`, read a fetch at a time (in a worker: its share).

    Pickled for worker processes with the collection (small) and the epoch's plan (the
    cells of its batches: 8 bytes a cell).
    """

    def __init__(self, dataset: MappedCollection, plan: Plan, *, sparse: bool) -> None:
        self.dataset, self.plan, self.sparse = dataset, plan, sparse
        #: In a worker, send layers as CSR even for dense batches (:func:`densify` makes
        #: them dense in the main process): a dense batch in shared memory costs a worker
        #: more than the batch's reading, and its memory twice.
        self.ship_sparse = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.batches()

    def batches(self) -> Iterator[dict[str, Any]]:
        """Yield this process's batches: its stream of the plan (in worker ``w``: the w-th)."""
        info = get_worker_info()
        stream = self.plan.streams[info.id if info is not None else 0]
        todo = [self.plan.fetches[f][start:] for f, start in stream]
        with ThreadPoolExecutor(1, thread_name_prefix="lamin-io-fetch") as pool:
            ahead: Future[tuple[Batch, np.ndarray]] | None = (
                pool.submit(self._read, todo[0]) if todo else None)
            try:
                for f in range(len(todo)):
                    assert ahead is not None  # noqa: S101
                    read, items = ahead.result()
                    ahead = pool.submit(self._read, todo[f + 1]) if f + 1 < len(
                        todo) else None  # read while this fetch's batches are used
                    sparse = self.sparse or (self.ship_sparse and info is not None)
                    for batch in todo[f]:
                        chosen = read.select(np.searchsorted(items, batch))
                        yield collate(chosen, sparse=sparse and _complete(chosen))
            finally:  # (stopped early: a fetch not begun is not read)
                if ahead is not None:
                    ahead.cancel()

    def _read(self, fetch: list[np.ndarray]) -> tuple[Batch, np.ndarray]:
        """Read a fetch's items at once, sorted (each block one contiguous read)."""
        items = np.unique(np.concatenate(fetch))
        return self.dataset.__getitems__(items).merged(), items


def _complete(batch: Batch) -> bool:
    """Whether every row of the batch has every layer (else no CSR: rows are NaN there)."""
    return all(batch._present[k].all() for k in batch._keys if k[0] == "layer")  # noqa: SLF001


def densify(batch: dict[str, Any]) -> dict[str, Any]:
    """Make a batch's sparse CSR tensors dense (what a worker shipped as CSR)."""
    import scipy.sparse as sp
    import torch

    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr:
            csr = sp.csr_matrix((value.values().numpy(), value.col_indices().numpy(),
                                 value.crow_indices().numpy()), shape=tuple(value.shape))
            batch[name] = torch.from_numpy(csr.toarray())
    return batch
