"""``preshuffle``: rewrite AnnData files as shuffled zarr shards (a streaming external shuffle).

Two passes over the data, so that memory holds a slab of rows and then one shard, never
the collection:

1. **Spill.** The files are read in order, a slab of rows at a time (sequential reads,
   whatever the format). Each cell goes to a shard drawn uniformly at random; its row, its
   obs values and its name are appended to that shard's spill files on local disk.
2. **Write.** Each shard's spill files are read back, its cells permuted at random, and the
   shard written as an AnnData zarr store whose X has small chunks (a block of rows is a
   short read).

Sending every cell to a uniform random shard and permuting each shard gives a uniform
random permutation of all cells (the shards only differ in size, by chance).
``Collection.preshuffle`` saves the shards as artifacts and a collection.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lamin_io.errors import InvalidArgumentError, NameNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import pandas as pd

    from lamin_io.loaders._mapped import MappedCollection

__all__ = ["CHUNK", "SHARD_BYTES", "preshuffle"]

logger = logging.getLogger(__name__)

#: A shard's rows in memory while it is written (X's values and column indices): it bounds
#: the peak memory with the slab, whatever the collection's size.
SHARD_BYTES = 256 * 2**20
#: Bytes of rows read at a time in the spill pass (as read: dense rows count whole).
SLAB_BYTES = 64 * 2**20
#: Values a chunk of the shards' ``X/data`` and ``X/indices`` (128 KiB of float32): a block
#: of a few dozen rows is a read of one or two chunks.
CHUNK = 2**15
#: Fewest cells a shard is planned with (tiny shards cost a file each, and help nothing).
MIN_SHARD_CELLS = 1024
#: The obs columns every shard gets: the source file (artifact key or file name) and row.
SOURCE_COLUMNS = ("source_file", "source_row")


def preshuffle(source: MappedCollection | Sequence[Any], out_dir: str | Path | None, *,
               seed: int = 0, layer: str | None = None, obs_keys: Sequence[str] | None = None,
               shard_bytes: int = SHARD_BYTES, tmp_dir: str | Path | None = None,
               names: Sequence[str] | None = None, tag: str = "",
               on_shard: Callable[[Path], None] | None = None, mute: bool = False,
               **mapped: Any) -> list[Path]:
    """Write the cells of AnnData files in a uniform random order, as zarr shards.

    The shards (``part-00000.zarr``, ... in ``out_dir``) are AnnData zarr stores that
    together hold every selected cell once, in a random order from ``seed``: X (``layer``
    of the source, its variables joined as in :class:`MappedCollection`) as CSR with chunks
    of :data:`CHUNK` values, the obs columns ``obs_keys`` (default: those every file has;
    categories merged across files), the obs names, where each cell came from
    (``source_file``: ``names[i]``, by default the file's name; ``source_row``: its row
    there) and, in ``uns["preshuffle"]``, the seed, ``tag`` and the shard's number. var
    holds the variable names; other elements (layers, obsm, uns) are not copied.

    A :class:`BlockLoader` over the shards reads them faster than the source (its blocks
    are whole chunks), and its batches are random even with large blocks.

    Memory holds a slab of :data:`SLAB_BYTES` and then one shard (about ``shard_bytes``,
    twice while it is permuted), whatever the number of cells; local disk holds the spilled
    rows (about the size of X, uncompressed) under ``tmp_dir`` (default: the system's
    temporary folder) until the shards are written.

    Parameters
    ----------
    source
        A :class:`MappedCollection` (its filter and join apply) or ``.h5ad``/``.zarr``
        paths (with ``mapped``'s keywords: ``obs_filter``, ``join``, ``storage_options``).
    out_dir
        Where the shards are written (made if missing); ``None``: a temporary folder,
        removed at the end (``on_shard`` then takes each shard away).
    seed
        The shuffle's seed: the same source and seed give the same shards.
    layer
        ``"X"`` (default) or a layer's name (of the collection's ``layers_keys``).
    obs_keys
        obs columns to keep.
    shard_bytes
        A shard's size in memory (X's values and indices); the number of shards follows.
    names
        Each file's name in ``source_file`` (default: file names, or paths where names
        repeat).
    tag
        Written to each shard's ``uns``: shards of another tag differ in content.
    on_shard
        Called with each shard's path once it is written (e.g. to save and remove it).
    mute
        No progress bar.

    Raises
    ------
    InvalidArgumentError
        An empty selection, a layer of its own variables (``raw.X``), an unjoined
        collection, ``shard_bytes`` below 1, a negative seed or a missing ``tmp_dir``.
    NameNotFoundError
        An obs key no file has, or a file without the layer.
    """
    from lamin_io.loaders._mapped import MappedCollection

    if shard_bytes < 1 or seed < 0:
        msg = f"shard_bytes must be 1 or more and seed 0 or more, got {shard_bytes}, {seed}"
        raise InvalidArgumentError(msg)
    if tmp_dir is not None and not Path(tmp_dir).is_dir():
        msg = f"tmp_dir {tmp_dir} is no folder: make it, or leave tmp_dir out"
        raise InvalidArgumentError(msg)
    if out_dir is None and on_shard is None:
        msg = "give out_dir, or on_shard to take each shard from the temporary folder"
        raise InvalidArgumentError(msg)
    if isinstance(source, MappedCollection):
        if mapped:
            msg = f"{sorted(mapped)} are MappedCollection's: give them to it, not here"
            raise InvalidArgumentError(msg)
        ds, own = source, False
    else:
        paths = [source] if isinstance(source, str | Path) else list(source)
        ds = MappedCollection(paths, layers_keys=layer, **mapped)
        own = True
    try:
        return _preshuffle(ds, out_dir, seed, layer or ds.layers_keys[0], obs_keys,
                           shard_bytes, tmp_dir, names, tag, on_shard, mute=mute)
    finally:
        if own:
            ds.close()


def _preshuffle(ds: MappedCollection, out_dir: str | Path | None, seed: int, layer: str,
                obs_keys: Sequence[str] | None, shard_bytes: int,
                tmp_dir: str | Path | None, names: Sequence[str] | None, tag: str,
                on_shard: Callable[[Path], None] | None, *, mute: bool) -> list[Path]:
    from lamin_io.storage._progress import ProgressCallback

    if names is None:
        names = [Path(str(p)).name for p in ds.path_list]
        if len(set(names)) < len(names):
            names = [str(p) for p in ds.path_list]
    spill = _Spill(ds, layer, _columns(ds, obs_keys), list(names), shard_bytes, seed, tag)
    work = Path(tempfile.mkdtemp(prefix="lamin-io-preshuffle-", dir=tmp_dir))
    folder = work / "shards" if out_dir is None else Path(out_dir)
    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        spill.work = work
        with ProgressCallback("preshuffling", mute=mute) as progress:
            progress.set_size(2 * spill.total_bytes)
            spill.run(progress)
            for shard in [s for s in range(spill.shards) if spill.cells[s]]:
                path = folder / f"part-{len(written):05d}.zarr"
                spill.write(shard, len(written), path)
                written.append(path)
                if on_shard is not None:
                    on_shard(path)
                progress.relative_update(spill.bytes_of(shard))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("preshuffled %d cells into %d shards in %s", ds.n_obs, len(written), folder)
    return written


def _columns(ds: MappedCollection, obs_keys: Sequence[str] | None) -> list[_Column]:
    """Return the obs columns to carry, each with its kind and merged categories."""
    if obs_keys is None:
        keys = [k for k in ds.obs_columns() if k not in SOURCE_COLUMNS]
    else:
        keys = list(obs_keys)
        ds.check_obs_keys(keys)
    columns = [_Column(ds, k) for k in keys]
    for s in range(len(ds.path_list)):  # (what was read to know them: read again per file)
        ds.release(s)
    return columns


class _Column:
    """An obs column across the files: numbers stay numbers, anything else a categorical."""

    def __init__(self, ds: MappedCollection, key: str) -> None:
        import pandas as pd

        self.key = key
        files = [s for s in range(len(ds.path_list)) if ds._has_obs(s, key)]  # noqa: SLF001
        kinds, missing = [], len(files) < len(ds.path_list)
        for s in files:
            codes, categories = ds._column(s, key)  # noqa: SLF001
            kinds.append(_numpy_dtype(categories.dtype))
            missing = missing or bool((codes < 0).any())
        self.numeric = bool(kinds) and all(k is not None and k.kind in "biuf" for k in kinds)
        self.categories: pd.Index | None = None
        self._table: tuple[int, np.ndarray] | None = None  # (file, its lookup): the last one
        if self.numeric:
            dtype = np.result_type(*kinds)
            self.dtype = np.result_type(dtype, np.float32) if missing else dtype
            return
        self.dtype = np.dtype(np.int32)
        try:
            self.categories = pd.Index(ds.get_merged_categories(key))
        except TypeError:  # (values that do not sort together: strings and numbers)
            msg = (f"obs column {key!r} holds values of different types across the files "
                   f"(e.g. strings in one, numbers in another): leave it out of obs_keys")
            raise InvalidArgumentError(msg) from None

    def values(self, ds: MappedCollection, s: int, rows: np.ndarray) -> np.ndarray:
        """Return the stored form of file ``s``'s ``rows``: values, or merged codes."""
        if not ds._has_obs(s, self.key):  # noqa: SLF001
            return np.full(len(rows), np.nan if self.numeric else -1, dtype=self.dtype)
        codes, categories = ds._column(s, self.key)  # noqa: SLF001
        codes = codes[rows].astype(np.int64)
        if self._table is None or self._table[0] != s:  # (once a file, not once a slab)
            if self.numeric:
                table = np.asarray(categories, dtype=self.dtype)
            else:
                assert self.categories is not None  # noqa: S101
                table = self.categories.get_indexer(categories).astype(np.int32)
            self._table = (s, table)
        table = self._table[1]
        out = table[np.maximum(codes, 0)] if len(table) else np.zeros(len(codes), self.dtype)
        if (codes < 0).any():  # (only where the column has missing values: then float)
            out[codes < 0] = np.nan if self.numeric else -1
        return out

    def column(self, stored: np.ndarray) -> Any:
        """Return the shard's obs column from its stored form (only its used categories)."""
        import pandas as pd

        if self.numeric:
            return stored
        return pd.Categorical.from_codes(stored, categories=self.categories
                                         ).remove_unused_categories()


def _numpy_dtype(dtype: Any) -> np.dtype[Any] | None:
    """Return the numpy type of a column's values (of pandas' nullable types too), or None."""
    try:
        return np.dtype(getattr(dtype, "numpy_dtype", dtype))
    except TypeError:
        return None


class _Spill:
    """The spill pass's files on local disk (one folder a shard), and the write pass."""

    work: Path

    def __init__(self, ds: MappedCollection, layer: str, columns: list[_Column],
                 names: list[str], shard_bytes: int, seed: int, tag: str) -> None:
        if ds.n_obs == 0:
            msg = "the selection holds no cells: nothing to preshuffle"
            raise InvalidArgumentError(msg)
        if layer == "raw.X" or ds.var_joint is None or ds.n_vars is None:
            msg = ("preshuffle writes X or a layer over the joined variables (join='inner' "
                   f"or 'outer'), not {layer!r} with join={ds.join_vars!r}")
            raise InvalidArgumentError(msg)
        for s, path in enumerate(ds.path_list):
            if ds._layer_key(s, layer) is None:  # noqa: SLF001
                msg = f"{path} has no layer {layer!r}: leave it out, or choose another layer"
                raise NameNotFoundError(msg)
        self.ds, self.layer, self.columns, self.names = ds, layer, columns, names
        self.seed, self.tag = seed, tag
        self.n_vars, self.var = ds.n_vars, ds.var_joint
        self.index_dtype = np.dtype(np.int32 if self.n_vars < 2**31 else np.int64)
        self.data_dtype, self.row_bytes, self.read_bytes = self._sizes()
        self.total_bytes = int(self.row_bytes * ds.n_obs)
        self.shards = max(1, min(-(-self.total_bytes // shard_bytes),
                                 ds.n_obs // MIN_SHARD_CELLS))
        self.cells = np.zeros(self.shards, dtype=np.int64)
        self.nnz = np.zeros(self.shards, dtype=np.int64)

    def _sizes(self) -> tuple[np.dtype[Any], float, list[float]]:
        """Return X's value type, a row's mean bytes in a shard, and as read from each file.

        From up to 256 random rows a file (their values' type over all files).
        """
        from lamin_io.accessors._attrs import is_group

        ds = self.ds
        rng = np.random.default_rng([self.seed, 16])
        starts = np.cumsum([0, *ds.n_obs_list[:-1]])
        taken = [np.sort(rng.choice(n, min(n, 256), replace=False)) + a
                 for a, n in zip(starts, ds.n_obs_list, strict=True)]
        batch = ds.__getitems__(np.concatenate(taken))
        x = batch.csr(self.layer)
        dtype = batch.dense_layout(self.layer)[1]
        nnz = np.diff(x.indptr)
        bounds = np.cumsum([0, *map(len, taken)])
        mean = sum(n * nnz[a:b].mean() for n, a, b in zip(
            ds.n_obs_list, bounds[:-1], bounds[1:], strict=True) if b > a) / ds.n_obs
        per_row = float(mean) * (dtype.itemsize + self.index_dtype.itemsize) + 8
        dense = self.n_vars * dtype.itemsize
        where = [str(ds._layer_key(s, self.layer)) for s in range(len(ds.path_list))]  # noqa: SLF001
        read = [per_row if is_group(ds._stores[s].get(key)) else dense  # noqa: SLF001
                for s, key in enumerate(where)]  # (a sparse layer is a group)
        return dtype, per_row, read

    def bytes_of(self, shard: int) -> int:
        return int(self.nnz[shard] * (self.index_dtype.itemsize + self.data_dtype.itemsize)
                   + 8 * self.cells[shard])

    def _append(self, shard: int, name: str, values: np.ndarray) -> None:
        folder = self.work / str(shard)
        folder.mkdir(exist_ok=True)
        with open(folder / name, "ab") as f:
            np.ascontiguousarray(values).tofile(f)

    def run(self, progress: Any) -> None:
        """Read the files in order, a slab at a time, and spill each cell to its shard."""
        ds = self.ds
        rng = np.random.default_rng([self.seed, 17])
        for s, n in enumerate(ds.n_obs_list):
            offset = int(np.sum(ds.n_obs_list[:s]))
            names = ds._stores[s].axis_names("obs")  # noqa: SLF001
            slab = max(1, int(SLAB_BYTES // self.read_bytes[s]))
            for start in range(0, n, slab):
                stop = min(n, start + slab)
                x = ds.__getitems__(np.arange(offset + start, offset + stop)).csr(self.layer)
                x.sort_indices()
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
            del names
            ds.release(s)  # (done with this file: its names and columns can go)

    def _read(self, shard: int, name: str, dtype: Any) -> np.ndarray:
        return np.fromfile(self.work / str(shard) / name, dtype=dtype)

    def write(self, shard: int, part: int, path: Path) -> None:
        """Permute the shard's cells and write them as an AnnData zarr store at ``path``."""
        import anndata as ad
        import pandas as pd
        import scipy.sparse as sp
        import zarr

        n = int(self.cells[shard])
        perm = np.random.default_rng([self.seed, 18, shard]).permutation(n)
        lengths = self._read(shard, "lengths", np.int64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        x = sp.csr_matrix((self._read(shard, "data", self.data_dtype),
                           self._read(shard, "indices", self.index_dtype), indptr),
                          shape=(n, self.n_vars))[perm]
        name_lengths = self._read(shard, "name_lengths", np.int64)
        blob = (self.work / str(shard) / "names").read_bytes()
        ends = np.cumsum(name_lengths)
        names = [blob[e - k:e].decode() for e, k in zip(ends, name_lengths, strict=True)]
        obs = pd.DataFrame({c.key: c.column(self._read(shard, f"obs{i}", c.dtype)[perm])
                            for i, c in enumerate(self.columns)},
                           index=pd.Index(np.asarray(names, dtype=object)[perm], dtype=str))
        labels = list(dict.fromkeys(self.names))
        codes = pd.Index(labels).get_indexer(self.names)
        obs[SOURCE_COLUMNS[0]] = pd.Categorical.from_codes(
            codes[self._read(shard, "file", np.int32)[perm]], categories=labels
        ).remove_unused_categories()
        obs[SOURCE_COLUMNS[1]] = self._read(shard, "row", np.int64)[perm]
        adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=self.var.astype(str)))
        del x
        root = zarr.open_group(path, mode="w", zarr_format=2)
        # every array of the shard is 1-D (X's CSR parts, obs and var columns)
        ad.io.write_elem(root, "/", adata, dataset_kwargs={"chunks": (CHUNK,)})
        ad.io.write_elem(root, "uns", {"preshuffle": {"seed": self.seed, "tag": self.tag,
                                                      "part": part}})
        zarr.consolidate_metadata(str(path))
