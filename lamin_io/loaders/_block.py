"""``BlockLoader``: batches from random blocks of contiguous rows, read a fetch at a time.

An epoch's order is a pure function of the seed, the epoch, the collection's ``order_key``
and the shuffle mode (:func:`epoch_order`): ``"block"`` puts blocks of ``block_size``
neighbouring items in random order, ``"random"`` permutes items, ``False`` keeps them in
place. The loader cuts that order into fetches of ``batch_size * fetch_factor`` items,
reads each fetch at once (sorted by file and row, so a block is one contiguous read),
shuffles its items in memory (``"block"``; again a pure function of seed, epoch and
fetch) and hands out its batches while the next fetch is read.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors.readpath.plan import expand
from lamin_io.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from lamin_io.loaders._mapped import Batch, MappedCollection

__all__ = ["BlockLoader", "epoch_batches", "epoch_order"]

#: Default neighbouring items a block (see :class:`BlockLoader`).
BLOCK_SIZE = 16
#: Default batches a fetch.
FETCH_FACTOR = 16
_MODES = {False: 0, "block": 1, "random": 2}


def epoch_order(n: int, *, seed: int, epoch: int, key: int, shuffle: str | bool = "block",
                block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Return epoch ``epoch``'s order of items ``0..n-1`` (a permutation of them).

    ``shuffle="block"``: blocks of ``block_size`` neighbouring items (the last one may be
    shorter) in random order; ``"random"``: a random permutation; ``False``: ``arange(n)``.
    The same arguments give the same order on every machine, rank and worker.
    """
    mode = _mode(shuffle)
    if mode == 0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, key, mode])
    if mode == 2:
        return rng.permutation(n).astype(np.int64)
    if block_size < 1:
        msg = f"block_size must be 1 or more, got {block_size}"
        raise InvalidArgumentError(msg)
    starts = rng.permutation(-(-n // block_size)).astype(np.int64) * block_size
    return expand(starts, np.minimum(block_size, n - starts))


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, key: int,
                  shuffle: str | bool = "block", block_size: int = BLOCK_SIZE,
                  fetch_factor: int = FETCH_FACTOR, drop_last: bool = False
                  ) -> list[np.ndarray]:
    """Return the items of each batch of epoch ``epoch``, in the order they are yielded.

    The epoch's order (:func:`epoch_order`) is cut into fetches of ``batch_size *
    fetch_factor`` items; in ``"block"`` mode each fetch's items are shuffled (from the
    seed, the epoch and the fetch's number); batches are consecutive runs of
    ``batch_size``; ``drop_last`` leaves out a last, shorter batch.
    """
    if batch_size < 1 or fetch_factor < 1:
        msg = f"batch_size and fetch_factor must be 1 or more, got {batch_size}, {fetch_factor}"
        raise InvalidArgumentError(msg)
    order = epoch_order(n, seed=seed, epoch=epoch, key=key, shuffle=shuffle,
                        block_size=block_size)
    if drop_last:
        order = order[:n - n % batch_size]
    fetch = batch_size * fetch_factor
    batches: list[np.ndarray] = []
    for f, start in enumerate(range(0, len(order), fetch)):
        items = order[start:start + fetch]
        if _mode(shuffle) == 1:
            items = items[np.random.default_rng([seed, epoch, key, 3, f]).permutation(
                len(items))]
        batches.extend(items[b:b + batch_size] for b in range(0, len(items), batch_size))
    return batches


def _mode(shuffle: str | bool) -> int:  # noqa: FBT001 (torch's shuffle=True|False)
    if shuffle is True:
        shuffle = "block"
    if shuffle not in _MODES:
        msg = f"shuffle must be 'block', 'random' or False, got {shuffle!r}"
        raise InvalidArgumentError(msg)
    return _MODES[shuffle]


class BlockLoader:
    """Batches of a collection from random blocks of neighbouring rows, a fetch at a time.

    Iterate it as a ``DataLoader``: each batch is the dict :func:`lamin_io.loaders.collate`
    makes (``"X"`` and the other layers as dense tensors, or torch sparse CSR with
    ``sparse=True``; encoded obs keys as int64; ``obsm_<key>``; ``"_store_idx"``).
    Each new iteration is the next epoch (or the one :meth:`set_epoch` gave).

    Parameters
    ----------
    source
        A :class:`~lamin_io.loaders.MappedCollection`, or paths to make one of (with
        ``mapped``'s keywords: ``obs_keys``, ``obs_filter``, ``join``, ...).
    batch_size
        Items a batch.
    shuffle
        ``"block"`` (default): blocks of ``block_size`` neighbouring rows in random order,
        shuffled again within each fetch of ``batch_size * fetch_factor`` rows;
        ``"random"``: an exact random permutation (read a fetch at a time, as sorted rows);
        ``False``: in order.
    block_size, fetch_factor
        Rows a block (16) and batches a fetch (16).
    seed
        With the epoch and the collection, what the order is made of.
    drop_last
        Leave out the last batch of an epoch when it is shorter.
    sparse
        Layers as torch sparse CSR tensors instead of dense ones.

    Examples
    --------
    >>> loader = collection.loader(batch_size=256, obs_keys=["cell_type"])   # doctest: +SKIP
    >>> for epoch in range(3):
    ...     for batch in loader:
    ...         x, y = batch["X"], batch["cell_type"]
    """

    def __init__(self, source: MappedCollection | Sequence[Any], batch_size: int = 256, *,
                 shuffle: str | bool = "block", block_size: int = BLOCK_SIZE,
                 fetch_factor: int = FETCH_FACTOR, seed: int = 0, drop_last: bool = False,
                 sparse: bool = False, **mapped: Any) -> None:
        from lamin_io.loaders._mapped import MappedCollection

        _mode(shuffle)
        if batch_size < 1 or fetch_factor < 1 or block_size < 1:
            msg = (f"batch_size, block_size and fetch_factor must be 1 or more, got "
                   f"{batch_size}, {block_size}, {fetch_factor}")
            raise InvalidArgumentError(msg)
        if isinstance(source, MappedCollection):
            if mapped:
                msg = f"{sorted(mapped)} are MappedCollection's: give them to it, not here"
                raise InvalidArgumentError(msg)
            self.dataset = source
        else:
            self.dataset = MappedCollection(list(source), **mapped)
        self.batch_size, self.shuffle, self.block_size = batch_size, shuffle, block_size
        self.fetch_factor, self.seed, self.drop_last = fetch_factor, seed, drop_last
        self.sparse = sparse
        self._next_epoch = 0

    def __len__(self) -> int:
        """Batches an epoch."""
        n = self.dataset.n_obs
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (later ones follow it)."""
        self._next_epoch = int(epoch)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Return the collection's items (positions) of each batch of epoch ``epoch``."""
        return epoch_batches(self.dataset.n_obs, self.batch_size, seed=self.seed,
                             epoch=epoch, key=int(self.dataset.order_key),
                             shuffle=self.shuffle, block_size=self.block_size,
                             fetch_factor=self.fetch_factor, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        return self._epoch(epoch)

    def _epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        from lamin_io.loaders._collate import collate

        batches = self.batches(epoch)
        fetches = [batches[i:i + self.fetch_factor]
                   for i in range(0, len(batches), self.fetch_factor)]
        with ThreadPoolExecutor(1, thread_name_prefix="lamin-io-fetch") as pool:
            ahead: Future[tuple[Batch, np.ndarray]] | None = (
                pool.submit(self._read, fetches[0]) if fetches else None)
            try:
                for f in range(len(fetches)):
                    assert ahead is not None  # noqa: S101
                    read, items = ahead.result()
                    ahead = pool.submit(self._read, fetches[f + 1]) if f + 1 < len(
                        fetches) else None  # read while this fetch's batches are used
                    for batch in fetches[f]:
                        yield collate(read.select(np.searchsorted(items, batch)),
                                      sparse=self.sparse)
            finally:  # (stopped early: a fetch not begun is not read)
                if ahead is not None:
                    ahead.cancel()

    def _read(self, fetch: list[np.ndarray]) -> tuple[Batch, np.ndarray]:
        """Read a fetch's items at once, sorted (each block one contiguous read)."""
        items = np.unique(np.concatenate(fetch))
        return self.dataset.__getitems__(items), items

    def close(self) -> None:
        """Close the collection's files."""
        self.dataset.close()

    def __enter__(self) -> BlockLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
