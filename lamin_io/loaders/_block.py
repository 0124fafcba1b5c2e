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

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.accessors.readpath.plan import expand
from lamin_io.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from lamin_io.loaders._mapped import MappedCollection

__all__ = ["BlockLoader", "Plan", "epoch_batches", "epoch_order", "rank_share"]

#: Default neighbouring items a block (see :class:`BlockLoader`), and batches a fetch:
#: the largest blocks that keep batch label entropy >= 97% of exact random also where
#: cell types are stored sorted, in runs (``benchmarks/shuffle.py``: 0.989 at 16 and 64,
#: 0.959 at 16 and 16); the larger fetch also reads faster (45.8k against 40.7k cells/s).
BLOCK_SIZE = 16
FETCH_FACTOR = 64
_MODES = {False: 0, "block": 1, "random": 2}


def epoch_order(n: int, *, seed: int, epoch: int, key: int, shuffle: str | bool = "block",
                block_size: int = BLOCK_SIZE, weights: np.ndarray | None = None,
                num_samples: int | None = None) -> np.ndarray:
    """Return epoch ``epoch``'s order of items ``0..n-1`` (a permutation of them).

    ``shuffle="block"``: blocks of ``block_size`` neighbouring items (the last one may be
    shorter) in random order; ``"random"``: a random permutation; ``False``: ``arange(n)``.
    With ``weights`` (one per item, e.g. ``get_label_weights``), ``num_samples`` items
    (default ``n``) are drawn with replacement in proportion to them, each draw on its own
    (so every class gets its share exactly in expectation, however its items lie); in
    ``"block"`` mode the draws are then grouped by the block they fall in, blocks in random
    order, so that neighbouring draws are read together; ``False`` sorts them.
    The same arguments give the same order on every machine, rank and worker.
    """
    mode = _mode(shuffle)
    if block_size < 1:
        msg = f"block_size must be 1 or more, got {block_size}"
        raise InvalidArgumentError(msg)
    if weights is not None:
        return _weighted_order(n, np.random.default_rng([seed, epoch, key, mode, 5]), mode,
                               block_size, weights, num_samples)
    if mode == 0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, key, mode])
    if mode == 2:
        return rng.permutation(n).astype(np.int64)
    starts = rng.permutation(-(-n // block_size)).astype(np.int64) * block_size
    return expand(starts, np.minimum(block_size, n - starts))


def _weighted_order(n: int, rng: np.random.Generator, mode: int, block_size: int,
                    weights: Any, num_samples: int | None) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != n or not np.all(np.isfinite(w)) or np.any(w < 0) or (n and w.sum() <= 0):
        msg = (f"weights must be {n} finite, non-negative numbers, not all zero (one an "
               f"item of the collection)")
        raise InvalidArgumentError(msg)
    size = n if num_samples is None else int(num_samples)
    if size < 0:
        msg = f"num_samples must be 0 or more, got {num_samples}"
        raise InvalidArgumentError(msg)
    if n == 0 or size == 0:
        return np.empty(0, dtype=np.int64)
    drawn = rng.choice(n, size=size, replace=True, p=w / w.sum()).astype(np.int64)
    if mode == 2:
        return drawn
    drawn.sort()
    if mode == 0:
        return drawn
    block = drawn // block_size  # draws of one block together, blocks in random order
    rank = rng.permutation(int(block[-1]) + 1)
    return drawn[np.argsort(rank[block], kind="stable")]


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, key: int,
                  shuffle: str | bool = "block", block_size: int = BLOCK_SIZE,
                  fetch_factor: int = FETCH_FACTOR, drop_last: bool = False,
                  replicas: int = 1, weights: np.ndarray | None = None,
                  num_samples: int | None = None) -> list[np.ndarray]:
    """Return the items of each batch of epoch ``epoch``, in the order they are yielded.

    The epoch's order (:func:`epoch_order`) is cut into fetches of ``batch_size *
    fetch_factor`` items; in ``"block"`` mode each fetch's items are shuffled (from the
    seed, the epoch and the fetch's number); batches are consecutive runs of
    ``batch_size``; ``drop_last`` leaves out a last, shorter batch. For ``replicas``
    ranks, ``batch_size`` is the global batch (ranks x a rank's batch) and the order is
    first padded to a multiple of the ranks by repeating its first items (those cells are
    read twice in that epoch), unless ``drop_last``; :func:`rank_share` then gives a
    rank its part of each batch.
    """
    if batch_size < 1 or fetch_factor < 1 or replicas < 1:
        msg = (f"batch_size, fetch_factor and replicas must be 1 or more, got {batch_size}, "
               f"{fetch_factor}, {replicas}")
        raise InvalidArgumentError(msg)
    order = epoch_order(n, seed=seed, epoch=epoch, key=key, shuffle=shuffle,
                        block_size=block_size, weights=weights, num_samples=num_samples)
    total = len(order)
    if drop_last:
        order = order[:total - total % batch_size]
    elif total % replicas:
        order = np.concatenate([order, np.resize(order, replicas - total % replicas)])
    fetch = batch_size * fetch_factor
    batches: list[np.ndarray] = []
    for f, start in enumerate(range(0, len(order), fetch)):
        items = order[start:start + fetch]
        if _mode(shuffle) == 1:
            items = items[np.random.default_rng([seed, epoch, key, 3, f]).permutation(
                len(items))]
        batches.extend(items[b:b + batch_size] for b in range(0, len(items), batch_size))
    return batches


def rank_share(batches: list[np.ndarray], replicas: int, rank: int) -> list[np.ndarray]:
    """Return rank ``rank``'s part of each global batch (each a multiple of the ranks)."""
    return [b.reshape(replicas, -1)[rank] for b in batches]


class Plan:
    """What an epoch still has to yield: fetches of batches, and each worker's share.

    ``streams[w]`` lists ``(fetch, first batch)`` for worker ``w`` (one stream without
    workers); a DataLoader takes a batch from each worker in turn (:meth:`order`).
    """

    def __init__(self, fetches: list[list[np.ndarray]], streams: list[list[tuple[int, int]]]
                 ) -> None:
        self.fetches, self.streams = fetches, streams

    @classmethod
    def fresh(cls, batches: list[np.ndarray], fetch_factor: int, workers: int) -> Plan:
        """Batches cut into fetches; worker ``w`` takes fetches ``w, w + workers, ...``."""
        fetches = [batches[i:i + fetch_factor] for i in range(0, len(batches), fetch_factor)]
        roles = max(workers, 1)
        return cls(fetches, [[(f, 0) for f in range(w, len(fetches), roles)]
                             for w in range(roles)])

    def _stream_batches(self) -> list[list[tuple[int, int]]]:
        return [[(f, b) for f, start in stream for b in range(start, len(self.fetches[f]))]
                for stream in self.streams]

    def order(self) -> list[tuple[int, int]]:
        """``(fetch, batch)`` of every batch left, in the order they are yielded."""
        streams = self._stream_batches()
        return [stream[i] for i in range(max(map(len, streams), default=0))
                for stream in streams if i < len(stream)]

    def batches(self) -> list[np.ndarray]:
        """Return the items of every batch left, in the order they are yielded."""
        return [self.fetches[f][b] for f, b in self.order()]

    def after(self, n: int) -> Plan:
        """Return the plan once its first ``n`` batches were yielded (the same workers).

        Each worker skips what it yielded, and the workers' roles turn so that the worker
        whose batch came next comes first: the rest is yielded exactly as it would have been.
        """
        order = self.order()
        if n >= len(order):
            return Plan(self.fetches, [[] for _ in self.streams])
        streams = self._stream_batches()
        done = [0] * len(streams)
        owner = {fb: s for s, stream in enumerate(streams) for fb in stream}
        for fb in order[:n]:
            done[owner[fb]] += 1
        first = owner[order[n]]
        rest: list[list[tuple[int, int]]] = []
        for k in range(len(streams)):
            left = streams[(first + k) % len(streams)][done[(first + k) % len(streams)]:]
            starts: dict[int, int] = {}
            for f, b in left:
                starts.setdefault(f, b)
            rest.append(list(starts.items()))
        return Plan(self.fetches, rest)

    def regroup(self, batch_size: int, fetch_factor: int, workers: int) -> Plan:
        """Return the cells left, in order, cut into batches and fetches for ``workers``."""
        left = self.batches()
        cells = np.concatenate(left) if left else np.empty(0, dtype=np.int64)
        batches = [cells[i:i + batch_size] for i in range(0, len(cells), batch_size)]
        return Plan.fresh(batches, fetch_factor, workers)


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
    Each new iteration is the next epoch (or the one :meth:`set_epoch` gave). This object
    counts the batches it hands over: :meth:`state_dict` and :meth:`load_state_dict` resume
    an epoch where it stopped, with the same or another number of workers.

    Parameters
    ----------
    source
        A :class:`~lamin_io.loaders.MappedCollection`, or paths to make one of (with
        ``mapped``'s keywords: ``obs_keys``, ``obs_filter``, ``join``, ...). Its remote
        h5ad files are then read by the byte ranges of the rows (not whole chunks): a
        block is one request.
    batch_size
        Items a batch.
    shuffle
        ``"block"`` (default): blocks of ``block_size`` neighbouring rows in random order,
        shuffled again within each fetch of ``batch_size * fetch_factor`` rows;
        ``"random"``: an exact random permutation (read a fetch at a time, as sorted rows);
        ``False``: in order.
    block_size, fetch_factor
        Rows a block (16) and batches a fetch (64): see ``benchmarks/shuffle.py``.
    seed
        With the epoch and the collection, what the order is made of.
    drop_last
        Leave out the last batch of an epoch when it is shorter.
    sparse
        Layers as torch sparse CSR tensors instead of dense ones.
    weights, num_samples
        Draw ``num_samples`` items an epoch (default: as many as the collection has) with
        replacement, in proportion to these weights (one an item; e.g.
        ``loader.dataset.get_label_weights("cell_type")`` for balanced classes), instead
        of each item once; see :func:`epoch_order`.
    num_replicas, rank
        Ranks of ``torch.distributed`` and this one (by default from it; one rank where
        it is not running). ``batch_size`` is a rank's; every rank gets the same number
        of batches, its part of each global batch (padding as :func:`epoch_batches`).
    num_workers, multiprocessing_context
        DataLoader worker processes (each reads whole fetches: worker ``w`` takes fetches
        ``w, w + num_workers, ...``, and batches come from each worker in turn, see
        :meth:`batches`) and how they start (``"fork"``, ``"spawn"``; torch's default).

    Examples
    --------
    >>> loader = collection.loader(batch_size=256, obs_keys=["cell_type"])   # doctest: +SKIP
    >>> for epoch in range(3):
    ...     for batch in loader:
    ...         x, y = batch["X"], batch["cell_type"]
    """

    #: The keywords the loader takes (the others are :class:`MappedCollection`'s).
    KEYWORDS = ("shuffle", "block_size", "fetch_factor", "seed", "drop_last", "sparse",
                "num_workers", "multiprocessing_context", "num_replicas", "rank", "weights",
                "num_samples")

    def __init__(self, source: MappedCollection | Sequence[Any], batch_size: int = 256, *,
                 shuffle: str | bool = "block", block_size: int = BLOCK_SIZE,
                 fetch_factor: int = FETCH_FACTOR, seed: int = 0, drop_last: bool = False,
                 sparse: bool = False, num_workers: int = 0,
                 multiprocessing_context: str | None = None, num_replicas: int | None = None,
                 rank: int | None = None, weights: Any = None, num_samples: int | None = None,
                 **mapped: Any) -> None:
        from lamin_io.loaders._mapped import MappedCollection
        from lamin_io.loaders._sampler import ranks

        _mode(shuffle)
        if batch_size < 1 or fetch_factor < 1 or block_size < 1 or num_workers < 0:
            msg = (f"batch_size, block_size and fetch_factor must be 1 or more and "
                   f"num_workers 0 or more, got {batch_size}, {block_size}, {fetch_factor}, "
                   f"{num_workers}")
            raise InvalidArgumentError(msg)
        self.num_replicas, self.rank = ranks(num_replicas, rank)
        if isinstance(source, MappedCollection):
            if mapped:
                msg = f"{sorted(mapped)} are MappedCollection's: give them to it, not here"
                raise InvalidArgumentError(msg)
            self.dataset = source
        else:
            self.dataset = MappedCollection(list(source), **mapped)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.num_samples = num_samples
        if self.weights is not None:  # (checked now, not at the first batch)
            try:
                epoch_order(self.dataset.n_obs, seed=0, epoch=0, key=0, weights=self.weights,
                            num_samples=0 if num_samples is None else num_samples)
            except InvalidArgumentError:
                if self.dataset is not source:  # (the files this loader opened)
                    self.dataset.close()
                raise
        for store in self.dataset._stores:  # noqa: SLF001 (blocks: each one range a read)
            store.read_exact_ranges()
        self.batch_size, self.shuffle, self.block_size = batch_size, shuffle, block_size
        self.fetch_factor, self.seed, self.drop_last = fetch_factor, seed, drop_last
        self.sparse = sparse
        self.num_workers, self.multiprocessing_context = num_workers, multiprocessing_context
        self._next_epoch = 0
        # the epoch being yielded: (epoch, [[batches yielded, workers, ranks], ...]), counted
        # here, in the process that iterates; earlier entries are runs it was resumed from
        self._progress: tuple[int, list[list[int]]] | None = None
        self._resume: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches an epoch (of this rank)."""
        n, global_batch = self._items(), self.batch_size * self.num_replicas
        if self.drop_last:
            return n // global_batch
        per_rank = -(-n // self.num_replicas)  # (padded to a multiple of the ranks)
        return -(-per_rank // self.batch_size)

    def _items(self) -> int:
        """Items an epoch: the collection's, or the weighted draws'."""
        if self.weights is not None and self.num_samples is not None:
            return int(self.num_samples)
        return int(self.dataset.n_obs)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (later ones follow it)."""
        self._next_epoch = int(epoch)
        self._resume = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Return the collection's items (positions) of each batch of epoch ``epoch``.

        In the order they are yielded (with workers: a batch from each in turn).
        """
        return Plan.fresh(self._plan(epoch), self.fetch_factor, self.num_workers).batches()

    def state_dict(self) -> dict[str, Any]:
        """Return where the loader is: the epoch, the batches yielded of it, a fingerprint.

        Taken between batches (e.g. with a checkpoint), :meth:`load_state_dict` of a new
        loader over the same collection and settings goes on from there: with the same
        number of workers, with exactly the batches the run would have yielded next;
        with another, with exactly the cells it had not yielded yet.
        """
        if self._progress is None:
            epoch, runs = self._next_epoch, []
            if self._resume is not None and self._resume[0] == epoch:
                runs = [list(r) for r in self._resume[1]]
        else:
            epoch, runs = self._progress[0], [list(r) for r in self._progress[1]]
        return {"epoch": epoch, "runs": runs, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from :meth:`state_dict`'s state (at the next iteration).

        Raises :class:`~lamin_io.errors.InvalidArgumentError` for a state of another
        collection, filter, seed or order setting.
        """
        if not isinstance(state, dict) or state.get("fingerprint") != self._fingerprint():
            msg = ("this state is of another collection, filter, seed, batch size or shuffle "
                   "setting: resume with the loader it was taken from")
            raise InvalidArgumentError(msg)
        self._next_epoch = int(state["epoch"])
        self._resume = (self._next_epoch, [[int(v) for v in run] for run in state["runs"]])

    def _fingerprint(self) -> str:
        import hashlib

        what = (int(self.dataset.order_key), self.dataset.n_obs,
                hashlib.sha256(np.ascontiguousarray(self.dataset.indices).tobytes()
                               ).hexdigest(), self.seed, str(self.shuffle),
                self.block_size, self.fetch_factor, self.batch_size * self.num_replicas,
                self.drop_last,  # (the global batch: what ranks share)
                None if self.weights is None else hashlib.sha256(
                    self.weights.tobytes()).hexdigest(), self.num_samples)
        return hashlib.sha256(repr(what).encode()).hexdigest()[:16]

    def _epoch_plan(self, epoch: int, runs: list[list[int]]) -> Plan:
        """Return what this rank yields of epoch ``epoch`` after ``runs`` of it."""
        return self._plan_for(epoch, runs, self.num_workers, self.num_replicas, self.rank)

    def _plan_for(self, epoch: int, runs: list[list[int]], workers: int, replicas: int,
                  rank: int) -> Plan:
        """Return rank ``rank``'s plan (of ``replicas``, ``workers`` each) after ``runs``.

        ``runs`` are ``[batches yielded, workers, ranks]`` of the runs the epoch went
        through. After a run with the same ranks, each rank goes on from its own plan: the
        same workers yield exactly the rest, others the rest regrouped. After a run with
        other ranks, the cells no rank yielded (in the order of that run's batches, a batch
        from each rank in turn) are made this run's sequence, padded and shared anew.
        """
        if not runs:
            return Plan.fresh(self._plan(epoch, replicas, rank), self.fetch_factor, workers)
        *before, (n, run_workers, run_replicas) = runs
        global_batch = self.batch_size * self.num_replicas  # (the same in every run)
        if run_replicas == replicas:
            plan = self._plan_for(epoch, before, run_workers, replicas, rank).after(n)
            if max(run_workers, 1) != max(workers, 1):
                plan = plan.regroup(global_batch // replicas, self.fetch_factor, workers)
            return plan
        given: Counter[int] = Counter()
        left: list[list[np.ndarray]] = []
        for r in range(run_replicas):
            plan = self._plan_for(epoch, before, run_workers, run_replicas, r)
            batches = plan.batches()
            given.update(int(c) for b in batches[:n] for c in b)
            left.append(batches[n:])
        order: list[int] = []
        for i in range(max(map(len, left), default=0)):
            order.extend(int(c) for rank_left in left if i < len(rank_left)
                         for c in rank_left[i])
        if self.weights is None:  # each cell once: none yielded (also as padding) is left
            kept = list(dict.fromkeys(c for c in order if c not in given))
        else:  # draws: those not yielded, a repeated cell as often as it is left
            kept = []
            for c in order:
                if given[c]:
                    given[c] -= 1
                else:
                    kept.append(c)
        cells = np.array(kept, dtype=np.int64)
        if len(cells) % replicas and not self.drop_last:
            cells = np.concatenate([cells, np.resize(cells, replicas - len(cells) % replicas)])
        if self.drop_last:
            cells = cells[:len(cells) - len(cells) % global_batch]
        batches = [cells[i:i + global_batch] for i in range(0, len(cells), global_batch)]
        return Plan.fresh(rank_share(batches, replicas, rank), self.fetch_factor, workers)

    def _plan(self, epoch: int, replicas: int | None = None, rank: int | None = None
              ) -> list[np.ndarray]:
        """Return a rank's batches of epoch ``epoch`` (this one's by default)."""
        replicas = self.num_replicas if replicas is None else replicas
        rank = self.rank if rank is None else rank
        global_batch = self.batch_size * self.num_replicas  # (what every run keeps)
        batches = epoch_batches(
            self.dataset.n_obs, global_batch, seed=self.seed, epoch=epoch,
            key=int(self.dataset.order_key), shuffle=self.shuffle,
            block_size=self.block_size, fetch_factor=self.fetch_factor,
            drop_last=self.drop_last, replicas=replicas, weights=self.weights,
            num_samples=self.num_samples)
        return rank_share(batches, replicas, rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        runs: list[list[int]] = []
        if self._resume is not None and self._resume[0] == epoch:
            runs = self._resume[1]
        self._resume = None
        # batches handed over, by this many workers and ranks
        this = [0, self.num_workers, self.num_replicas]
        self._progress = (epoch, [*runs, this])
        return self._counted(self._epoch_plan(epoch, runs), this)

    def _counted(self, plan: Plan, this: list[int]) -> Iterator[dict[str, Any]]:
        """Yield the plan's batches, counting each before it is handed over."""
        from lamin_io.loaders._collate import collate
        from lamin_io.loaders._fetches import Fetches, as_read

        # with workers, they read and select, and the batches are made here
        fetches = Fetches(self.dataset, plan, sparse=self.sparse,
                          as_read=self.num_workers > 0)
        if self.num_workers == 0:
            source: Iterator[dict[str, Any]] = fetches.batches()
        else:
            from torch.utils.data import DataLoader

            read = DataLoader(fetches, batch_size=None, num_workers=self.num_workers,
                              collate_fn=as_read,
                              multiprocessing_context=self.multiprocessing_context)
            source = (collate(batch, sparse=self.sparse) for batch in read)
        for batch in source:
            this[0] += 1
            yield batch
        self._progress = None  # the epoch is done: a state now is the next one's start

    def close(self) -> None:
        """Close the collection's files."""
        self.dataset.close()

    def __enter__(self) -> BlockLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
