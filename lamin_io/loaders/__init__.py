"""PyTorch data loading across many AnnData files (datasets, samplers, sharding).

:class:`MappedCollection` is a drop-in for lamindb's, reading whole batches at once;
:func:`collate` stacks its batches into tensors; :class:`DistributedSampler` gives each
rank of ``torch.distributed`` its share of an epoch (optionally drawn by label weight).
torch is imported only when a batch is collated.
"""

from lamin_io.loaders._collate import collate
from lamin_io.loaders._mapped import Batch, MappedCollection
from lamin_io.loaders._sampler import DistributedSampler

__all__ = ["Batch", "DistributedSampler", "MappedCollection", "collate"]
