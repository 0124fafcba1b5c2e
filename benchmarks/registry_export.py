"""Registry export and import at 100k artifacts: wall time and peak memory.

A SQLite registry of ``--artifacts`` (100k) artifacts is built once by bulk inserts into
the schema (no bytes behind them: export and import never touch storage), with realistic
rows: families of one to three versions, a tenth of them ``.zarr`` folders with a 20-file
manifest, S3-style fingerprints, 2,000 collections of 25 members, 200 transforms, 5,000
runs with inputs, and a third of the artifacts saved by a run. Then, in ``--rounds``
rounds, each step runs in its own process:

* ``export``: ``export_registry`` of the source;
* ``import sqlite``: ``import_registry`` into a fresh SQLite file;
* ``import postgres``: the same into a fresh PostgreSQL database, when
  ``LAMIN_IO_TEST_POSTGRES`` or ``--postgres URL`` names a server.

Each step reports its wall time and its process's peak resident memory (the kernel's
high-water mark, ``VmHWM``), absolute and above the level after imports and ``connect``.
Results: ``benchmarks/results/registry_export.{json,md}`` (medians over the rounds).

    python benchmarks/registry_export.py                 # ~2-3 min on 2 cores
    python benchmarks/registry_export.py --artifacts 20000 --rounds 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _harness import RESULTS, Meter, PeakMemory, _status_kb, machine, median, run_isolated

HERE = Path(__file__).resolve()
WORK = HERE.parent / "data" / "registry-export"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
SUFFIXES = (".h5ad", ".parquet", ".csv", ".zarr")


def _uid(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(16))


def build(path: Path, storage: str, n: int, seed: int = 0) -> dict[str, int]:
    """Write a registry of ``n`` artifacts by bulk inserts; return its row counts."""
    import lamin_io as ln
    from lamin_io.registry import _schema as s

    rng = random.Random(seed)
    conn = ln.connect(path, storage)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    counts: dict[str, int] = {}
    with conn.db.write() as c:
        transforms = [{"id": i + 1, "uid": _uid(rng), "name": f"pipeline/step{i}.py",
                       "kind": "script", "version": hashlib.sha256(b"%d" % i).hexdigest()[:12],
                       "hash": hashlib.sha256(b"%d" % i).hexdigest(),
                       "reference": f"/home/me/pipeline/step{i}.py",
                       "created_at": start + timedelta(minutes=i)} for i in range(200)]
        c.execute(s.transform.insert(), transforms)
        runs = [{"id": i + 1, "uid": _uid(rng), "transform_id": rng.randint(1, 200),
                 "status": "completed", "started_at": start + timedelta(minutes=10 * i),
                 "finished_at": start + timedelta(minutes=10 * i + 3), "user": "me",
                 "host": "node-7", "params": json.dumps({"lr": 0.001, "seed": i}),
                 "error": None} for i in range(5000)]
        c.execute(s.run.insert(), runs)
        artifacts, i = [], 0
        while i < n:
            family, versions = _uid(rng), min(rng.choice((1, 1, 1, 2, 2, 3)), n - i)
            suffix = rng.choice(SUFFIXES)
            key = f"project{i % 97}/sample{i}{suffix}"
            for v in range(1, versions + 1):
                uid = family if v == 1 else _uid(rng)
                digest = hashlib.sha256(uid.encode()).hexdigest()
                folder = suffix == ".zarr"
                manifest = json.dumps([[f"X/c/{k}", 4096 + k, hashlib.sha256(
                    f"{uid}{k}".encode()).hexdigest()] for k in range(20)]) if folder else None
                artifacts.append({
                    "id": i + 1, "uid": uid, "key": key,
                    "description": f"sample {i} of batch {i % 13}" if i % 3 else None,
                    "suffix": suffix, "size": rng.randint(10**4, 10**10), "hash": digest,
                    "n_files": 20 if folder else None, "manifest": manifest,
                    "storage_id": conn.storage_id,
                    "storage_key": f".lamin-io/objects/{uid}{suffix}",
                    "managed": True, "status": "ready", "family_uid": family,
                    "version": str(v), "version_index": v, "is_latest": v == versions,
                    "fingerprint": json.dumps({"size": 1, "etag": f'"{digest[:32]}"'}),
                    "n_observations": rng.randint(100, 10**6) if suffix == ".h5ad" else None,
                    "created_at": start + timedelta(seconds=37 * i), "lease_until": None,
                    "run_id": rng.randint(1, 5000) if i % 3 == 0 else None})
                i += 1
        for part in range(0, len(artifacts), 20_000):
            c.execute(s.artifact.insert(), artifacts[part:part + 20_000])
        collections, links = [], []
        for k in range(2000):
            collections.append({
                "id": k + 1, "uid": _uid(rng), "key": f"atlas/part{k}", "description": None,
                "hash": hashlib.sha256(b"c%d" % k).hexdigest(), "status": "ready",
                "family_uid": _uid(rng), "version": "1", "version_index": 1, "is_latest": True,
                "created_at": start + timedelta(hours=k), "run_id": rng.randint(1, 5000)})
            members = rng.sample(range(1, len(artifacts) + 1), 25)
            links += [{"collection_id": k + 1, "position": p, "artifact_id": a}
                      for p, a in enumerate(members)]
        c.execute(s.collection.insert(), collections)
        c.execute(s.collection_artifact.insert(), links)
        inputs = {(rng.randint(1, 5000), rng.randint(1, len(artifacts))) for _ in range(10_000)}
        c.execute(s.run_input.insert(), [
            {"run_id": r, "artifact_id": a, "collection_id": None,
             "recorded_at": start + timedelta(minutes=10 * r)} for r, a in sorted(inputs)])
        counts = {"artifact": len(artifacts), "collection": len(collections),
                  "collection_artifact": len(links), "run": len(runs),
                  "run_input": len(inputs), "transform": len(transforms)}
    ln.disconnect()
    return counts


def worker(config: dict[str, Any]) -> None:
    """One step in this process: print its time and memory as a JSON line."""
    import pyarrow.parquet  # noqa: F401 (imports before the baseline, as a user's session)

    import lamin_io as ln

    ln.connect(config["registry"], config["storage"])
    with PeakMemory() as memory, Meter() as meter:
        if config["step"] == "export":
            report: Any = ln.export_registry(config["folder"], mute=True)
        else:
            report = ln.import_registry(config["folder"], mute=True)
    ln.disconnect()
    print(json.dumps({"seconds": meter.seconds, "peak_above_mb": memory.mb,
                      "peak_rss_mb": _status_kb("VmHWM") / 1024,
                      "rows": sum(report.rows.values()), "report": str(report)[:300]}))


def _postgres(base: str) -> tuple[str, Any]:
    """A fresh database on the server ``base``; and how to drop it."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"lamin_io_bench_{uuid.uuid4().hex[:10]}"
    url = make_url(base.replace("postgresql://", "postgresql+psycopg://", 1))
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url.set(database=name, drivername="postgresql").render_as_string(
        hide_password=False), drop


def _git_head() -> str:
    """The commit measured; ``+`` when the working tree had changes on top of it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                              cwd=HERE.parent).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "?") + (
        "+" if git("status", "--porcelain", "--untracked-files=no") else "")


def measure(n: int, rounds: int, postgres: str | None) -> dict[str, Any]:
    """Build a registry of ``n`` artifacts, then export and import it ``rounds`` times."""
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    storage = str(WORK / "storage")
    source = WORK / "source.db"
    with Meter() as built:
        counts = build(source, storage, n)
    print(f"built {counts} in {built.seconds:.1f} s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(rounds):
        folder = WORK / f"export{round_}"
        steps = [("export", str(source)), ("import sqlite", str(WORK / f"target{round_}.db"))]
        drop = None
        if postgres:
            url, drop = _postgres(postgres)
            steps.append(("import postgres", url))
        try:
            for step, registry in steps:
                result = run_isolated(HERE, {
                    "step": step.split()[0], "registry": registry, "storage": storage,
                    "folder": str(folder)})
                runs.setdefault(step, []).append(result)
                print(f"round {round_ + 1} {step}: {result}", flush=True)
        finally:
            if drop is not None:
                drop()
    out = {"counts": counts, "runs": runs, "build_seconds": built.seconds,
           "source_mb": source.stat().st_size / 1e6,
           "export_mb": sum(p.stat().st_size for p in (WORK / "export0").iterdir()) / 1e6}
    shutil.rmtree(WORK, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", default=os.environ.get("LAMIN_IO_TEST_POSTGRES"),
                        help="PostgreSQL server URL (default: $LAMIN_IO_TEST_POSTGRES)")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    os.environ["LAMIN_IO_DATA_DIR"] = str(WORK / "data")  # (no user settings touched)
    os.environ["LAMIN_IO_CONFIG_DIR"] = str(WORK / "config")
    main_run = measure(args.artifacts, args.rounds, args.postgres)
    # the same at a quarter of the size, once: what memory grows with
    small = measure(args.artifacts // 4, 1, None)
    report(main_run, small, args)


def _row(step: str, results: list[dict[str, Any]]) -> str:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return f"| {step} | error: {results[-1].get('error')} | | | 0 |"
    return (f"| {step} | {median([r['seconds'] for r in ok]):.1f} s | "
            f"{median([r['peak_rss_mb'] for r in ok]):.0f} MB | "
            f"+{median([r['peak_above_mb'] for r in ok]):.0f} MB | {len(ok)} |")


def report(main_run: dict[str, Any], small: dict[str, Any], args: Any) -> None:
    info = machine()
    counts = main_run["counts"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "registry_export.json").write_text(json.dumps(
        {"machine": info, "commit": _git_head(), "main": main_run, "quarter": small},
        indent=2, default=str))
    lines = [
        f"# Registry export and import ({info['date']}, at {_git_head()})",
        "",
        f"{counts['artifact']:,} artifacts, {counts['collection']:,} collections "
        f"({counts['collection_artifact']:,} member links), {counts['transform']:,} "
        f"transforms, {counts['run']:,} runs, {counts['run_input']:,} run inputs "
        f"({sum(counts.values()):,} rows); source SQLite {main_run['source_mb']:.0f} MB "
        f"(built in {main_run['build_seconds']:.0f} s by bulk inserts), export "
        f"{main_run['export_mb']:.1f} MB of parquet. {info['cores']} cores, {info['cpu']}; "
        f"Python {info['python']}. Each step in its own process; medians over "
        f"{args.rounds} round(s). Peak memory: the process's peak resident set (`VmHWM`), "
        f"and above its level after imports and `connect`.",
        "",
        "| step | wall time | peak RSS | peak above baseline | rounds |",
        "|---|---|---|---|---|",
        *(_row(step, results) for step, results in main_run["runs"].items()),
        "",
        f"At a quarter of the size ({small['counts']['artifact']:,} artifacts, "
        f"{sum(small['counts'].values()):,} rows, one round), what memory grows with:",
        "",
        "| step | wall time | peak RSS | peak above baseline | rounds |",
        "|---|---|---|---|---|",
        *(_row(step, results) for step, results in small["runs"].items()),
    ]
    if "import postgres" not in main_run["runs"]:
        lines += ["", "PostgreSQL: not run (set LAMIN_IO_TEST_POSTGRES or --postgres)."]
    lines += ["", "Tables are streamed in batches of 5,000 rows; what grows with the "
              "registry is one natural key (uid) per referenced row, kept to resolve "
              "foreign keys. Every import checks the export whole first (counts, "
              "checksums, references), loads it in one transaction and reads every table "
              "back to compare counts and checksums before committing; those checks are "
              "in the times."]
    (RESULTS / "registry_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
