"""``DistributedSampler``: each rank's share of one epoch order, optionally weighted.

The epoch's order is made first, from the seed, the epoch and the dataset's ``order_key``
(a :class:`MappedCollection`'s: its files, or the artifacts' hashes), a permutation or
draws by weight, the same on every rank; each rank then takes every ``num_replicas``-th
index of it from its own offset, as torch's ``DistributedSampler`` does, so shares are
disjoint and cover the epoch. With ``drop_last=False`` the order is padded to a multiple
of the ranks by repeating its first indices (those cells are read twice in that epoch); with
``drop_last=True`` its tail is cut. Every rank yields the same number of indices, hence
the same number of batches. ``DataLoader`` workers then split a rank's batches among them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sized

__all__ = ["DistributedSampler"]


class DistributedSampler:
    """Indices of one rank's share of each epoch (torch's ``Sampler`` protocol).

    Parameters
    ----------
    dataset
        What is sampled (its ``len``), e.g. a :class:`MappedCollection`.
    num_replicas, rank
        The ranks and this one; by default from ``torch.distributed`` (one rank, rank 0,
        where it is not initialized).
    shuffle
        A new permutation each epoch (:meth:`set_epoch`); else the dataset's order.
    seed
        The same on every rank.
    drop_last
        Cut the epoch to a multiple of the ranks instead of padding it.
    weights
        Draw ``num_samples`` indices a rank with replacement, by these weights (e.g.
        ``ds.get_label_weights("cell_type")``), instead of permuting.
    num_samples
        Indices per rank and epoch when drawing by weight (default: the dataset's length
        divided among the ranks).

    Examples
    --------
    >>> sampler = DistributedSampler(ds, seed=1)                             # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, sampler=sampler, num_workers=2)
    >>> for epoch in range(3):
    ...     sampler.set_epoch(epoch)
    ...     for batch in loader: ...
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None,
                 rank: int | None = None, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, weights: Any = None,
                 num_samples: int | None = None) -> None:
        num_replicas, rank = ranks(num_replicas, rank)
        self.n = len(dataset)
        self.key = int(getattr(dataset, "order_key", 0))
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights is not None and (len(self.weights) != self.n or not np.all(
                np.isfinite(self.weights)) or np.any(self.weights < 0)
                or self.weights.sum() <= 0):
            msg = (f"weights must be {self.n} finite, non-negative numbers, not all zero "
                   f"(one a dataset item)")
            raise InvalidArgumentError(msg)
        if num_samples is not None:
            self.num_samples = int(num_samples)
        elif drop_last:
            self.num_samples = self.n // num_replicas
        else:
            self.num_samples = -(-self.n // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order (call it on every rank before each epoch)."""
        self.epoch = int(epoch)

    def epoch_order(self) -> np.ndarray:
        """Return the whole epoch's order, padded or cut to ``total_size`` (every rank's)."""
        rng = np.random.default_rng([self.seed, self.epoch, self.key])
        if self.weights is not None:
            p = self.weights / self.weights.sum()
            return rng.choice(self.n, size=self.total_size, replace=True, p=p)
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.total_size <= self.n:
            return order[:self.total_size]
        repeats = -(-(self.total_size - self.n) // max(self.n, 1))
        return np.concatenate([order, *([order] * repeats)])[:self.total_size]

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_order()[self.rank:self.total_size:self.num_replicas]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return self.num_samples


def ranks(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Return ``(ranks, this rank)``: as given, else from ``torch.distributed``; checked."""
    if num_replicas is None or rank is None:
        replicas, this = _world()
        num_replicas = replicas if num_replicas is None else num_replicas
        rank = this if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        msg = f"rank {rank} is not one of {num_replicas} ranks: give 0 <= rank < ranks"
        raise InvalidArgumentError(msg)
    return num_replicas, rank


def _world() -> tuple[int, int]:
    """``(ranks, this rank)`` of ``torch.distributed``, ``(1, 0)`` where it is not running."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 1, 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
