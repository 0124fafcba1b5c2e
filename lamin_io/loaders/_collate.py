"""``collate``: a batch as read, stacked into tensors without a dict per row."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["collate"]


def collate(batch: Any, *, sparse: bool = False) -> dict[str, Any]:
    """Stack a batch of a :class:`~lamin_io.loaders.MappedCollection` into tensors.

    Pass it as ``DataLoader(ds, batch_size=256, collate_fn=collate)``: the batch torch
    hands over is the :class:`~lamin_io.loaders.Batch` that ``ds.__getitems__`` read, and
    is stacked straight from its blocks (the same values and dtypes torch's default
    collate gives from the item dicts). ``sparse=True`` gives layers as torch sparse CSR
    tensors. Any other batch (a list of item dicts) goes to torch's default collate.

    Examples
    --------
    >>> from functools import partial                                        # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, shuffle=True,
    ...                     collate_fn=partial(collate, sparse=True))
    """
    import torch
    from torch.utils.data import default_collate

    from lamin_io.loaders._mapped import Batch

    if not isinstance(batch, Batch):
        return default_collate(batch)
    out: dict[str, Any] = {}
    for name in batch.keys():
        if name != "_store_idx":
            batch.require(name)  # torch's default collate fails on such a batch too
        if name == "_store_idx":
            out[name] = torch.from_numpy(batch.store_idx.astype(np.int64))
        elif batch.is_label(name):  # a value a row: torch's rules, as the items would give
            out[name] = default_collate(batch.labels(name).tolist())
        elif sparse and batch.is_layer(name):
            csr = batch.csr(name)
            out[name] = torch.sparse_csr_tensor(
                torch.from_numpy(csr.indptr.astype(np.int64)),
                torch.from_numpy(csr.indices.astype(np.int64)),
                torch.from_numpy(csr.data), size=csr.shape)
        else:
            out[name] = _dense(batch, name)
    return out


def _dense(batch: Any, name: str) -> Any:
    """Return a dense tensor of ``name``'s rows (in a DataLoader worker: in shared memory).

    A worker's tensors go to the main process through shared memory: written there in the
    first place, a batch is not copied again on its way (torch's default collate does the
    same for the tensors it stacks).
    """
    import torch
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.from_numpy(batch.dense(name))
    shape, dtype = batch.dense_layout(name)
    tensor = torch.from_numpy(np.empty((0,), dtype=dtype))
    storage = tensor.untyped_storage()._new_shared(  # noqa: SLF001 (as torch's collate)
        int(np.prod(shape)) * dtype.itemsize)
    shared = tensor.new_empty(0).set_(storage).view(shape)
    batch.dense(name, out=shared.numpy())
    return shared
