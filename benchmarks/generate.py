"""Synthetic single-cell data shaped like real data, for the benchmarks.

CSR float32 counts at ~3% density with heavy-tailed gene detection (per-gene rates drawn
from a log-normal), per-cell depth that varies, a categorical ``cell_type`` with many
categories of skewed sizes, and gene-symbol-like names. Writes, under ``--out``:

* ``sparse_<cells>.h5ad`` and ``sparse_<cells>.zarr`` (anndata's default zarr layout),
* ``sparse_<cells>_gzip.h5ad``: the base file with its arrays in gzip-compressed chunks
  (``write_h5ad(compression="gzip")``), as much public data is stored,
* ``dense_<cells>.h5ad`` with a dense X (``--dense-cells``; dense files grow fast:
  cells x 20k genes x 4 bytes),
* ``dense_<cells>.zarr``: a dense X written by anndata's ``write_zarr`` with its defaults
  (``--dense-zarr-cells``; zarr format 2 with anndata 0.12, chunks of 125 x 2,500 at 2,000
  cells, blosc-lz4),
* ``tiny.h5ad`` / ``tiny.zarr`` / ``tiny_gzip.h5ad`` / ``tiny_dense.h5ad`` /
  ``tiny_dense.zarr`` (used to warm imports up outside the timings).

    python benchmarks/generate.py --cells 50000 --scale 1 4
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

N_VARS = 20_000
N_TYPES = 120


def make(n_obs: int, seed: int = 0, *, dense: bool = False) -> object:
    """Return an AnnData of ``n_obs`` cells x 20k genes."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    rates = rng.lognormal(-4.0, 1.6, N_VARS)  # heavy-tailed gene detection
    p = rates / rates.sum()
    depth = rng.lognormal(0, 0.35, n_obs)
    per_row = np.minimum(rng.poisson(0.03 * N_VARS * depth / depth.mean()), N_VARS // 2)
    rows = np.repeat(np.arange(n_obs, dtype=np.int64), per_row)
    genes = rng.choice(N_VARS, size=len(rows), p=p)
    keys = np.unique(rows * N_VARS + genes)  # sorted, one entry per (cell, gene)
    rows, genes = keys // N_VARS, (keys % N_VARS).astype(np.int32)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=n_obs))))
    data = (rng.geometric(0.4, len(genes))).astype(np.float32)
    X = sp.csr_matrix((data, genes, indptr), shape=(n_obs, N_VARS))
    sizes = rng.pareto(1.1, N_TYPES) + 0.05
    sizes[7] = 0.0
    sizes *= 0.95 / sizes.sum()
    sizes[7] = 0.05  # the benchmark's category: ~5% of cells
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice([f"type_{i}" for i in range(N_TYPES)],
                                               n_obs, p=sizes)),
        "donor": pd.Categorical(rng.choice([f"donor_{i}" for i in range(12)], n_obs)),
        "n_counts": np.asarray(X.sum(axis=1)).ravel(),
    }, index=[f"cell_{i}" for i in range(n_obs)])
    var = pd.DataFrame({"gene_symbol": [f"GENE{i}" for i in range(N_VARS)]},
                       index=[f"GENE{i}" for i in range(N_VARS)])
    return ad.AnnData(X.toarray() if dense else X, obs=obs, var=var)


def main() -> None:
    """Write the benchmark files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=50_000, help="cells of the base file")
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 4],
                        help="sizes to write, as multiples of --cells (sparse h5ad)")
    parser.add_argument("--dense-cells", type=int, default=8_000)
    parser.add_argument("--dense-zarr-cells", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    for scale in args.scale:
        n = args.cells * scale
        adata = make(n)
        adata.write_h5ad(args.out / f"sparse_{n}.h5ad")
        if scale == 1:
            adata.write_zarr(args.out / f"sparse_{n}.zarr")
            adata.write_h5ad(args.out / f"sparse_{n}_gzip.h5ad", compression="gzip")
        print(f"sparse {n} cells, density {adata.X.nnz / (n * N_VARS):.3f}")
    make(args.dense_cells, dense=True).write_h5ad(args.out / f"dense_{args.dense_cells}.h5ad")
    n = args.dense_zarr_cells
    make(n, dense=True).write_zarr(args.out / f"dense_{n}.zarr")
    tiny = make(500)
    tiny.write_h5ad(args.out / "tiny.h5ad")
    tiny.write_h5ad(args.out / "tiny_gzip.h5ad", compression="gzip")
    tiny.write_zarr(args.out / "tiny.zarr")
    tiny_dense = make(500, dense=True)
    tiny_dense.write_h5ad(args.out / "tiny_dense.h5ad")
    tiny_dense.write_zarr(args.out / "tiny_dense.zarr")


if __name__ == "__main__":
    main()
