"""PyTorch data loading across many AnnData files (datasets, samplers, sharding).

:class:`MappedCollection` is a drop-in for lamindb's, reading whole batches at once;
:func:`collate` stacks its batches into tensors; :class:`DistributedSampler` gives each
rank of ``torch.distributed`` its share of an epoch (optionally drawn by label weight);
:class:`BlockLoader` yields batches from random blocks of neighbouring rows, read a fetch
of many batches at a time; :func:`preshuffle` rewrites a collection in a random order, as
zarr shards it reads fastest.
torch is imported only when a batch is collated.
"""

from lamin_io.loaders._block import BlockLoader
from lamin_io.loaders._collate import collate
from lamin_io.loaders._mapped import Batch, MappedCollection
from lamin_io.loaders._preshuffle import preshuffle
from lamin_io.loaders._sampler import DistributedSampler

__all__ = ["Batch", "BlockLoader", "DistributedSampler", "MappedCollection", "collate",
           "preshuffle"]
