"""annbatch, the peer loader, measured on the loader benchmark's files (its own venv).

annbatch needs Python >= 3.12 and does not share our environment, so this script runs under
``benchmarks/.venv-annbatch`` (annbatch, anndata, zarr, h5py, psutil; neither torch nor
lamin_io) and prints one JSON object on its last line of stdout, for ``loader.py`` to read.

* ``prepare``: annbatch's preshuffled store from the 8 h5ad files, with
  ``annbatch.DatasetCollection(out).add_adatas(files, shuffle=True)`` and its defaults
  otherwise (seeded). annbatch adds ``obs["src_path"]`` (the input file of each cell) and
  makes the obs names unique (``cell_7``, ``cell_7-1``, ...), so every cell of the store is
  traced back to its (file, row); the script checks that this covers each input cell once.
* ``run``: ``annbatch.Loader(chunk_size=, preload_nchunks=, batch_size=, shuffle=True)``
  over the store (``Loader.use_collection``, with obs reduced to ``cell_type`` and
  ``src_path``), the CSR batches made dense float32 (as our loader yields them) unless
  ``--sparse``. The first batch's first 32 cells are checked against the rows read with h5py
  from the h5ad files before the rest is timed (the check's time is left out).

Memory is the PSS of the process tree (``/proc/<pid>/smaps_rollup``, sampled every 50 ms)
above its level after the imports.

    P=benchmarks/.venv-annbatch/bin/python
    $P benchmarks/_annbatch.py prepare --out benchmarks/data/annbatch_store.zarr
    $P benchmarks/_annbatch.py run --store benchmarks/data/annbatch_store.zarr --cells 50000 \
        --batch 256 --chunk 32 --preload 256 [--sparse]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import zarr
from annbatch import DatasetCollection, Loader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import MemoryWatch  # noqa: E402 (stdlib, numpy and psutil: fine in this venv)

DATA = Path(__file__).resolve().parent / "data" / "loader"
FILES = [DATA / f"part_{i}.h5ad" for i in range(8)]
KEY = "cell_type"
SRC = "src_path"  # the column annbatch adds: the input path of each cell

try:  # annbatch's advice for local files; used where installed
    import zarrs  # noqa: F401

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    ZARRS = True
except ImportError:
    ZARRS = False


# -- provenance ---------------------------------------------------------------------------


def source_rows(obs: Any) -> tuple[list[str], np.ndarray]:
    """(input file, row in it) of each cell, from ``src_path`` and the obs names.

    The names of every input file are ``cell_<row>``; annbatch's ``obs_names_make_unique``
    appends ``-<k>`` to repeats, which is cut off here.
    """
    rows = [re.fullmatch(r"(?:cell_)?(\d+)(?:-\d+)?", str(name)) for name in obs.index]
    if any(m is None for m in rows):
        bad = next(n for n, m in zip(obs.index, rows, strict=True) if m is None)
        raise ValueError(f"cannot trace obs name {bad!r} to a row")
    return [str(p) for p in obs[SRC]], np.array([int(m.group(1)) for m in rows])


def h5py_rows(files: list[str], rows: np.ndarray, n_vars: int) -> tuple[np.ndarray, list[str]]:
    """Rows of X (dense float32) and their cell types, read with h5py from the h5ad files."""
    out = np.zeros((len(rows), n_vars), dtype=np.float32)
    labels = []
    for k, (path, row) in enumerate(zip(files, rows, strict=True)):
        with h5py.File(path, "r") as h5:
            lo, hi = h5["X/indptr"][row:row + 2]
            out[k, h5["X/indices"][lo:hi]] = h5["X/data"][lo:hi]
            cats = h5[f"obs/{KEY}/categories"].asstr()[:]
            labels.append(str(cats[h5[f"obs/{KEY}/codes"][row]]))
    return out, labels


# -- the two commands ---------------------------------------------------------------------


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def n_rows(path: Path) -> int:
    with h5py.File(path, "r") as h5:
        return int(h5["X"].attrs["shape"][0])


def prepare(out: Path, files: list[Path], overwrite: bool, seed: int) -> dict[str, Any]:
    """annbatch's preshuffled store from ``files`` (annbatch's defaults, seeded)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:  # (add_adatas would add the files to an existing collection)
            raise SystemExit(f"{out} exists; remove it or pass --overwrite")
        shutil.rmtree(out)
    memory = MemoryWatch()
    memory.start()
    t0 = time.perf_counter()
    collection = DatasetCollection(out).add_adatas(
        [str(f.resolve()) for f in files], shuffle=True, rng=np.random.default_rng(seed))
    seconds = time.perf_counter() - t0
    peaks = memory.report()
    # every input cell exactly once, traced back to its (file, row)
    srcs, rows = source_rows(collection.obs(columns=[SRC]))
    sizes = {str(f.resolve()): n_rows(f) for f in files}
    traced = {(s, int(r)) for s, r in zip(srcs, rows, strict=True)}
    if len(traced) != len(rows) or len(rows) != sum(sizes.values()) or any(
            r >= sizes[s] for s, r in traced):
        raise AssertionError("the store's cells do not map one to one onto the input rows")
    return {"prepare_s": seconds, "peak_mb": peaks["tree_peak_mb"],
            "main_peak_mb": peaks["main_peak_mb"], "store_mb": du_mb(out),
            "n_obs": len(rows), "datasets": len(list(collection)), "zarrs": ZARRS}


def load_x_and_obs(group: zarr.Group) -> ad.AnnData:
    """The store's X (backed CSR) and the two obs columns the run needs (the README's advice)."""
    return ad.AnnData(X=ad.io.sparse_dataset(group["X"]),
                      obs=ad.io.read_elem(group["obs"])[[KEY, SRC]])


def run(store: Path, cells: int, batch: int, chunk: int, preload: int, sparse: bool,
        seed: int) -> dict[str, Any]:
    """Iterate annbatch's loader over ``store`` until ``cells`` cells; time it."""
    memory = MemoryWatch()
    memory.start()
    t0 = time.perf_counter()
    with ad.settings.override(remove_unused_categories=False):
        loader = Loader(batch_size=batch, chunk_size=chunk, preload_nchunks=preload,
                        shuffle=True, rng=np.random.default_rng(seed))
        loader.use_collection(DatasetCollection(store, mode="r"), load_adata=load_x_and_obs)
    setup = time.perf_counter() - t0

    labels: list[np.ndarray] = []
    seen = 0
    check = first = 0.0
    t0 = time.perf_counter()
    for out in loader:
        x, obs = out["X"], out["obs"]
        x = x if sparse else x.toarray()  # already float32
        labels.append(obs[KEY].to_numpy())
        if seen == 0:
            first = time.perf_counter() - t0
            c0 = time.perf_counter()
            srcs, rows = source_rows(obs.iloc[:32])
            want_x, want_y = h5py_rows(srcs, rows, x.shape[1])
            got_x = x[:32].toarray() if sparse else x[:32]
            if got_x.dtype != np.float32 or not np.array_equal(got_x, want_x):
                raise AssertionError("the first batch's X differs from h5py's rows")
            if [str(v) for v in labels[0][:32]] != want_y:
                raise AssertionError("the first batch's labels differ from h5py's")
            check = time.perf_counter() - c0
        seen += x.shape[0]
        if seen >= cells:
            break
    seconds = time.perf_counter() - t0 - check
    return {"cells_per_s": seen / seconds, "seconds": seconds, "first_batch_s": first,
            "setup_s": setup, **memory.report(), "cells_read": seen,
            "output": type(x).__name__, "zarrs": ZARRS,
            "labels": [str(v) for v in np.concatenate(labels)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write annbatch's preshuffled store")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--files", type=Path, nargs="+", default=FILES)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r = sub.add_parser("run", help="time annbatch's loader over the store")
    r.add_argument("--store", type=Path, required=True)
    r.add_argument("--cells", type=int, default=50_000)
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--chunk", type=int, default=32)
    r.add_argument("--preload", type=int, default=256)
    r.add_argument("--sparse", action="store_true", help="keep the batches as scipy CSR")
    for command in (p, r):
        command.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "prepare":
        result = prepare(args.out, args.files, args.overwrite, args.seed)
    else:
        result = run(args.store, args.cells, args.batch, args.chunk, args.preload, args.sparse,
                     args.seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
