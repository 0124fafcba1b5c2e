"""Training loaders side by side: random batches from many AnnData files into PyTorch.

Eight files of 50k cells x 20k genes (400k cells; CSR float32 at ~3%, from ``generate.py``),
as h5ad and as anndata's default zarr. Every tool reads the same 50k cells (a seeded random
order over all 400k) in batches of 256 as a dense float32 X and an integer ``cell_type``:

* ``lamin_io``: ``lamin_io.loaders.MappedCollection`` in a ``DataLoader`` with
  ``collate_fn=lamin_io.loaders.collate`` (h5ad and zarr; 0 and 2 workers);
* ``lamindb``: lamindb's ``MappedCollection`` in a ``DataLoader`` with torch's default
  collate and its ``torch_worker_init_fn`` (h5ad and zarr; 0 and 2 workers);
* ``backed``: anndata's backed mode, each batch's rows sorted per file and read at once;
* ``lamin_io_block``: ``lamin_io.loaders.BlockLoader`` (its defaults: blocks of 16 rows in
  random order, fetches of 64 batches); it reads its own order of all 400k cells, of which
  the first 50k are timed (h5ad and zarr; 0 and 2 workers);
* ``scdataset``: scDataset over the same backed files, block size 1 fetching 16 batches at
  once, and block size 4 fetching 64 (its sorted fetches are its speed-up); it draws its own
  order of the same 50k cells.

The same h5ad files also on S3 (s3rver on loopback behind the counting proxy of the subset
benchmark, adding 20 ms before every request, as a bucket in another place would): lamin-io
reading by range (``stream=True``) against lamindb's ``MappedCollection`` on the same
paths, on fewer cells (``--s3-cells``; lamindb reads a row at a time there).

Each configuration runs in its own process, in rounds (a round of all of them, then the
next), its first batch checked against the rows read with h5py before the rest is timed.
Reported: cells/s over the 50k cells, the first batch's latency, setup (opening the files,
page cache warm), peak memory as PSS (the process tree, the main process, and each worker
above its own first reading, after its imports), and for lamin-io and lamindb on h5ad the
main process's memory after each of 3 epochs. Targets are same-run ratios of the medians.

    python benchmarks/loader.py                      # generate once, then every configuration
    python benchmarks/loader.py --rounds 1 --cells 5000 --tools lamin_io lamindb
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from _harness import RESULTS, machine, median, run_isolated  # noqa: E402

DATA = HERE.parent / "data" / "loader"
BUCKET = "bench"  # (the bucket of the subset benchmark's S3 server)
N_FILES, PER_FILE, BATCH = 8, 50_000, 256
TOOLS = ("lamin_io", "lamindb", "backed", "scdataset", "lamin_io_block")
KEY = "cell_type"


# -- data -------------------------------------------------------------------------------


def paths(fmt: str) -> list[Path]:
    return [DATA / f"part_{i}.{fmt}" for i in range(N_FILES)]


def generate() -> None:
    """Write the 8 files as h5ad and as zarr (anndata's defaults), once."""
    import warnings

    from generate import make

    DATA.mkdir(parents=True, exist_ok=True)
    for i, (h5ad, zarr) in enumerate(zip(paths("h5ad"), paths("zarr"), strict=True)):
        if h5ad.exists() and zarr.exists():
            continue
        print(f"writing {h5ad.name} and {zarr.name} ...", flush=True)
        adata = make(PER_FILE, seed=100 + i)
        adata.write_h5ad(h5ad)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_zarr(zarr)


def order(cells: int) -> np.ndarray:
    """The cells every tool reads, in the order the map-style tools read them."""
    return np.random.default_rng(0).permutation(N_FILES * PER_FILE)[:cells]


def expected_rows(rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Rows of X (dense) and their cell types, read with h5py from the h5ad files."""
    import h5py

    out = np.zeros((len(rows), 20_000), dtype=np.float32)
    labels = []
    for k, row in enumerate(rows):
        f, r = divmod(int(row), PER_FILE)
        with h5py.File(paths("h5ad")[f], "r") as h5:
            lo, hi = h5["X/indptr"][r:r + 2]
            out[k, h5["X/indices"][lo:hi]] = h5["X/data"][lo:hi]
            cats = h5[f"obs/{KEY}/categories"].asstr()[:]
            labels.append(str(cats[h5[f"obs/{KEY}/codes"][r]]))
    return out, labels


def first_batch_error(x: Any, y: Any, rows: Any, decode: dict[int, str]) -> str | None:
    """What is wrong with a first batch (X dense or torch CSR), against h5py; else None."""
    import torch

    dense = x.to_dense() if x.layout == torch.sparse_csr else x
    want_x, want_y = expected_rows(np.asarray(rows)[:32])
    if not np.array_equal(np.asarray(dense[:32], dtype=np.float32), want_x):
        return "the first batch's X differs from h5py's rows"
    if [decode[int(v)] for v in np.asarray(y[:32])] != want_y:
        return "the first batch's labels differ from h5py's"
    if x.dtype != torch.float32 or tuple(x.shape) != (len(rows), 20_000):
        return f"X is {x.dtype} {tuple(x.shape)}"
    return None


# -- memory -----------------------------------------------------------------------------


def pss_kb(pid: int) -> int:
    """Proportional set size of a process (``smaps_rollup``), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemoryWatch(threading.Thread):
    """Samples the PSS of this process and its children every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.base = pss_kb(os.getpid())
        self.main_peak = self.tree_peak = self.base
        self.workers: dict[int, list[int]] = {}  # pid -> [first, peak]
        self.done = threading.Event()

    def sample(self) -> None:
        main = pss_kb(os.getpid())
        tree = main
        for child in self.me.children(recursive=True):
            kb = pss_kb(child.pid)
            if kb:
                first_peak = self.workers.setdefault(child.pid, [kb, kb])
                first_peak[1] = max(first_peak[1], kb)
                tree += kb
        self.main_peak = max(self.main_peak, main)
        self.tree_peak = max(self.tree_peak, tree)

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.sample()

    def report(self) -> dict[str, float]:
        self.done.set()
        self.join()
        worker = max((peak - first for first, peak in self.workers.values()), default=0)
        return {"tree_peak_mb": (self.tree_peak - self.base) / 1024,
                "main_peak_mb": (self.main_peak - self.base) / 1024,
                "worker_peak_mb": worker / 1024}


# -- the tools ----------------------------------------------------------------------------


class BackedFiles:
    """The files in anndata's backed mode; ``[sorted global rows]`` reads them per file."""

    def __init__(self, files: list[Path], *, sparse: bool = False) -> None:
        import anndata as ad

        self.sparse = sparse
        self.adatas = [ad.read_h5ad(p, backed="r") for p in files]
        self.offsets = np.cumsum([0] + [a.n_obs for a in self.adatas])
        cats = sorted({c for a in self.adatas for c in a.obs[KEY].cat.categories})
        self.categories = np.array(cats)
        self.codes = [np.searchsorted(self.categories, a.obs[KEY].cat.categories)[
            a.obs[KEY].cat.codes.to_numpy()] for a in self.adatas]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        """X (dense, or CSR with ``sparse``), label codes and the rows, for sorted ``rows``."""
        import scipy.sparse as sp

        rows = np.asarray(rows)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        blocks, labels = [], []
        for f in np.unique(which):
            local = rows[which == f] - self.offsets[f]
            x = self.adatas[f].X[local]
            blocks.append(x if self.sparse else x.toarray())
            labels.append(self.codes[f][local])
        x = sp.vstack(blocks, format="csr") if self.sparse else np.vstack(blocks)
        return x.astype(np.float32), np.concatenate(labels), rows


def build(tool: str, fmt: str, workers: int, config: dict[str, Any]) -> tuple[Any, Any]:
    """The tool's dataset and a function giving its batches as (X, labels, rows or None)."""
    import torch
    from torch.utils.data import DataLoader

    cells = order(config["cells"])
    files: list[Any] = [str(p) for p in paths(fmt)]
    endpoint = config.get("endpoint")
    if endpoint:
        files = [f"s3://{BUCKET}/{Path(p).name}" for p in files]
    if tool in ("lamin_io", "lamindb"):
        if tool == "lamin_io":
            from lamin_io.loaders import MappedCollection, collate

            options = {"endpoint_url": endpoint} if endpoint else None
            ds = MappedCollection(files, obs_keys=[KEY], storage_options=options)
            extra: dict[str, Any] = {"collate_fn": collate}
        else:
            from lamindb.core import MappedCollection as LamindbMapped
            from upath import UPath

            if endpoint:  # what lamindb's collection.mapped(stream=True) hands over
                files = [UPath(f, endpoint_url=endpoint) for f in files]
            ds = LamindbMapped(files, obs_keys=[KEY])
            extra = {"worker_init_fn": ds.torch_worker_init_fn} if workers else {}
        decode = {v: k for k, v in ds.encoders[KEY].items()}

        def batches() -> Any:
            loader = DataLoader(ds, batch_size=BATCH, sampler=cells.tolist(),
                                num_workers=workers, **extra)
            for k, batch in enumerate(loader):
                yield batch["X"], batch[KEY], cells[k * BATCH:(k + 1) * BATCH], decode
        return ds, batches

    if tool == "lamin_io_block":
        from lamin_io.loaders import BlockLoader

        options = {"endpoint_url": endpoint} if endpoint else None
        block = BlockLoader(files, batch_size=BATCH, obs_keys=[KEY], num_workers=workers,
                            storage_options=options)
        decode = {v: k for k, v in block.dataset.encoders[KEY].items()}
        plan = block.batches(0)

        def batches() -> Any:
            for k, batch in enumerate(block):
                yield batch["X"], batch[KEY], plan[k], decode
                if (k + 1) * BATCH >= len(cells):
                    break
        return block, batches

    ds = BackedFiles([Path(p) for p in files])
    decode = dict(enumerate(ds.categories))
    if tool == "backed":
        def batches() -> Any:
            for k in range(0, len(cells), BATCH):
                rows = cells[k:k + BATCH]
                sort = np.argsort(rows)
                x, y, _ = ds[rows[sort]]
                back = np.empty_like(sort)
                back[sort] = np.arange(len(sort))
                yield torch.from_numpy(x[back]), torch.from_numpy(y[back]), rows, decode
        return ds, batches

    from scdataset import BlockShuffling, scDataset

    block, fetch = config["block"], config["fetch"]
    ds.sparse = config.get("sparse_fetch", False)  # (a fetch kept CSR, each batch made dense)
    data = scDataset(ds, BlockShuffling(block_size=block, indices=cells), batch_size=BATCH,
                     fetch_factor=fetch, seed=0, batch_callback=lambda d, i: (
                         d[0][i].toarray() if ds.sparse else d[0][i], d[1][i], d[2][i]))

    def batches() -> Any:
        loader = DataLoader(data, batch_size=None, num_workers=workers)
        for x, y, rows in loader:
            yield x, y, np.asarray(rows), decode
    return ds, batches


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; return its numbers."""
    import importlib

    import torch  # noqa: F401 (imported before the memory baseline: not setup)

    tool = config["tool"]
    for name in {"lamin_io": ["lamin_io.loaders", "anndata", "h5py", "zarr"],
                 "lamindb": ["lamindb"], "backed": ["anndata"],
                 "lamin_io_block": ["lamin_io.loaders", "anndata", "h5py", "zarr"],
                 "scdataset": ["anndata", "scdataset"]}[tool]:
        importlib.import_module(name)  # imports are not setup
    memory = MemoryWatch()
    memory.start()
    t0 = time.perf_counter()
    ds, batches = build(tool, config["fmt"], config["workers"], config)
    return measure(config, memory, time.perf_counter() - t0, ds, batches)


def measure(config: dict[str, Any], memory: MemoryWatch, setup: float, ds: Any,
            batches: Any, labels: list[str] | None = None) -> dict[str, Any]:
    """Time ``batches()`` over ``config["epochs"]`` epochs, the first batch checked first.

    The main process's memory after each epoch; the first epoch's labels (decoded) go to
    ``labels`` when given; ``ds`` is closed at the end.
    """
    epochs: list[float] = []
    seen = 0
    check = first = seconds = 0.0
    t0 = time.perf_counter()
    for epoch in range(config["epochs"]):
        if epoch and hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        for x, y, rows, decode in batches():
            if epoch == 0 and seen == 0:
                first = time.perf_counter() - t0
                c0 = time.perf_counter()
                wrong = first_batch_error(x, y, rows, decode)
                if wrong:
                    return {"error": wrong}
                check = time.perf_counter() - c0
            if epoch == 0:
                seen += len(rows)
                if labels is not None:
                    labels.extend(decode[int(v)] for v in np.asarray(y))
        if epoch == 0:
            seconds = time.perf_counter() - t0 - check
        memory.sample()
        epochs.append(pss_kb(os.getpid()) / 1024 - memory.base / 1024)
    result = {**config, "setup_s": setup, "first_batch_s": first, "seconds": seconds,
              "cells_read": seen, "cells_per_s": seen / seconds, **memory.report()}
    if config["epochs"] > 1:
        result["epoch_main_mb"] = epochs
    close = getattr(ds, "close", None)
    if close is not None:
        close()
    return result


# -- the run ------------------------------------------------------------------------------


def configs(tools: list[str], cells: int) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        if tool in ("lamin_io", "lamindb", "lamin_io_block"):
            for fmt in ("h5ad", "zarr"):
                for workers in (0, 2):
                    out.append({"tool": tool, "fmt": fmt, "workers": workers})
        elif tool == "backed":
            out.append({"tool": tool, "fmt": "h5ad", "workers": 0})
        else:
            for block, fetch in ((1, 16), (4, 64)):
                out.append({"tool": tool, "fmt": "h5ad", "workers": 0, "block": block,
                            "fetch": fetch})
    for c in out:
        c.update(cells=cells, epochs=1)
    return out


def s3_configs(tools: list[str], cells: int) -> list[dict[str, Any]]:
    return [{"tool": tool, "fmt": "h5ad", "workers": 0, "cells": cells, "epochs": 1,
             "storage": "s3+20ms"} for tool in ("lamin_io", "lamindb") if tool in tools]


def label(c: dict[str, Any]) -> str:
    name = c["tool"] + (f" block {c['block']}/fetch {c['fetch']}" if "block" in c else "")
    where = f" on {c['storage']}" if c.get("storage") else ""
    return f"{name}, {c['fmt']}{where}, {c['workers']} workers"


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians over the rounds, by configuration."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if "error" not in r and r["epochs"] == 1:
            groups.setdefault(label(r), []).append(r)
    keys = ("cells_per_s", "first_batch_s", "setup_s", "tree_peak_mb", "main_peak_mb",
            "worker_peak_mb", "requests", "mb_received")
    return {name: {**{k: median([r[k] for r in rs]) for k in keys if k in rs[0]},
                   "rounds": len(rs)}
            for name, rs in groups.items()}


def targets(s: dict[str, dict[str, Any]], epochs: list[dict[str, Any]],
            import_s: float) -> list[tuple[str, str, bool | None]]:
    def ratio(a: str, b: str) -> float | None:
        if a in s and b in s:
            return float(s[a]["cells_per_s"] / s[b]["cells_per_s"])
        return None

    rows: list[tuple[str, str, bool | None]] = []

    def add(name: str, value: float | None, goal: float) -> None:
        rows.append((name, "n/a" if value is None else f"{value:.2f}x (>= {goal:g}x)",
                     None if value is None else value >= goal))

    add("h5ad: lamin-io / lamindb MappedCollection", ratio(
        "lamin_io, h5ad, 0 workers", "lamindb, h5ad, 0 workers"), 15)
    add("h5ad: lamin-io / scDataset block 1", ratio(
        "lamin_io, h5ad, 0 workers", "scdataset block 1/fetch 16, h5ad, 0 workers"), 1.2)
    add("zarr: lamin-io / lamindb MappedCollection", ratio(
        "lamin_io, zarr, 0 workers", "lamindb, zarr, 0 workers"), 20)
    add("S3 + 20 ms a request: lamin-io / lamindb MappedCollection (stream=True)", ratio(
        "lamin_io, h5ad on s3+20ms, 0 workers", "lamindb, h5ad on s3+20ms, 0 workers"), 5)
    for fmt in ("h5ad", "zarr"):
        add(f"{fmt}: lamin-io 2 workers / 0 workers", ratio(
            f"lamin_io, {fmt}, 2 workers", f"lamin_io, {fmt}, 0 workers"), 1.0)
    for fmt in ("h5ad", "zarr"):  # (issue 23's targets are against annbatch, not run here)
        value = ratio(f"lamin_io_block, {fmt}, 0 workers", f"lamindb, {fmt}, 0 workers")
        if value is not None:
            rows.append((f"{fmt}: block loader / lamindb MappedCollection (informative)",
                         f"{value:.1f}x", None))
    main = s.get("lamin_io, h5ad, 0 workers")
    if main is not None:
        rows.append(("first batch (h5ad, 8 files)", f"{main['first_batch_s']:.3f} s (<= 0.15)",
                     main["first_batch_s"] <= 0.15))
        rows.append(("setup, warm, 8 files", f"{main['setup_s']:.3f} s (<= 0.3)",
                     main["setup_s"] <= 0.3))
        rows.append(("main-process peak at batch 256", f"+{main['main_peak_mb']:.0f} MB "
                     "(<= +150)", main["main_peak_mb"] <= 150))
    for e in epochs:
        if e.get("tool") == "lamin_io" and "epoch_main_mb" in e:
            mb = e["epoch_main_mb"]
            rows.append(("main process after each of 3 epochs",
                         ", ".join(f"+{v:.0f}" for v in mb) + " MB (flat, <= +150)",
                         max(mb) <= 150 and mb[-1] - mb[0] <= 25))
    rows.append(("import lamin_io.loaders", f"{import_s:.3f} s (<= 0.3)", import_s <= 0.3))
    return rows


def import_seconds() -> float:
    """``import lamin_io.loaders`` in a fresh interpreter (median of 5)."""
    import subprocess

    code = ("import time; t = time.perf_counter(); import lamin_io.loaders; "
            "print(time.perf_counter() - t)")
    return median([float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                        text=True, check=True).stdout) for _ in range(5)])


def report(results: list[dict[str, Any]], epochs: list[dict[str, Any]], import_s: float,
           out: Path) -> None:
    s = summarize(results)
    rows = targets(s, epochs, import_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps(
        {"machine": machine(), "results": results, "epochs": epochs, "medians": s,
         "import_loaders_s": import_s,
         "targets": [{"target": t, "value": v, "met": m} for t, v, m in rows]}, indent=1))
    base = {fmt: s.get(f"lamindb, {fmt}, 0 workers")
            for fmt in ("h5ad", "zarr", "h5ad on s3+20ms")}
    lines = [f"# Loader benchmark ({machine()['date']})", "",
             f"{N_FILES} files x {PER_FILE:,} cells x 20k genes (CSR float32, ~3%), random "
             f"order, batch {BATCH}, dense float32 X + an int label; "
             f"{results[0]['cells']:,} cells a configuration, medians over "
             f"{max(v['rounds'] for v in s.values())} rounds, each run in its own process. "
             "Memory is PSS above the process's level after its imports; a worker's is above "
             "its own first reading.", "",
             "| configuration | cells/s | x lamindb (same files, 0 workers) | first batch s "
             "| setup s | peak tree MB | peak main MB | peak worker MB | requests | MB in |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in s.items():
        ref = base.get(name.split(", ")[1])
        vs = f"{v['cells_per_s'] / ref['cells_per_s']:.1f}x" if ref else "-"
        remote = (f"{v['requests']:,.0f} | {v['mb_received']:,.1f}" if "requests" in v
                  else "- | -")
        lines.append(f"| {name} | {v['cells_per_s']:,.0f} | {vs} | {v['first_batch_s']:.3f} "
                     f"| {v['setup_s']:.3f} | {v['tree_peak_mb']:.0f} | "
                     f"{v['main_peak_mb']:.0f} | {v['worker_peak_mb']:.0f} | {remote} |")
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {label(r)}: {r['error']}" for r in failed]
    if epochs:
        lines += ["", "Main process memory after each of 3 epochs (MB above its level after "
                  "imports):", ""]
        lines += [f"- {label(e)}: " + (", ".join(f"+{v:.0f}" for v in e["epoch_main_mb"])
                                       if "epoch_main_mb" in e else e.get("error", "?"))
                  for e in epochs]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if m else 'no' if m is not None else '-'} |"
              for t, v, m in rows]
    (out / "loader.md").write_text("\n".join(lines) + "\n")
    chart(s, out / "loader.png")
    print("\n".join(lines))


def chart(s: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    colors = ["tab:blue" if n.startswith("lamin_io") else "tab:gray" for n in names]
    ax.barh(range(len(names)), [s[n]["cells_per_s"] for n in names], color=colors)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("cells/s (log), median over rounds")
    ax.set_title(f"Random batches of {BATCH} from {N_FILES} AnnData files into PyTorch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--no-epochs", action="store_true", help="skip the 3-epoch runs")
    parser.add_argument("--no-s3", action="store_true", help="local files only")
    parser.add_argument("--s3-cells", type=int, default=512,
                        help="cells read on S3 with 20 ms a request (default: 2 batches; "
                             "lamindb takes minutes a batch there)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    generate()
    todo = configs(args.tools, args.cells)
    server = None
    if not args.no_s3:
        from subset import S3

        server = S3(DATA / "s3rver", (0.02,)).__enter__()
        print("uploading the h5ad files to the S3 server ...", flush=True)
        server.upload(paths("h5ad"))
        todo += s3_configs(args.tools, args.s3_cells)
    results = []
    for round_ in range(args.rounds):
        for config in todo:
            proxy = None
            if config.get("storage"):
                proxy = server.proxies[0.02]  # type: ignore[union-attr]
                config["endpoint"] = proxy.endpoint
                proxy.reset()
            result = {**config, "round": round_,
                      **run_isolated(HERE, config, timeout=args.timeout)}
            if proxy is not None and "error" not in result:
                result["requests"] = proxy.requests
                result["mb_received"] = proxy.bytes_sent / 1e6
            results.append(result)
            brief = result.get("error") or f"{result['cells_per_s']:,.0f} cells/s"
            print(f"round {round_ + 1}: {label(config)}: {brief}", flush=True)
    epochs = []
    if not args.no_epochs:
        for tool in ("lamin_io", "lamindb"):
            if tool in args.tools:
                config = {"tool": tool, "fmt": "h5ad", "workers": 0, "cells": args.cells,
                          "epochs": 3}
                epochs.append({**config, **run_isolated(HERE, config, timeout=args.timeout)})
                print(f"3 epochs: {label(config)}: {epochs[-1].get('epoch_main_mb')}",
                      flush=True)
    if server is not None:
        server.__exit__(None, None, None)
    report(results, epochs, import_seconds(), args.out)


if __name__ == "__main__":
    main()
