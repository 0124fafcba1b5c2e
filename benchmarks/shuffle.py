"""How well the block loader shuffles: batch label entropy, index jumps and a learning probe.

The orders are those ``lamin_io.loaders.BlockLoader`` yields (``epoch_batches``, a pure
function: no file is read), over 400k cells (8 files x 50k) with batches of 256, for:

* exact random (``shuffle="random"``), the reference;
* block mode at several block sizes and fetch factors;
* a preshuffled collection (``lamin_io.loaders.preshuffle``: a uniform random order of the
  cells, stored) read in block mode with blocks of 256;
* two negative controls: the stored order (``shuffle=False``) and a shuffle buffer alone
  (one block of everything: the stored order, shuffled only within each fetch).

Two label layouts: the loader benchmark's files (cell types drawn independently for every
cell, read from the h5ad files when present), and the same types stored sorted, in runs,
as many atlases are (the hard case). Reported per configuration, as ratios to exact random:

* batch label entropy: the Shannon entropy of each batch's labels, mean over batches;
* jump entropy: the entropy of ``log2 |i - j|`` between neighbouring cells of a batch;
* a probe: logistic regression (``SGDClassifier``, log loss) trained one epoch in the
  loader's order on a synthetic collection whose 10 classes are stored in runs, its macro-F1
  on held-out cells, mean over 3 seeds.

The loader's default block size and fetch factor are the largest blocks that keep the
sorted layout's batch label entropy at >= 97% of exact random.

    python benchmarks/shuffle.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from _harness import RESULTS, machine  # noqa: E402

from lamin_io.loaders._block import BLOCK_SIZE, FETCH_FACTOR, epoch_batches  # noqa: E402

N, BATCH = 400_000, 256
CONFIGS: list[tuple[str, Any, int, int]] = [  # name, shuffle, block size, fetch factor
    ("exact random", "random", 1, FETCH_FACTOR),
    *[(f"block {b}, fetch {f}", "block", b, f)
      for b, f in ((4, 16), (8, 16), (16, 16), (32, 16), (64, 16), (128, 16), (16, 4),
                   (16, 64), (64, 64))],
    ("preshuffled, block 256, fetch 64", "preshuffled", 256, 64),
    ("stored order (control)", False, 1, FETCH_FACTOR),
    ("shuffle buffer only (control)", "block", N, FETCH_FACTOR),
]


def batches_of(n: int, shuffle: Any, block: int, fetch: int, seed: int, key: int
               ) -> list[np.ndarray]:
    """The loader's batches of an epoch, as positions in the stored (source) order.

    ``"preshuffled"``: the cells were rewritten in a uniform random order first (as
    ``preshuffle`` does), and block mode reads that copy: a stored position ``q`` of the
    copy is source cell ``perm[q]``.
    """
    if shuffle != "preshuffled":
        return epoch_batches(n, BATCH, seed=seed, epoch=0, key=key, shuffle=shuffle,
                             block_size=min(block, n), fetch_factor=fetch)
    perm = np.random.default_rng([seed, 99]).permutation(n)
    return [perm[b] for b in epoch_batches(n, BATCH, seed=seed, epoch=0, key=key,
                                           shuffle="block", block_size=block,
                                           fetch_factor=fetch)]


def labels_of_the_benchmark() -> np.ndarray:
    """Cell types of the loader benchmark's files (or drawn alike when they are missing)."""
    folder = HERE.parent / "data" / "loader"
    files = [folder / f"part_{i}.h5ad" for i in range(8)]
    if all(f.exists() for f in files):
        import h5py

        out = []
        for f in files:
            with h5py.File(f, "r") as h5:
                cats = h5["obs/cell_type/categories"].asstr()[:]
                out.append(np.searchsorted(np.sort(cats), cats)[h5["obs/cell_type/codes"][:]])
        return np.concatenate(out)
    rng = np.random.default_rng(0)
    sizes = rng.pareto(1.1, 120) + 0.05
    return rng.choice(120, N, p=sizes / sizes.sum())


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def measures(labels: np.ndarray, shuffle: Any, block: int, fetch: int, seed: int = 0
             ) -> dict[str, float]:
    batches = batches_of(len(labels), shuffle, block, fetch, seed, key=1)
    k = int(labels.max()) + 1
    label_h = np.mean([entropy(np.bincount(labels[b], minlength=k)) for b in batches])
    jumps = np.concatenate([np.abs(np.diff(b)) for b in batches if len(b) > 1])
    bins = np.floor(np.log2(np.maximum(jumps, 1))).astype(int)
    return {"label_entropy": float(label_h),
            "jump_entropy": abs(entropy(np.bincount(bins)))}  # (one bin: 0, not -0)


def probe(shuffle: Any, block: int, fetch: int, seed: int) -> float:
    """Macro-F1 of a linear model trained one epoch in the loader's order on sorted classes."""
    import warnings

    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(100 + seed)
    n, classes, dims = 100_000, 10, 32
    y = np.sort(rng.integers(0, classes, n))  # stored in runs, one class after the other
    centers = rng.normal(0, 1, (classes, dims))
    x = (centers[y] + rng.normal(0, 2.0, (n, dims))).astype(np.float32)
    test_y = rng.integers(0, classes, 5000)
    test_x = centers[test_y] + rng.normal(0, 2.0, (5000, dims))
    model = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.01,
                          random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in batches_of(n, shuffle, block, fetch, seed, key=2):
            model.partial_fit(x[b], y[b], classes=np.arange(classes))
    return float(f1_score(test_y, model.predict(test_x), average="macro"))


def main() -> None:
    iid = labels_of_the_benchmark()
    layouts = {"independent (benchmark files)": iid, "sorted by type (runs)": np.sort(iid)}
    rows: list[dict[str, Any]] = []
    for name, shuffle, block, fetch in CONFIGS:
        row: dict[str, Any] = {"config": name, "shuffle": str(shuffle), "block_size": block,
                               "fetch_factor": fetch}
        for layout, labels in layouts.items():
            row[layout] = measures(labels, shuffle, block, fetch)
        row["probe_f1"] = float(np.mean([probe(shuffle, block, fetch, s) for s in range(3)]))
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k not in ("config",)}, flush=True)
    ref = rows[0]
    for row in rows:
        for layout in layouts:
            for m in ("label_entropy", "jump_entropy"):
                row[layout][f"{m}_vs_random"] = row[layout][m] / ref[layout][m]
        row["probe_vs_random"] = row["probe_f1"] / ref["probe_f1"]
    hard = "sorted by type (runs)"
    ok = [r for r in rows if r["shuffle"] == "block" and r["block_size"] < N
          and r[hard]["label_entropy_vs_random"] >= 0.97]
    best = max(ok, key=lambda r: (r["block_size"], -r["fetch_factor"]), default=None)
    report(rows, best, list(layouts))


def report(rows: list[dict[str, Any]], best: dict[str, Any] | None, layouts: list[str]
           ) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shuffle.json").write_text(json.dumps(
        {"machine": machine(), "cells": N, "batch": BATCH, "rows": rows,
         "default": {"block_size": BLOCK_SIZE, "fetch_factor": FETCH_FACTOR},
         "largest_block_at_97": None if best is None else best["config"]}, indent=1))
    lines = [f"# Shuffle quality ({machine()['date']})", "",
             f"{N:,} cells, batches of {BATCH}; ratios to exact random. Label entropy: mean "
             "Shannon entropy of a batch's labels; jumps: entropy of log2 |i - j| between "
             "neighbouring cells of a batch; probe: macro-F1 of a linear model trained one "
             "epoch in this order on 10 classes stored in runs (mean of 3 seeds).", "",
             "| order | " + " | ".join(f"label entropy, {lay} | jumps, {lay}"
                                       for lay in layouts) + " | probe F1 |",
             "|---|" + "---|---|" * len(layouts) + "---|"]
    for r in rows:
        cells = [f"{r[lay]['label_entropy_vs_random']:.3f} | "
                 f"{r[lay]['jump_entropy_vs_random']:.3f}" for lay in layouts]
        lines.append(f"| {r['config']} | " + " | ".join(cells)
                     + f" | {r['probe_f1']:.3f} ({r['probe_vs_random']:.2f}x) |")
    lines += ["", f"Default: block {BLOCK_SIZE}, fetch {FETCH_FACTOR}. Largest block keeping "
              f"the sorted layout's label entropy >= 97% of exact random: "
              f"{best['config'] if best else 'none'}."]
    (RESULTS / "shuffle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
