"""``preshuffle``: rewrite a collection as shuffled zarr shards (a streaming external shuffle).

Two passes over the data, so that memory holds a slab of rows and then one shard, never
the collection:

1. **Spill.** The collection is read in order, a slab of rows at a time (sequential reads,
   whatever the format). Each cell goes to a shard drawn uniformly at random; its row, its
   obs values and its name are appended to that shard's spill files on local disk.
2. **Write.** Each shard's spill files are read back, its cells permuted at random, and the
   shard written as an AnnData zarr store whose X has small chunks (a block of rows is a
   short read), then saved as an artifact. The shards become a collection.

Sending every cell to a uniform random shard and permuting each shard gives a uniform
random permutation of the whole collection (the shards only differ in size, by chance).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd

    from lamin_io.loaders._mapped import MappedCollection
    from lamin_io.registry import Artifact, Collection

__all__ = ["CHUNK", "SHARD_BYTES", "preshuffle"]

logger = logging.getLogger(__name__)

#: A shard's rows in memory while it is written (X's values and column indices): it bounds
#: the peak memory with the slab, whatever the collection's size.
SHARD_BYTES = 256 * 2**20
#: Bytes of rows read at a time in the spill pass.
SLAB_BYTES = 64 * 2**20
#: Values a chunk of the shards' ``X/data`` and ``X/indices`` (128 KiB of float32): a block
#: of a few dozen rows is a read of one or two chunks.
CHUNK = 2**15
#: The obs columns every shard gets: the source file (artifact key or file name) and row.
SOURCE_COLUMNS = ("source_file", "source_row")


def preshuffle(source: Any, key: str, *, seed: int = 0, layer: str = "X",
               obs_keys: Sequence[str] | None = None, obs_filter: dict[str, Any] | None = None,
               join: str = "inner", shard_bytes: int = SHARD_BYTES,
               tmp_dir: str | Path | None = None, description: str | None = None,
               storage_options: dict[str, Any] | None = None, mute: bool = False
               ) -> Collection:
    """Rewrite a collection's cells in a random order, as zarr shards; return their collection.

    The shards (``{key}/part-00000.zarr``, ...) are AnnData zarr stores, saved as artifacts
    and grouped, in order, as the collection ``key``. Together they hold every selected cell
    once, in a uniform random order (from ``seed``): X (``layer`` of the source, its
    variables joined by ``join``) as CSR with chunks of :data:`CHUNK` values, the obs
    columns ``obs_keys`` (default: those every file has; categories merged across files),
    the obs names, and where each cell came from (``source_file``: the artifact's key or
    the file's name; ``source_row``: its row there). var holds the variable names; other
    elements (layers, obsm, uns) are not copied.

    A :class:`~lamin_io.loaders.BlockLoader` over the result reads it faster than the
    source (its blocks are whole chunks), and its batches are random even with large
    blocks (``block_size=`` 64 or more).

    Memory holds a slab of :data:`SLAB_BYTES` and then one shard (about ``shard_bytes``,
    twice while it is permuted), whatever the size of the collection; local disk holds
    the spilled rows (about the size of X, uncompressed) under ``tmp_dir`` (default: the
    system's temporary folder) until the shards are saved.

    Parameters
    ----------
    source
        A :class:`~lamin_io.registry.Collection`, an artifact set (``Artifact.filter``)
        or a list of ``.h5ad``/``.zarr`` paths.
    key
        The new collection's key; the shards' keys start with it.
    seed
        The shuffle's seed: the same source and seed give the same shards (saving them
        again returns the existing records).
    layer, obs_filter, join
        What to read, as in :class:`~lamin_io.loaders.MappedCollection`.
    obs_keys
        obs columns to keep.
    shard_bytes
        A shard's size in memory (X's values and indices); the number of shards follows
        from it.
    storage_options
        fsspec options of remote paths in a list of paths.
    mute
        No progress bar.

    Raises
    ------
    InvalidArgumentError
        No AnnData files, an empty selection, or ``shard_bytes`` below 1.
    NameNotFoundError
        An obs key none of the files has.
    """
    from lamin_io.registry._keys import validate_key

    validate_key(key, suffix=None)
    if shard_bytes < 1:
        msg = f"shard_bytes must be 1 or more, got {shard_bytes}"
        raise InvalidArgumentError(msg)
    ds, names = _mapped(source, layer, obs_filter, join, storage_options)
    work = Path(tempfile.mkdtemp(prefix="lamin-io-preshuffle-", dir=tmp_dir))
    saved: list[Artifact] = []
    try:
        columns = _columns(ds, obs_keys)
        spill = _Spill(ds, layer, columns, names, work, shard_bytes, seed)
        from lamin_io.storage._progress import ProgressCallback

        with ProgressCallback(f"preshuffling into {key}", mute=mute) as progress:
            progress.set_size(2 * spill.total_bytes)
            spill.run(progress)
            for shard in range(spill.shards):
                saved.append(spill.write(shard, key, description, mute=mute))
                progress.relative_update(spill.bytes_of(shard))
        from lamin_io.registry import Collection

        collection = Collection(saved, key=key, description=description).save()
    except BaseException:
        for artifact in saved:  # (no half-made result: the shards saved so far go)
            artifact.delete()
        raise
    finally:
        ds.close()
        shutil.rmtree(work, ignore_errors=True)
    logger.info("preshuffled %d cells into %d shards: %s", ds.n_obs, len(saved), key)
    return collection


def _mapped(source: Any, layer: str, obs_filter: dict[str, Any] | None, join: str,
            storage_options: dict[str, Any] | None) -> tuple[MappedCollection, list[str]]:
    """Return the source as a collection of files, and each file's name for ``source_file``."""
    from lamin_io.loaders._mapped import MappedCollection
    from lamin_io.registry import Artifact, ArtifactSet, Collection

    if join not in ("inner", "outer"):
        msg = f"join must be 'inner' or 'outer', got {join!r}"
        raise InvalidArgumentError(msg)
    options: dict[str, Any] = {"layers_keys": layer, "obs_filter": obs_filter, "join": join}
    if isinstance(source, Collection):
        source = source.artifacts
    if isinstance(source, str | Path):
        source = [source]
    items = list(source)
    if items and all(isinstance(a, Artifact) for a in items):
        kept = [a for a in items if ".h5ad" in a.suffix or ".zarr" in a.suffix]
        ds = ArtifactSet(items).mapped(**options)
        keys = [a.key or a.uid for a in kept]  # (a key twice: versions of it, by uid)
        return ds, keys if len(set(keys)) == len(keys) else [a.uid for a in kept]
    if not items:
        msg = "nothing to preshuffle: give a collection, artifacts or .h5ad/.zarr paths"
        raise InvalidArgumentError(msg)
    ds = MappedCollection(items, storage_options=storage_options, **options)
    names = [Path(str(p)).name for p in items]
    return ds, names if len(set(names)) == len(names) else [str(p) for p in items]


def _columns(ds: MappedCollection, obs_keys: Sequence[str] | None) -> list[_Column]:
    """Return the obs columns to carry, each with its kind and merged categories."""
    from lamin_io.errors import NameNotFoundError

    every = ds._obs_columns  # noqa: SLF001
    if obs_keys is None:
        first = ds._stores[0]  # noqa: SLF001
        from lamin_io.accessors._anndata import _stored_keys

        keys = [k for k in _stored_keys(first, "obs")
                if all(k in c for c in every) and k not in SOURCE_COLUMNS]
    else:
        keys = list(obs_keys)
        for k in keys:
            if not any(k in c for c in every):
                msg = (f"obs key {k!r} is in none of the {len(every)} files; columns of "
                       f"the first: {sorted(every[0])}")
                raise NameNotFoundError(msg)
    return [_Column(ds, k) for k in keys]


class _Column:
    """An obs column across the files: numbers stay numbers, anything else a categorical."""

    def __init__(self, ds: MappedCollection, key: str) -> None:
        import pandas as pd

        self.key = key
        files = [s for s in range(len(ds._stores)) if ds._has_obs(s, key)]  # noqa: SLF001
        cats = {s: ds._column(s, key)[1] for s in files}  # noqa: SLF001
        missing = len(files) < len(ds._stores) or any(  # noqa: SLF001
            (ds._column(s, key)[0] < 0).any() for s in files)  # noqa: SLF001
        self.numeric = bool(cats) and all(c.dtype.kind in "biuf" for c in cats.values())
        self.categories: pd.Index | None = None
        self._luts: dict[int, np.ndarray] = {}
        if self.numeric:
            dtype = np.result_type(*(c.dtype for c in cats.values()))
            self.dtype = np.result_type(dtype, np.float32) if missing else dtype
            self._values = {s: c.to_numpy().astype(self.dtype) for s, c in cats.items()}
            return
        self.dtype = np.dtype(np.int32)
        merged = pd.Index(ds.get_merged_categories(key))
        self.categories = merged
        self._luts = {s: merged.get_indexer(c).astype(np.int32) for s, c in cats.items()}

    def values(self, ds: MappedCollection, s: int, rows: np.ndarray) -> np.ndarray:
        """Return the stored form of file ``s``'s ``rows``: values, or merged codes."""
        table = (self._values if self.numeric else self._luts).get(s)
        if table is None:  # (a file without the column)
            return np.full(len(rows), np.nan if self.numeric else -1, dtype=self.dtype)
        codes = ds._column(s, self.key)[0][rows].astype(np.int64)  # noqa: SLF001
        out = table[np.maximum(codes, 0)] if len(table) else np.zeros(len(codes), self.dtype)
        if (codes < 0).any():  # (only where the column has missing values: then float)
            out[codes < 0] = np.nan if self.numeric else -1
        return out

    def column(self, stored: np.ndarray) -> Any:
        """Return the shard's obs column from its stored form."""
        import pandas as pd

        if self.numeric:
            return stored
        return pd.Categorical.from_codes(stored, categories=self.categories)


class _Spill:
    """The spill pass's files on local disk (one folder a shard), and the write pass."""

    def __init__(self, ds: MappedCollection, layer: str, columns: list[_Column],
                 names: list[str], work: Path, shard_bytes: int, seed: int) -> None:
        if ds.n_obs == 0:
            msg = "the selection holds no cells: nothing to preshuffle"
            raise InvalidArgumentError(msg)
        self.ds, self.layer, self.columns, self.names = ds, layer, columns, names
        self.work, self.seed = work, seed
        assert ds.var_joint is not None  # noqa: S101 (joined: "inner" or "outer")
        assert ds.n_vars is not None  # noqa: S101
        self.n_vars, self.var = ds.n_vars, ds.var_joint
        self.index_dtype = np.dtype(np.int32 if self.n_vars < 2**31 else np.int64)
        self.row_bytes = self._row_bytes()
        self.total_bytes = int(self.row_bytes * ds.n_obs)
        self.shards = max(1, -(-self.total_bytes // shard_bytes))
        self.cells = np.zeros(self.shards, dtype=np.int64)
        self.nnz = np.zeros(self.shards, dtype=np.int64)
        self.data_dtype: np.dtype[Any] | None = None
        for shard in range(self.shards):
            (work / str(shard)).mkdir()

    def _row_bytes(self) -> float:
        """Return the mean bytes of a row (values, indices, length), from 256 rows a file."""
        ds = self.ds
        taken = [min(n, 256) for n in ds.n_obs_list]
        bounds = np.cumsum([0, *taken])
        starts = np.cumsum([0, *ds.n_obs_list[:-1]])
        x = ds.__getitems__(np.concatenate([np.arange(s, s + k) for s, k in zip(
            starts, taken, strict=True)])).csr(self.layer)
        nnz = np.diff(x.indptr)
        mean = sum(n * nnz[a:b].mean() for n, a, b in zip(
            ds.n_obs_list, bounds[:-1], bounds[1:], strict=True) if b > a) / ds.n_obs
        return float(mean) * (x.data.itemsize + self.index_dtype.itemsize) + 8

    def bytes_of(self, shard: int) -> int:
        return int(self.nnz[shard] * (self.index_dtype.itemsize + (
            self.data_dtype.itemsize if self.data_dtype is not None else 4)) + 8 * self.cells[
            shard])

    def _append(self, shard: int, name: str, values: np.ndarray) -> None:
        with open(self.work / str(shard) / name, "ab") as f:
            np.ascontiguousarray(values).tofile(f)

    def run(self, progress: Any) -> None:
        """Read the collection in order, a slab at a time, and spill each cell to its shard."""
        ds = self.ds
        rng = np.random.default_rng([self.seed, 17])
        slab = max(1, int(SLAB_BYTES // self.row_bytes))
        for s, n in enumerate(ds.n_obs_list):
            offset = int(np.sum(ds.n_obs_list[:s]))
            names = ds._stores[s].axis_names("obs")  # noqa: SLF001
            for start in range(0, n, slab):
                stop = min(n, start + slab)
                x = ds.__getitems__(np.arange(offset + start, offset + stop)).csr(self.layer)
                x.sort_indices()
                if self.data_dtype is None:
                    self.data_dtype = x.data.dtype
                rows = ds.indices_list[s][start:stop]  # (the rows in the file)
                stored = [c.values(ds, s, rows) for c in self.columns]
                shard_of = rng.integers(0, self.shards, size=stop - start)
                by_shard = np.argsort(shard_of, kind="stable")
                bounds = np.searchsorted(shard_of[by_shard], np.arange(self.shards + 1))
                for shard in np.flatnonzero(np.diff(bounds)).tolist():
                    at = by_shard[bounds[shard]:bounds[shard + 1]]
                    part = x[at]
                    self._append(shard, "data", part.data.astype(self.data_dtype, copy=False))
                    self._append(shard, "indices", part.indices.astype(self.index_dtype))
                    self._append(shard, "lengths", np.diff(part.indptr).astype(np.int64))
                    self._append(shard, "file", np.full(len(at), s, dtype=np.int32))
                    self._append(shard, "row", rows[at].astype(np.int64))
                    for i, values in enumerate(stored):
                        self._append(shard, f"obs{i}", values[at])
                    encoded = [str(v).encode() for v in names[rows[at]]]
                    self._append(shard, "name_lengths", np.fromiter(map(len, encoded),
                                                                     np.int64, len(encoded)))
                    with open(self.work / str(shard) / "names", "ab") as f:
                        f.write(b"".join(encoded))
                    self.cells[shard] += len(at)
                    self.nnz[shard] += part.nnz
                progress.relative_update(int((stop - start) * self.row_bytes))
            # done with this file: what was read of it whole (names, columns) can go
            del names
            for key in [k for k in ds._columns if k[0] == s]:  # noqa: SLF001
                del ds._columns[key]  # noqa: SLF001
            ds._stores[s].invalidate()  # noqa: SLF001

    def _read(self, shard: int, name: str, dtype: Any) -> np.ndarray:
        path = self.work / str(shard) / name
        return np.fromfile(path, dtype=dtype) if path.exists() else np.empty(0, dtype=dtype)

    def write(self, shard: int, key: str, description: str | None, *, mute: bool
              ) -> Artifact:
        """Permute the shard's cells, write it as an AnnData zarr store, save it."""
        import anndata as ad
        import pandas as pd
        import scipy.sparse as sp
        import zarr

        from lamin_io.registry import Artifact

        n = int(self.cells[shard])
        perm = np.random.default_rng([self.seed, 18, shard]).permutation(n)
        lengths = self._read(shard, "lengths", np.int64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        x = sp.csr_matrix((self._read(shard, "data", self.data_dtype or np.float32),
                           self._read(shard, "indices", self.index_dtype), indptr),
                          shape=(n, self.n_vars))[perm]
        name_lengths = self._read(shard, "name_lengths", np.int64)
        blob = (self.work / str(shard) / "names").read_bytes() if n else b""
        ends = np.cumsum(name_lengths)
        names = np.array([blob[e - k:e].decode() for e, k in zip(ends, name_lengths,
                                                                   strict=True)],
                         dtype=object)[perm]
        obs = pd.DataFrame({c.key: c.column(self._read(shard, f"obs{i}", c.dtype)[perm])
                            for i, c in enumerate(self.columns)},
                           index=pd.Index(names, dtype=object))
        labels = list(dict.fromkeys(self.names))
        codes = pd.Index(labels).get_indexer(self.names)
        obs[SOURCE_COLUMNS[0]] = pd.Categorical.from_codes(
            codes[self._read(shard, "file", np.int32)[perm]], categories=labels)
        obs[SOURCE_COLUMNS[1]] = self._read(shard, "row", np.int64)[perm]
        obs.index = obs.index.astype(str)
        path = self.work / f"part-{shard:05d}.zarr"
        adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=self.var.astype(str)))
        del x
        # every array of the shard is 1-D (X's CSR parts, obs and var columns)
        ad.io.write_elem(zarr.open_group(path, mode="w", zarr_format=2), "/", adata,
                         dataset_kwargs={"chunks": (CHUNK,)})
        zarr.consolidate_metadata(str(path))
        del adata
        artifact = Artifact(path, key=f"{key}/part-{shard:05d}.zarr",
                            description=description).save(mute=mute)
        shutil.rmtree(path, ignore_errors=True)
        return artifact
