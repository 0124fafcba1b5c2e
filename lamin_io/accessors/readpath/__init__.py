"""The batched read path: plan, then read.

"These rows (and columns) of this element of this store" becomes a CSR or dense block in
three steps, each in its own module:

- :mod:`.plan` (pure, no I/O): rows are sorted and de-duplicated, turned into element or
  row ranges, coalesced into runs (gaps read through only within the bound the README
  states: at most twice the selected bytes) and grouped into bounded batches
  (:class:`Budget`);
- a backend executes the plans of one open store: :class:`Backend` (through the array
  library), :class:`~.hdf5.Hdf5Backend` (byte ranges of a local file or an S3 object),
  :class:`~.zarr.ZarrBackend` (chunks decoded once each, on every core); batches are read
  a few in flight (:mod:`.pipeline`);
- :mod:`.sparse` and :mod:`.dense` select columns per batch and assemble the result.

:class:`Source` is the interface callers use: it opens the store lazily in the process
that reads, is safe to pickle and to fork, and reads blocks (:meth:`Source.read`) and obs
codes (:meth:`Source.codes`). The AnnData accessor builds its AnnData semantics on it;
the training loaders read their batches through it.
"""

from __future__ import annotations

from lamin_io.accessors.readpath.backend import Backend
from lamin_io.accessors.readpath.pipeline import Pending
from lamin_io.accessors.readpath.plan import DEFAULT_BUDGET, Budget, Layout
from lamin_io.accessors.readpath.source import Source
from lamin_io.accessors.readpath.sparse import SparseParts

__all__ = ["DEFAULT_BUDGET", "Backend", "Budget", "Layout", "Pending", "Source", "SparseParts"]
