"""The block loader beside its peers: annbatch, scDataset, lamindb and our ``mapped()``.

The loader benchmark's data (``loader.py``: 8 files x 50k cells x 20k genes, CSR float32
at ~3%), batches of 256, dense float32 X (and CSR where a tool offers it) with the
``cell_type`` label. Each tool reads 50k cells (``--cells``) of its own shuffled order:

* ``block``: :class:`lamin_io.loaders.BlockLoader` with its defaults (blocks of 16 rows,
  fetches of 64 batches) on the unmodified h5ad and zarr files: dense and CSR, weighted
  by class (``get_label_weights``), 2 workers; and on our preshuffled shards
  (:func:`lamin_io.loaders.preshuffle`, made first and timed), blocks of 256 rows;
* ``annbatch``: annbatch's ``Loader`` (chunks of 32 rows, 256 chunks preloaded) on its own
  preshuffled store (``DatasetCollection.add_adatas``, made first and timed), in its own
  Python 3.12 venv without torch (``_annbatch.py``; it densifies in the timed loop, as we
  do), with ``zarrs``, which annbatch's docs ask for on local files;
* ``scdataset``: scDataset over anndata's backed files, block 4/fetch 64 and block
  16/fetch 256 (fetches read as CSR, each batch made dense);
* ``lamindb``: lamindb's ``MappedCollection`` in a ``DataLoader`` (h5ad, 0 workers);
* ``mapped``: our ``MappedCollection`` in a ``DataLoader`` with ``collate`` (h5ad).

Each configuration runs in its own process, in rounds; its first batch is checked against
the rows read with h5py before the rest is timed. Reported per configuration (medians over
the rounds): cells/s, first batch, setup, PSS peaks (tree, main, a worker above its first
reading) and the batch label entropy over that of exact random batches; per preparation,
its time and peak memory; for the block loader's defaults, the main process's memory after
each of 3 epochs. Targets are same-run ratios of the medians.

    python benchmarks/block.py                       # prepare both stores, then every tool
    python benchmarks/block.py --rounds 1 --cells 20000 --tools block annbatch

annbatch's venv: ``python3.12 -m venv benchmarks/.venv-annbatch`` and
``benchmarks/.venv-annbatch/bin/pip install annbatch zarrs psutil`` (``--annbatch-python``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import loader as base  # noqa: E402
from _harness import RESULTS, machine, median, run_isolated, run_json  # noqa: E402

PRESHUFFLED = base.DATA.parent / "preshuffled"
ANNBATCH_STORE = base.DATA.parent / "annbatch_store.zarr"
ANNBATCH = HERE.parent / "_annbatch.py"
ANNBATCH_PYTHON = HERE.parent / ".venv-annbatch" / "bin" / "python"
TOOLS = ("block", "annbatch", "scdataset", "lamindb", "mapped")
#: Rows of the preshuffled shards a block: they are in random order already, so a block's
#: size costs no shuffle quality; long blocks are few reads of whole chunks.
PRESHUFFLED_BLOCK = 256


# -- the runs ---------------------------------------------------------------------------


def shard_paths() -> list[str]:
    """The preshuffled shards' files, in order."""
    return [str(p) for p in sorted((PRESHUFFLED / "shards").glob("part-*.zarr"))]


def prepare_lamin_io() -> dict[str, Any]:
    """Preshuffle the h5ad files into a folder of shards; time and peak memory."""
    import shutil

    from lamin_io.loaders import preshuffle

    shutil.rmtree(PRESHUFFLED, ignore_errors=True)
    PRESHUFFLED.mkdir(parents=True)
    memory = base.MemoryWatch()
    memory.start()
    t0 = time.perf_counter()
    shards = preshuffle(base.paths("h5ad"), PRESHUFFLED / "shards", tmp_dir=PRESHUFFLED,
                        mute=True)
    seconds = time.perf_counter() - t0
    peaks = memory.report()
    size = sum(f.stat().st_size for f in (PRESHUFFLED / "shards").rglob("*") if f.is_file())
    return {"prepare_s": seconds, "peak_mb": peaks["tree_peak_mb"],
            "store_mb": size / 2**20, "shards": len(shards)}


def global_rows(files: list[str]) -> np.ndarray:
    """Each preshuffled cell's row among the 400k source cells (file x 50k + row)."""
    import anndata as ad
    import zarr

    out = []
    for path in files:
        obs = ad.io.read_elem(zarr.open_group(path, mode="r")["obs"])
        source = obs["source_file"].astype(str).str.extract(r"part_(\d+)")[0].astype(int)
        out.append(source.to_numpy() * base.PER_FILE + obs["source_row"].to_numpy())
    return np.concatenate(out)


def build_block(config: dict[str, Any], files: list[str], rows_of: np.ndarray | None
                ) -> tuple[Any, Any]:
    """The block loader of ``config`` and its batches as (X, labels, rows, decode)."""
    from lamin_io.loaders import BlockLoader, MappedCollection

    ds = MappedCollection(files, obs_keys=[base.KEY])
    loader = BlockLoader(ds, batch_size=base.BATCH, num_workers=config["workers"],
                         sparse=config.get("sparse", False),
                         block_size=config.get("block_size", 16),
                         weights=ds.get_label_weights(base.KEY) if config.get("weighted")
                         else None)
    decode = {v: k for k, v in ds.encoders[base.KEY].items()}

    def batches() -> Any:
        plan = loader.batches(loader._next_epoch)  # noqa: SLF001 (the epoch it yields next)
        for k, (batch, items) in enumerate(zip(loader, plan, strict=False)):
            rows = items if rows_of is None else rows_of[items]
            yield batch["X"], batch[base.KEY], rows, decode
            if (k + 1) * base.BATCH >= config["cells"]:
                break
    return loader, batches


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; return its numbers."""
    import importlib

    import torch  # noqa: F401 (imported before the memory baseline: not setup)

    if config["tool"] == "prepare_lamin_io":
        return prepare_lamin_io()
    for name in ("lamin_io.loaders", "anndata", "h5py", "zarr", "scipy.sparse",
                 *{"lamindb": ["lamindb"], "scdataset": ["scdataset"]}.get(
                     config["tool"], [])):
        importlib.import_module(name)  # imports are not setup
    if config["tool"] == "block":  # (finding the shards is not setup either)
        preshuffled = config["fmt"] == "preshuffled"
        files = shard_paths() if preshuffled else [str(p) for p in base.paths(config["fmt"])]
        rows_of = global_rows(files) if preshuffled else None
    memory = base.MemoryWatch()
    memory.start()
    t0 = time.perf_counter()
    if config["tool"] == "block":
        ds, batches = build_block(config, files, rows_of)
    else:
        tool = {"mapped": "lamin_io"}.get(config["tool"], config["tool"])
        ds, batches = base.build(tool, config["fmt"], config["workers"], config)
    labels: list[str] = []
    result = base.measure(config, memory, time.perf_counter() - t0, ds, batches, labels)
    return {**result, "labels": labels}


def annbatch(args: list[str], python: Path, timeout: float) -> dict[str, Any]:
    """Run ``_annbatch.py`` in annbatch's venv; return its JSON answer."""
    return run_json([str(python), str(ANNBATCH), *args], timeout=timeout)


# -- the plan and the report ------------------------------------------------------------


def configs(tools: list[str], cells: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if "block" in tools:
        out += [{"tool": "block", "fmt": "h5ad", "workers": 0},
                {"tool": "block", "fmt": "h5ad", "workers": 0, "sparse": True},
                {"tool": "block", "fmt": "h5ad", "workers": 0, "weighted": True},
                {"tool": "block", "fmt": "h5ad", "workers": 2},
                {"tool": "block", "fmt": "zarr", "workers": 0},
                {"tool": "block", "fmt": "preshuffled", "workers": 0,
                 "block_size": PRESHUFFLED_BLOCK},
                {"tool": "block", "fmt": "preshuffled", "workers": 0, "sparse": True,
                 "block_size": PRESHUFFLED_BLOCK}]
    if "annbatch" in tools:
        out += [{"tool": "annbatch", "fmt": "annbatch store", "workers": 0},
                {"tool": "annbatch", "fmt": "annbatch store", "workers": 0, "sparse": True}]
    if "scdataset" in tools:
        out += [{"tool": "scdataset", "fmt": "h5ad", "workers": 0, "block": b, "fetch": f,
                 "sparse_fetch": True} for b, f in ((4, 64), (16, 256))]
    if "lamindb" in tools:
        out.append({"tool": "lamindb", "fmt": "h5ad", "workers": 0})
    if "mapped" in tools:
        out.append({"tool": "mapped", "fmt": "h5ad", "workers": 0})
    for c in out:
        c.update(cells=cells, epochs=1)
    return out


def label(c: dict[str, Any]) -> str:
    name = c["tool"]
    if "block" in c:
        name += f" block {c['block']}/fetch {c['fetch']}"
    if c.get("block_size"):
        name += f" block {c['block_size']}"
    if c.get("weighted"):
        name += " weighted"
    return f"{name}, {c['fmt']}, {'CSR' if c.get('sparse') else 'dense'}, {c['workers']} workers"


def entropy_bits(labels: list[str]) -> float:
    """Mean Shannon entropy (bits) of the labels of each batch of 256."""
    values: list[float] = []
    for k in range(0, len(labels) - base.BATCH + 1, base.BATCH):
        _, counts = np.unique(labels[k:k + base.BATCH], return_counts=True)
        p = counts / counts.sum()
        values.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(values)) if values else float("nan")


def random_entropy() -> float:
    """The same for batches of an exact random order of all cells (the reference)."""
    import h5py

    labels: list[str] = []
    for path in base.paths("h5ad"):
        with h5py.File(path, "r") as f:
            cats = f[f"obs/{base.KEY}/categories"].asstr()[:]
            labels.extend(cats[f[f"obs/{base.KEY}/codes"][:]])
    order = np.random.default_rng(7).permutation(len(labels))
    return entropy_bits(np.asarray(labels)[order].tolist())


def summarize(results: list[dict[str, Any]], reference: float) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault(label(r), []).append(r)
    keys = ("cells_per_s", "first_batch_s", "setup_s", "tree_peak_mb", "main_peak_mb",
            "worker_peak_mb", "entropy")
    for rs in groups.values():
        for r in rs:
            r["entropy"] = entropy_bits(r["labels"]) / reference
    return {name: {**{k: median([r[k] for r in rs]) for k in keys if k in rs[0]},
                   "rounds": len(rs)} for name, rs in groups.items()}


def fetch_mb() -> float:
    """A default fetch (64 batches of 256 rows) of these files as CSR in memory, in MB."""
    import h5py

    with h5py.File(base.paths("h5ad")[0], "r") as f:
        per_row = f["X/data"].shape[0] / f["X/indptr"].shape[0]
    return 64 * base.BATCH * (per_row * 8 + 8) / 2**20


def targets(s: dict[str, dict[str, Any]], prep: dict[str, dict[str, Any]],
            epochs: list[float] | None) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []

    def ratio(name: str, a: str, b: str, goal: float, *, at_most: bool = False) -> None:
        if a not in s or b not in s:
            rows.append((name, "n/a", None))
            return
        value = s[a]["cells_per_s"] / s[b]["cells_per_s"]
        met = value >= goal if not at_most else value <= goal
        rows.append((name, f"{value:.2f}x ({'<=' if at_most else '>='} {goal:g}x)", met))

    annbatch_dense = "annbatch, annbatch store, dense, 0 workers"
    ratio("block (defaults) from h5ad / annbatch on its store, dense",
          "block, h5ad, dense, 0 workers", annbatch_dense, 1)
    ratio("block on our preshuffled shards / annbatch on its store, dense",
          f"block block {PRESHUFFLED_BLOCK}, preshuffled, dense, 0 workers", annbatch_dense,
          1.2)
    ratio("block on our preshuffled shards / annbatch, CSR",
          f"block block {PRESHUFFLED_BLOCK}, preshuffled, CSR, 0 workers",
          "annbatch, annbatch store, CSR, 0 workers", 1.2)
    slower = "block weighted, h5ad, dense, 0 workers"
    if slower in s and "block, h5ad, dense, 0 workers" in s:
        loss = 1 - s[slower]["cells_per_s"] / s["block, h5ad, dense, 0 workers"]["cells_per_s"]
        rows.append(("weighted: slower than unweighted by", f"{loss:.0%} (<= 20%)",
                     loss <= 0.2))
    ratio("2 workers / one process (h5ad, dense)", "block, h5ad, dense, 2 workers",
          "block, h5ad, dense, 0 workers", 1)
    ratio("block (defaults) from h5ad / lamindb MappedCollection",
          "block, h5ad, dense, 0 workers", "lamindb, h5ad, dense, 0 workers", 1)
    ratio("block (defaults) from h5ad / scDataset block 4/fetch 64",
          "block, h5ad, dense, 0 workers", "scdataset block 4/fetch 64, h5ad, dense, 0 workers",
          1)
    buffer = fetch_mb()
    main = s.get("block, h5ad, dense, 0 workers")
    if main is not None:
        beyond = main["main_peak_mb"] - 2 * buffer  # (a fetch in use, the next one read)
        rows.append((f"main peak beyond 2 fetch buffers ({2 * buffer:.0f} MB), batch 256",
                     f"+{beyond:.0f} MB (<= +150)", beyond <= 150))
    two = s.get("block, h5ad, dense, 2 workers")
    if two is not None:
        rows.append((f"a worker's peak / its fetch buffer ({buffer:.0f} MB)",
                     f"{two['worker_peak_mb'] / buffer:.2f}x (<= 1.2x)",
                     two["worker_peak_mb"] <= 1.2 * buffer))
    if epochs:
        rows.append(("main process after each of 3 epochs (block defaults)",
                     ", ".join(f"+{v:.0f}" for v in epochs) + " MB (flat)",
                     epochs[-1] - epochs[0] <= 25))
    ours = prep.get("lamin_io preshuffle")
    if ours and "peak_mb" in ours:
        rows.append(("preshuffle peak memory (400k cells)", f"{ours['peak_mb']:.0f} MB "
                     "(< 2048)", ours["peak_mb"] < 2048))
    return rows


def report(results: list[dict[str, Any]], prep: dict[str, dict[str, Any]],
           epochs: list[float] | None, reference: float, out: Path) -> None:
    s = summarize(results, reference)
    rows = targets(s, prep, epochs)
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "labels"} for r in results]
    (out / "block.json").write_text(json.dumps(
        {"machine": machine(), "results": slim, "medians": s, "preparation": prep,
         "epoch_main_mb": epochs, "random_batch_entropy_bits": reference,
         "targets": [{"target": t, "value": v, "met": m} for t, v, m in rows]}, indent=1))
    lines = [f"# Block loader benchmark ({machine()['date']})", "",
             f"{base.N_FILES} files x {base.PER_FILE:,} cells x 20k genes (CSR float32, ~3%),"
             f" batch {base.BATCH}, X as dense float32 (or CSR) + the cell type; "
             f"{results[0]['cells']:,} cells a configuration, medians over "
             f"{max(v['rounds'] for v in s.values())} rounds, each run in its own process. "
             "Memory is PSS above the process's level after its imports (a worker's: above "
             "its first reading). Entropy: the batches' mean label entropy over that of "
             f"exact random batches ({reference:.2f} bits).", "",
             "| configuration | cells/s | first batch s | setup s | peak tree MB | "
             "peak main MB | peak worker MB | entropy / random |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in s.items():
        lines.append(f"| {name} | {v['cells_per_s']:,.0f} | {v['first_batch_s']:.3f} | "
                     f"{v['setup_s']:.3f} | {v['tree_peak_mb']:.0f} | {v['main_peak_mb']:.0f}"
                     f" | {v.get('worker_peak_mb', 0):.0f} | {v['entropy']:.3f} |")
    lines += ["", "Preparation (once, from the 8 h5ad files):", "",
              "| tool | seconds | peak MB | store MB |", "|---|---|---|---|"]
    for name, p in prep.items():
        lines.append(f"| {name} | {p.get('prepare_s', float('nan')):.1f} | "
                     f"{p.get('peak_mb', float('nan')):.0f} | "
                     f"{p.get('store_mb', float('nan')):.0f} |" if "error" not in p
                     else f"| {name} | failed: {p['error']} | | |")
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {label(r)}: {r['error']}" for r in failed]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if m else 'no' if m is not None else '-'} |"
              for t, v, m in rows]
    (out / "block.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--annbatch-python", type=Path, default=ANNBATCH_PYTHON)
    parser.add_argument("--no-epochs", action="store_true", help="skip the 3-epoch run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    base.generate()
    prep: dict[str, dict[str, Any]] = {}
    if "block" in args.tools:
        print("preshuffling (lamin-io) ...", flush=True)
        prep["lamin_io preshuffle"] = run_isolated(HERE, {"tool": "prepare_lamin_io"},
                                                   timeout=args.timeout)
        print(f"  {prep['lamin_io preshuffle']}", flush=True)
    if "annbatch" in args.tools:
        print("preshuffling (annbatch) ...", flush=True)
        prep["annbatch add_adatas"] = annbatch(
            ["prepare", "--out", str(ANNBATCH_STORE), "--overwrite"], args.annbatch_python,
            args.timeout)
        print(f"  {prep['annbatch add_adatas']}", flush=True)
    todo = configs(args.tools, args.cells)
    results = []
    for round_ in range(args.rounds):
        for config in todo:
            if config["tool"] == "annbatch":
                got = annbatch(["run", "--store", str(ANNBATCH_STORE), "--cells",
                                str(config["cells"]), "--batch", str(base.BATCH), "--chunk",
                                "32", "--preload", "256",
                                *(["--sparse"] if config.get("sparse") else [])],
                               args.annbatch_python, args.timeout)
                got.setdefault("worker_peak_mb", 0.0)
            else:
                got = run_isolated(HERE, config, timeout=args.timeout)
            result = {**config, "round": round_, **got}
            results.append(result)
            brief = result.get("error") or f"{result['cells_per_s']:,.0f} cells/s"
            print(f"round {round_ + 1}: {label(config)}: {brief}", flush=True)
    epochs = None
    if "block" in args.tools and not args.no_epochs:
        config = {"tool": "block", "fmt": "h5ad", "workers": 0, "cells": args.cells,
                  "epochs": 3}
        got = run_isolated(HERE, config, timeout=args.timeout)
        epochs = got.get("epoch_main_mb")
        print(f"3 epochs: {epochs or got.get('error')}", flush=True)
    report(results, prep, epochs, random_entropy(), args.out)


if __name__ == "__main__":
    main()
