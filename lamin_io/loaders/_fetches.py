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

__all__ = ["Fetches", "as_read"]


class Fetches(IterableDataset):
    """One epoch of a :class:`BlockLoader`, read a fetch at a time (in a worker: its share).

    Pickled for worker processes with the collection (small) and the epoch's plan (the
    cells of its batches: 8 bytes a cell).
    """

    def __init__(self, dataset: MappedCollection, plan: Plan, *, sparse: bool,
                 as_read: bool = False) -> None:
        self.dataset, self.plan, self.sparse = dataset, plan, sparse
        #: Yield each batch as read (a :class:`Batch`: its rows as stored, CSR where
        #: sparse), for :func:`collate` in the main process (the DataLoader's
        #: ``collate_fn`` then passes it on, see :func:`as_read`): a dense batch made in a
        #: worker crosses to the main process in shared memory torch allocates anew for
        #: each batch, which costs more than reading the batch; as read, it is small and
        #: pickled through the pipe.
        self.as_read = as_read

    def __iter__(self) -> Iterator[Any]:
        return self.batches()

    def batches(self) -> Iterator[Any]:
        """Yield this process's batches: its stream of the plan (in worker ``w``: the w-th).

        Each is :func:`collate`'s dict, or the :class:`Batch` as read with ``as_read``.
        A worker reads its next fetch once it is done with this one (memory: one fetch;
        the other workers' batches fill the wait); the main process reads it meanwhile.
        """
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
                    ahead = None
                    if info is None and f + 1 < len(todo):  # read while this one is used
                        ahead = pool.submit(self._read, todo[f + 1])
                    for batch in todo[f]:
                        chosen = read.select(np.searchsorted(items, batch))
                        yield chosen if self.as_read else collate(chosen,
                                                                  sparse=self.sparse)
                    del read  # (its last batch, in the caller, is a copy)
                    if ahead is None and f + 1 < len(todo):  # (a worker: one fetch held)
                        ahead = pool.submit(self._read, todo[f + 1])
            finally:  # (stopped early: a fetch not begun is not read)
                if ahead is not None:
                    ahead.cancel()

    def _read(self, fetch: list[np.ndarray]) -> tuple[Batch, np.ndarray]:
        """Read a fetch's items at once, sorted (each block one contiguous read)."""
        items = np.unique(np.concatenate(fetch))
        return self.dataset.__getitems__(items).merged(), items


def as_read(batch: Any) -> Any:
    """Pass a worker's batch on as read (a DataLoader's ``collate_fn``)."""
    return batch
