"""Subset benchmark: "5% of cells by an obs category x 200 genes by name", side by side.

Every tool does the same work on the same file: open it, read the ``cell_type`` column,
select the cells of one category (~5%) and 200 genes given as a list of names in random
order, and materialize that X subset in memory. Tools:

* ``lamin_io``: ``lamin_io.open(path)[mask, genes].X``
* ``lamindb``: lamindb's ``backed_access(UPath(path))[mask, genes].X``
* ``backed``: ``anndata.read_h5ad(path, backed="r")[mask, genes].X`` (h5ad, local only)
* ``read_lazy``: ``anndata.experimental.read_lazy(...)[mask, genes].X.compute()``
* ``full``: load the whole file with anndata, then subset

Each configuration (tool x file x storage x cache) runs in its own process; imports and a
warm-up on a tiny file stay outside the timings. Configurations run in rounds (``--rounds``,
2 by default): all of them one after the other, then all again, each time in a fresh
process with a share of the repeats, so a slow spell of this shared machine falls on every
tool rather than on the one that happened to be running. Every output is checked against the
answer of a full anndata load (computed once per file, in its own process) before its time
counts. Cold runs drop the file from the page cache before each repeat (and check that it
is gone); warm runs read it once first. On S3 the files live on a local S3-protocol server
(s3rver, see :class:`S3`) behind a counting proxy in this process; bytes read are the
response bodies it passed on, locally the bytes the process read through system calls
(``rchar``) and, beside them, the bytes the disk read for it (``read_bytes``: whole pages
and the read-ahead it asked for, which cold runs of lamin-io rely on).
S3 runs are made twice by default: straight to the loopback server, which answers in well
under a millisecond (so they measure its CPU and ours), and with 20 ms added before every
request, as from a bucket in another place, where round trips decide (``--s3-delay``).

    python benchmarks/generate.py --cells 50000 --scale 1 4    # once
    python benchmarks/subset.py                                # all configurations
    python benchmarks/subset.py --files zarr --tools lamin_io full  # a part of them

Results: ``benchmarks/results/subset.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import (  # noqa: E402
    RESULTS,
    Meter,
    PeakMemory,
    cached_fraction,
    evict,
    machine,
    median,
    run_isolated,
    steal,
)

HERE = Path(__file__).resolve()
DATA = HERE.parent / "data"
CATEGORY = "type_7"
N_GENES = 200
TOOLS = ("lamin_io", "lamindb", "backed", "read_lazy", "full")
#: ``h5ad-4x-same``: the 4x file, with every 4th cell of the category selected, as many
#: cells as the 5% of the base file (a selection of the same size in a larger file);
#: ``h5ad-gzip``: the base file in gzip-compressed chunks; ``dense-zarr``: a dense X
#: written by anndata's ``write_zarr`` with its defaults.
FILES = ("h5ad", "h5ad-4x", "h5ad-4x-same", "zarr", "dense", "h5ad-gzip", "dense-zarr")
#: The tools a target compares lamin-io with, where they can read the file.
PEERS = ("lamindb", "backed", "read_lazy", "full")
BUCKET = "bench"


def genes() -> list[str]:
    """200 gene names in random order (fixed seed), as a user would pass them."""
    rng = np.random.default_rng(42)
    return [f"GENE{i}" for i in rng.choice(20_000, N_GENES, replace=False)]


# -- the work each tool does -----------------------------------------------------------------

def _mask(obs: Any, every: int = 1) -> np.ndarray:
    return _thin(np.asarray(obs["cell_type"] == CATEGORY), every)


def _thin(mask: np.ndarray, every: int) -> np.ndarray:
    """Keep every ``every``-th selected cell (all with 1), spread over the whole file."""
    if every == 1:
        return mask
    out = np.zeros_like(mask)
    out[np.flatnonzero(mask)[::every]] = True
    return out


def _zarr_group(url: str, endpoint: str | None) -> Any:
    import zarr

    if endpoint is None:
        return zarr.open_group(url, mode="r")
    from zarr.storage import FsspecStore

    store = FsspecStore.from_url(url, storage_options={"endpoint_url": endpoint},
                                 read_only=True)
    return zarr.open_group(store, mode="r")


def run_lamin_io(url: str, endpoint: str | None, names: list[str], every: int = 1) -> Any:
    import lamin_io

    options = {"endpoint_url": endpoint} if endpoint else None
    with lamin_io.open(url, storage_options=options) as adata:
        return adata[_mask(adata.obs, every), names].X


def run_lamindb(url: str, endpoint: str | None, names: list[str], every: int = 1) -> Any:
    from lamindb.core.storage._backed_access import backed_access
    from upath import UPath

    path = UPath(url, endpoint_url=endpoint) if endpoint else UPath(url)
    adata = backed_access(path)
    try:
        return adata[_mask(adata.obs, every), names].X
    finally:
        adata.close()


def run_backed(url: str, endpoint: str | None, names: list[str], every: int = 1) -> Any:
    import anndata as ad

    if endpoint is not None or not url.endswith(".h5ad"):
        msg = "anndata's backed mode reads local h5ad files only"
        raise NotImplementedError(msg)
    adata = ad.read_h5ad(url, backed="r")
    try:
        return adata[_mask(adata.obs, every), names].X
    finally:
        adata.file.close()


def run_read_lazy(url: str, endpoint: str | None, names: list[str], every: int = 1) -> Any:
    import anndata as ad
    import h5py

    if url.endswith(".zarr"):
        lazy = ad.experimental.read_lazy(_zarr_group(url, endpoint))
    elif endpoint is not None:
        msg = "read_lazy re-opens an h5ad by its file name, so it reads local h5ad only"
        raise NotImplementedError(msg)
    else:
        lazy = ad.experimental.read_lazy(h5py.File(url, "r"))
    mask = _thin(np.asarray(lazy.obs["cell_type"].to_numpy() == CATEGORY), every)
    x = lazy[mask, names].X
    return x.compute() if hasattr(x, "compute") else x


def run_full(url: str, endpoint: str | None, names: list[str], every: int = 1) -> Any:
    import anndata as ad

    if url.endswith(".zarr"):
        adata = ad.read_zarr(_zarr_group(url, endpoint).store if endpoint else url)
    elif endpoint:  # download the object in one request, then read it from memory
        import io

        import fsspec

        data = fsspec.filesystem("s3", endpoint_url=endpoint).cat_file(url)
        adata = ad.read_h5ad(io.BytesIO(data))
    else:
        adata = ad.read_h5ad(url)
    return adata[_mask(adata.obs, every), names].X


RUNNERS = {"lamin_io": run_lamin_io, "lamindb": run_lamindb, "backed": run_backed,
           "read_lazy": run_read_lazy, "full": run_full}


def _normalize(x: Any) -> Any:
    import scipy.sparse as sp

    if sp.issparse(x):
        x = sp.csr_matrix(x)
        x.sort_indices()
        return x
    return np.asarray(x)


def _same(x: Any, expected: Any) -> bool:
    import scipy.sparse as sp

    x = _normalize(x)
    if x.shape != expected.shape:
        return False
    if sp.issparse(x) or sp.issparse(expected):
        a = x.toarray() if sp.issparse(x) else x
        b = expected.toarray() if sp.issparse(expected) else expected
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(x, expected))


# -- one configuration, in its own process ---------------------------------------------------

def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration; return its measurements (or an error)."""
    import scipy.sparse as sp

    warnings.simplefilter("ignore")
    run = RUNNERS[config["tool"]]
    names = genes()
    endpoint = config.get("endpoint")
    local = Path(config["local"])
    try:
        # imports and first-call set-up (an S3 client, thread pools) on a tiny file of the
        # same storage, untimed
        run(config["tiny"], endpoint, names[:5])
    except NotImplementedError as exc:
        return {"error": f"unsupported: {exc}"}
    saved = np.load(config["expected"], allow_pickle=False)
    expected: Any = (sp.csr_matrix((saved["data"], saved["indices"], saved["indptr"]),
                                   shape=tuple(saved["shape"]))
                     if "indptr" in saved else saved["dense"])
    meters, cached = [], []
    with PeakMemory() as peak:
        every = config["every"]
        if config["cache"] == "warm" and not _same(run(config["url"], endpoint, names, every),
                                                   expected):
            return {"error": "wrong result"}
        for _ in range(config["repeats"]):
            if config["cache"] == "cold":
                evict(local)
                cached.append(cached_fraction(local))
            with Meter() as meter:
                out = run(config["url"], endpoint, names, every)
            if not _same(out, expected):
                return {"error": "wrong result"}
            meters.append(meter)
            del out
    return {
        "seconds": median([m.seconds for m in meters]),
        "all_seconds": [round(m.seconds, 4) for m in meters],
        "peak_mb": peak.mb,
        "rchar": int(median([m.rchar for m in meters])),
        "read_bytes": int(median([m.read_bytes for m in meters])),
        "steal": steal(meters),
        "cached_before": max(cached) if cached else None,
    }


def write_expected(path: Path, out: Path, every: int) -> None:
    """The reference answer: anndata's full load, then the subset."""
    import scipy.sparse as sp

    warnings.simplefilter("ignore")
    x = _normalize(run_full(str(path), None, genes(), every))
    if sp.issparse(x):
        np.savez(out, data=x.data, indices=x.indices, indptr=x.indptr, shape=x.shape)
    else:
        np.savez(out, dense=x)


# -- the driver ------------------------------------------------------------------------------

def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tiny_for(path: Path) -> Path:
    """The tiny file of the same format and layout, read once untimed to warm up."""
    dense = path.name.startswith("dense")
    if path.suffix == ".zarr":
        return DATA / ("tiny_dense.zarr" if dense else "tiny.zarr")
    if path.name.endswith("_gzip.h5ad"):
        return DATA / "tiny_gzip.h5ad"
    return DATA / ("tiny_dense.h5ad" if dense else "tiny.h5ad")


def _storage(delay: float) -> str:
    """The storage label of S3 behind a proxy adding ``delay`` seconds a request."""
    return "s3" if not delay else f"s3+{delay * 1000:.0f}ms"


class Entry(NamedTuple):
    """A file and the selection made in it, under the label the results give it."""

    kind: str  # one of FILES
    label: str
    path: Path
    every: int = 1  # every ``every``-th cell of the category (see ``_thin``)

    def fields(self) -> dict[str, Any]:
        """What every configuration of this entry says of it."""
        return {"kind": self.kind, "file": self.label, "local": str(self.path),
                "every": self.every}


def _configs(entries: list[Entry], *, s3: bool, repeats: int,
             delays: list[float]) -> list[dict[str, Any]]:
    """Every (file, storage, cache, tool); cold and remote runs repeat fewer times (5 of 7:
    the median of 3 remote runs moved ratios by 10% and more between runs)."""
    out = []
    for entry in entries:
        path = entry.path
        for cache in ("warm", "cold"):
            for tool in TOOLS:
                if tool == "backed" and path.suffix != ".h5ad":
                    continue
                out.append({"tool": tool, "storage": "local", "cache": cache, "url": str(path),
                            "repeats": repeats if cache == "warm" else max(1, repeats - 2),
                            **entry.fields()})
    for delay in delays if s3 else []:
        for entry in entries:
            for tool in TOOLS:
                if tool == "backed":
                    continue
                out.append({"tool": tool, "storage": _storage(delay), "cache": "remote",
                            "url": f"s3://{BUCKET}/{entry.path.name}", "delay": delay,
                            "repeats": max(1, repeats - 2), **entry.fields()})
    return out


S3RVER = HERE.parent / "node_modules" / ".bin" / "s3rver"


class S3:
    """s3rver (a Node.js S3 server storing objects as files) behind a counting proxy.

    moto, which the tests use, copies a whole object to answer each range request, so it
    cannot serve the benchmark's files; s3rver streams ranges from disk. Install it with
    ``npm install --prefix benchmarks s3rver@3.7.1``.
    """

    def __init__(self, folder: Path, delays: tuple[float, ...] = (0.0,)) -> None:
        self.folder = folder
        self.delays = delays
        self.proc: Any = None
        self.proxies: dict[float, Any] = {}

    def __enter__(self) -> S3:
        import os
        import shutil
        import socket
        import subprocess
        import time

        from _proxy import CountingProxy

        if not S3RVER.exists():
            sys.exit(f"no {S3RVER}: npm install --prefix benchmarks s3rver@3.7.1 "
                     f"(or run with --no-s3)")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        # s3rver 3.7 makes listing tokens with a cipher OpenSSL 3 keeps in its legacy
        # provider (without it, listings fail with "internal error")
        env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
        self.proc = subprocess.Popen(
            [str(S3RVER), "-d", str(self.folder), "-a", "127.0.0.1", "-p", str(port),
             "--silent", "--allow-mismatched-signatures", "--no-vhost-buckets",
             "--configure-bucket", BUCKET], env=env)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ[name] = "S3RVER"
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.server_endpoint = f"http://127.0.0.1:{port}"
        # one counting proxy per latency: 0 (loopback) and, like a bucket in another
        # place, a fixed delay before every request is passed on
        self.proxies = {d: CountingProxy("127.0.0.1", port, delay=d).start()
                        for d in self.delays}
        return self

    def upload(self, paths: list[Path]) -> None:
        """Copy files and folders into the bucket (straight to the server, uncounted)."""
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=self.server_endpoint,
                               skip_instance_cache=True)
        for p in paths:
            fs.put(str(p), f"{BUCKET}/{p.name}", recursive=p.is_dir())

    def __exit__(self, *exc: object) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def main() -> None:
    """Run every configuration and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--expected", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--dense-cells", type=int, default=8_000)
    parser.add_argument("--dense-zarr-cells", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per warm configuration (cold: 2 fewer, S3: 2 fewer)")
    parser.add_argument("--no-s3", action="store_true", help="local files only")
    parser.add_argument("--s3-delay", type=float, nargs="+", default=[0.0, 0.02],
                        help="S3 runs with each of these latencies a request, in seconds "
                             "(default: none, and 20 ms as from a bucket far away)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--files", nargs="+", default=list(FILES), choices=FILES,
                        help="which files (default: all)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run every configuration this many times, each in a fresh "
                             "process, a round of all of them after the other, its repeats "
                             "shared among them (a slow spell of the machine then falls on "
                             "every tool, not on one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a configuration may take before it counts as failed")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.expected:
        write_expected(Path(args.expected[0]), Path(args.expected[1]), int(args.expected[2]))
        return

    base = DATA / f"sparse_{args.cells}.h5ad"
    large = DATA / f"sparse_{4 * args.cells}.h5ad"
    zarr_file = DATA / f"sparse_{args.cells}.zarr"
    dense = DATA / f"dense_{args.dense_cells}.h5ad"
    gzip = DATA / f"sparse_{args.cells}_gzip.h5ad"
    dense_zarr = DATA / f"dense_{args.dense_zarr_cells}.zarr"
    entries = [entry for entry in [
        Entry("h5ad", base.name, base), Entry("h5ad-4x", large.name, large),
        Entry("h5ad-4x-same", f"{large.name} (1 in 4)", large, 4),
        Entry("zarr", zarr_file.name, zarr_file), Entry("dense", dense.name, dense),
        Entry("h5ad-gzip", gzip.name, gzip), Entry("dense-zarr", dense_zarr.name, dense_zarr)]
        if entry.kind in args.files]
    paths = sorted({entry.path for entry in entries})
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run benchmarks/generate.py first")

    expected = {}
    for entry in entries:
        suffix = "" if entry.every == 1 else f"_every{entry.every}"
        expected[entry.label] = DATA / f"expected_{entry.path.name}{suffix}.npz"
        if not expected[entry.label].exists():
            print(f"reference answer for {entry.label} ...", flush=True)
            import subprocess

            subprocess.run([sys.executable, str(HERE), "--expected", str(entry.path),
                            str(expected[entry.label]), str(entry.every)], check=True)

    server = None
    if not args.no_s3:
        server = S3(DATA / "s3rver", tuple(args.s3_delay)).__enter__()
        print("uploading to the S3 server ...", flush=True)
        server.upload(paths + sorted({_tiny_for(p) for p in paths}))
    configs = [config for config in _configs(entries, s3=not args.no_s3,
                                              repeats=args.repeats, delays=args.s3_delay)
               if config["tool"] in args.tools]
    rounds: list[list[dict[str, Any]]] = [[] for _ in configs]  # results, by configuration
    try:
        for round_ in range(args.rounds):
            print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
            for config, done in zip(configs, rounds, strict=True):
                repeats = _share(config["repeats"], args.rounds, round_)
                if repeats and not any("error" in result for result in done):
                    done.append(_run(dict(config, repeats=repeats), server, expected,
                                     args.timeout))
                    partial = args.out / "subset.partial.json"
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_text(json.dumps([_merge(d) for d in rounds if d], indent=1,
                                                  default=float))
    finally:
        if server is not None:
            server.__exit__()
    report([_merge(done) for done in rounds if done], args.out)


def _share(repeats: int, rounds: int, round_: int) -> int:
    """The repeats of a configuration that round ``round_`` runs (earlier rounds one more)."""
    return repeats // rounds + (round_ < repeats % rounds)


def _merge(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's result from its rounds: the times pooled, the peak the highest.

    A round that failed stands for the configuration.
    """
    failed = next((result for result in done if "error" in result), None)
    if failed is not None:
        return failed
    weights = [len(result["all_seconds"]) for result in done]
    out = dict(done[0])
    out["all_seconds"] = [t for result in done for t in result["all_seconds"]]
    out["seconds"] = median(out["all_seconds"])
    out["peak_mb"] = max(result["peak_mb"] for result in done)
    for key in ("rchar", "read_bytes", "bytes", "requests", "steal"):
        if key in out:
            mean = sum(r[key] * w for r, w in zip(done, weights, strict=True)) / sum(weights)
            out[key] = mean if key == "steal" else int(mean)
    cached = [result["cached_before"] for result in done
              if result.get("cached_before") is not None]
    out["cached_before"] = max(cached) if cached else None
    out["rounds"] = len(done)
    return out


def _run(config: dict[str, Any], server: S3 | None, expected: dict[str, Path],
         timeout: float) -> dict[str, Any]:
    """Run one configuration in its own process; return its result."""
    config["expected"] = str(expected[config["file"]])
    tiny = _tiny_for(Path(config["local"]))
    config["tiny"] = str(tiny) if config["storage"] == "local" else \
        f"s3://{BUCKET}/{tiny.name}"
    proxy = None
    if config["cache"] == "remote":
        proxy = server.proxies[config["delay"]]  # type: ignore[union-attr]
        config["endpoint"] = proxy.endpoint
        proxy.reset()
    label = f"{config['file']:<22} {config['storage']:<8} {config['cache']:<6} " \
            f"{config['tool']:<9}"
    print(label, end=" ", flush=True)
    result = run_isolated(HERE, config, timeout=timeout)
    if proxy is not None and "error" not in result:
        result["bytes"] = proxy.bytes_sent // config["repeats"]
        result["requests"] = proxy.requests // config["repeats"]
        del result["read_bytes"]  # the server's disk, not the tool's: not a figure of its own
    elif "error" not in result:
        result["bytes"] = result["rchar"]
    result.update({k: config[k] for k in ("tool", "kind", "file", "storage", "cache")})
    result["file_bytes"] = _size(Path(config["local"]))
    disk = (f" ({result['read_bytes'] / 1e6:.1f} MB from disk)" if "read_bytes" in result
            else "")
    print(result.get("error") or
          f"{result['seconds']:.3f} s  {result['peak_mb']:.0f} MB  "
          f"{result['bytes'] / 1e6:.1f} MB read{disk}  steal {100 * result['steal']:.0f}%",
          flush=True)
    return result


# -- the report ------------------------------------------------------------------------------

def _ratios(results: list[dict[str, Any]]) -> None:
    """Add time, memory and bytes ratios to lamindb, full load and anndata's backed mode."""
    groups: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["file"], r["storage"], r["cache"]), {})[r["tool"]] = r
    for tools in groups.values():
        for r in tools.values():
            if "error" in r:
                continue
            for ref, suffix in (("lamindb", "vs_lamindb"), ("full", "vs_full"),
                                ("backed", "vs_backed")):
                base = tools.get(ref)
                if base is None or "error" in base:
                    continue
                r[f"time_{suffix}"] = r["seconds"] / base["seconds"]
                r[f"memory_{suffix}"] = (r["peak_mb"] + 1) / (base["peak_mb"] + 1)
                r[f"bytes_{suffix}"] = r["bytes"] / max(1, base["bytes"])
                if r["cache"] == "cold":  # warm runs read next to nothing from the disk
                    r[f"disk_{suffix}"] = r["read_bytes"] / max(1, base["read_bytes"])


def _targets(results: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """The issues' targets, each with the measured figure and whether it is met.

    ``None`` for rows that only report (informative).
    """
    def get(tool: str, kind: str, storage: str, cache: str) -> dict[str, Any] | None:
        """The run of ``tool`` on the file of ``kind`` (see ``FILES``), if it succeeded."""
        return next((r for r in results if (r["tool"], r.get("kind"), r["storage"],
                                            r["cache"]) == (tool, kind, storage, cache)
                     and "error" not in r), None)

    rows: list[tuple[str, str, bool | None]] = []
    remote = sorted({r["storage"] for r in results if r["cache"] == "remote"},
                    key=lambda s: (len(s), s))  # "s3" first, then with latency
    for storage, cache in [("local", "warm"), ("local", "cold"),
                           *((s, "remote") for s in remote)]:
        where = (f"{storage} {cache}" if storage == "local" else
                 "S3" if storage == "s3" else f"S3 +{storage[3:]} a request")
        ratios = []
        for kind in ("h5ad", "h5ad-4x"):
            r = get("lamin_io", kind, storage, cache)
            if r is None or "time_vs_lamindb" not in r:
                continue
            ratios.append(r["time_vs_lamindb"])
            rows.append((f"sparse h5ad {r['file'][7:-5]} cells, {where}: time <= 0.5x "
                         f"lamindb, peak <= +60 MB",
                         f"{r['time_vs_lamindb']:.3f}x, +{r['peak_mb']:.0f} MB",
                         r["time_vs_lamindb"] <= 0.5 and r["peak_mb"] <= 60))
        if len(ratios) == 2:
            # by more than the runs' noise: a 5% lower ratio
            rows.append((f"sparse h5ad, {where}: ratio improves (by 5%+) at 4x the cells",
                         f"{ratios[0]:.3f}x -> {ratios[1]:.3f}x",
                         ratios[1] < 0.95 * ratios[0]))
        r = get("lamin_io", "h5ad-4x-same", storage, cache) if ratios else None
        if r is not None and "time_vs_lamindb" in r:
            # the same number of cells (every 4th of the category) in the 4x file
            rows.append((f"sparse h5ad, {where}: ratio improves (by 5%+) at 4x the cells, "
                         f"as many cells selected (informative)",
                         f"{ratios[0]:.3f}x -> {r['time_vs_lamindb']:.3f}x, "
                         f"+{r['peak_mb']:.0f} MB",
                         r["time_vs_lamindb"] < 0.95 * ratios[0]))
        z = get("lamin_io", "zarr", storage, cache)
        if z is not None and "time_vs_full" in z:
            rows.append((f"sparse zarr, {where}: time <= 1x full load, memory <= 25%",
                         f"{z['time_vs_full']:.3f}x, {z['memory_vs_full']:.1%}",
                         z["time_vs_full"] <= 1 and z["memory_vs_full"] <= 0.25))
        d = get("lamin_io", "dense", storage, cache)
        if d is not None and "time_vs_backed" in d:
            rows.append((f"dense h5ad, {where}: time <= anndata backed",
                         f"{d['time_vs_backed']:.3f}x", d["time_vs_backed"] <= 1))
        elif d is not None and cache == "remote":
            rows.append((f"dense h5ad, {where}: supported (anndata backed cannot read S3)",
                         f"{d['seconds']:.3f} s, {d.get('time_vs_lamindb', float('nan')):.3f}x"
                         " lamindb", True))
        d = get("lamin_io", "dense-zarr", storage, cache)
        peers = [p for p in (get(t, "dense-zarr", storage, cache) for t in PEERS) if p]
        if d is not None and peers:
            fastest = min(peers, key=lambda p: p["seconds"])
            rows.append((f"dense zarr, {where}: time <= the fastest peer's",
                         f"{d['seconds'] / fastest['seconds']:.3f}x {fastest['tool']}",
                         d["seconds"] <= fastest["seconds"]))
        g = get("lamin_io", "h5ad-gzip", storage, cache)
        if g is not None:
            vs = [f"{g[f'time_vs_{p}']:.3f}x {p}" for p in ("lamindb", "backed", "full")
                  if f"time_vs_{p}" in g]
            rows.append((f"gzip-compressed sparse h5ad, {where} (informative)",
                         ", ".join(vs) + f", +{g['peak_mb']:.0f} MB", None))
    return rows


def _ratio(r: dict[str, Any], key: str, *, missing: str = "n/a") -> str:
    """A ratio for the table: ``missing`` where the tool compared with did not run."""
    return f"{r[key]:.3f}" if key in r else missing


def report(results: list[dict[str, Any]], out: Path) -> None:
    """Write ``subset.json``, ``subset.md`` and ``subset.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _ratios(results)
    targets = _targets(results)
    info = machine()
    payload = {"benchmark": "subset: 5% of cells by category x 200 genes by name",
               "machine": info, "results": results,
               "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets]}
    (out / "subset.json").write_text(json.dumps(payload, indent=1, default=float))

    lines = [
        "# Subset benchmark: 5% of cells by an obs category x 200 genes by name",
        "",
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; "
        f"Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v),
        "",
        "Each row is one configuration, run in a fresh process in each of the rounds (all "
        "configurations one after the other, then again), its repeats shared among them. "
        "Time: median of all its repeats; peak: resident memory above the level before the "
        "read, the highest of the rounds; read: bytes through system calls (local: "
        "`rchar`, page-cache hits included) or sent by the S3 server; disk: bytes the "
        "process had the disk read (local: `read_bytes`, including the read-ahead it asked "
        "the kernel for; near 0 warm; n/a on S3); steal: the share of the machine's CPU time "
        "its host gave to other guests during the timed runs (this is a shared virtual "
        "machine: where it is above a few percent, that row's time is noise; other guests' "
        "use of the host's disk does not show there). Ratios are to lamindb's "
        "`backed_access` and to anndata's `backed=\"r\"` mode in the same file, storage and "
        "cache state (lower is better; n/a where that tool did not run, as anndata's backed "
        "mode reads local h5ad files only, and nan where it failed). "
        "Generated by `benchmarks/subset.py`.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {m} | {'-' if ok is None else 'yes' if ok else 'no'} |"
          for t, m, ok in targets],
        "",
        "## All runs",
        "",
        "| file | storage | cache | tool | time s | x lamindb | x backed | peak MB "
        "| x lamindb | read MB | x lamindb | disk MB | x lamindb | steal % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # groups where a tool ran (so a missing ratio says it failed: nan), by file and place
    ran = {(r["file"], r["storage"], r["cache"], r["tool"]) for r in results}
    for r in results:
        head = f"| {r['file']} | {r['storage']} | {r['cache']} | {r['tool']} "
        if "error" in r:
            lines.append(head + f"| {r['error'][:80]} |" + " |" * 9)
            continue
        # a missing ratio: "nan" where the tool compared with failed, "n/a" where it
        # cannot read this file at all
        nan, na = ("nan" if (r["file"], r["storage"], r["cache"], ref) in ran else "n/a"
                   for ref in ("lamindb", "backed"))
        cells = [f"{r['seconds']:.3f}", _ratio(r, "time_vs_lamindb", missing=nan),
                 _ratio(r, "time_vs_backed", missing=na), f"{r['peak_mb']:.0f}",
                 _ratio(r, "memory_vs_lamindb", missing=nan), f"{r['bytes'] / 1e6:.1f}",
                 _ratio(r, "bytes_vs_lamindb", missing=nan)]
        if "read_bytes" in r:
            cells += [f"{r['read_bytes'] / 1e6:.1f}",
                      _ratio(r, "disk_vs_lamindb", missing=nan if r["cache"] == "cold" else "-")]
        else:
            cells += ["n/a", "n/a"]
        cells.append(f"{100 * r.get('steal', float('nan')):.0f}")
        lines.append(head + "| " + " | ".join(cells) + " |")
    (out / "subset.md").write_text("\n".join(lines) + "\n")
    _chart(results, out / "subset.png")
    (out / "subset.partial.json").unlink(missing_ok=True)
    print(f"wrote {out / 'subset.md'}")


def _chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # groups with a ratio to lamindb (it fails on the dense file: no bar to draw)
    groups = sorted({(r["file"], r["storage"], r["cache"]) for r in results
                     if "time_vs_lamindb" in r})
    tools = [t for t in TOOLS if any(r["tool"] == t for r in results)]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups)), 5))
    width = 0.8 / max(1, len(tools))
    for i, tool in enumerate(tools):
        xs, ys = [], []
        for j, g in enumerate(groups):
            r = next((r for r in results if (r["file"], r["storage"], r["cache"]) == g
                      and r["tool"] == tool and "time_vs_lamindb" in r), None)
            if r is not None:
                xs.append(j + i * width)
                ys.append(r["time_vs_lamindb"])
        ax.bar(xs, ys, width, label=tool)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("time / lamindb time (log)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{f.replace(' (', chr(10) + '(')}\n{s} {c}" for f, s, c in groups],
                       fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("5% of cells by category x 200 genes: time relative to lamindb")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
