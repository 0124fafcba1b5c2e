"""Seeded random mutants of stored artifacts: no silently wrong read (issue 25, item 1).

For each format, :data:`N` mutants (byte flips, zeroed ranges, truncations, appended bytes;
for folders also a deleted file, a file overwritten with another's bytes, a copy added
beside a file), each applied to the stored bytes of a saved artifact on local storage. Half
of the same-size mutants keep the file's size, modification time and inode (bit rot: only
a hash sees them). Reads through the record -- ``load()``, ``cache()``, and for h5ad, zarr
and parquet ``open()`` with a read where the state moved -- must give exactly what was
saved (the mutation changed nothing) or a lamin-io error: never other data, never a
library's own error. ``open()`` of a mutant that kept the state is the documented limit
(``open()`` checks the state, not the bytes: see test_corruption.py).

The same damaged bytes are also read by path, without a record: there no checksum can
tell every damage (a parquet page without page checksums, a csv), so wrong data is counted,
not refused; a library's own error or a crash is counted too. The reads run in a child
process (``_mutants.py``) with many mutants each: a native crash (h5py's ``SIGSEGV``) is
recorded against the mutant and read that caused it, and a new child goes on after it.
Set ``LAMIN_IO_MUTANT_REPORT`` to a file to get the figures as JSON.

Marked slow (1000 mutants, about two minutes on two cores): the default run leaves them
out, ``.ci/run`` runs them with the soak test.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _damage import FORMATS, write_sources

import lamin_io as ln

N = 200
SEED = 25
#: Seconds a child may stay silent before its current read counts as a hang.
SILENT = 120.0
HERE = Path(__file__).parent
REGISTERED = ("load", "cache", "open")


def _prepare(fmt: str, tmp_path: Path) -> Path:
    """Save the artifact; keep its pristine stored bytes and times for the children."""
    sources = write_sources(tmp_path / "sources")
    ln.connect(tmp_path / "r.db", tmp_path / "storage")
    key = f"m/{FORMATS[fmt]}"
    art = ln.Artifact(sources[fmt], key=key).save(mute=True)
    stored = Path(art.path.path)
    work = tmp_path / "work"
    (work / "pristine").mkdir(parents=True)
    (work / "reference").mkdir()
    copy = shutil.copytree if stored.is_dir() else shutil.copy2
    copy(stored, work / "pristine" / FORMATS[fmt])
    copy(stored, work / "reference" / FORMATS[fmt])
    files = [p for p in stored.rglob("*") if p.is_file()] if stored.is_dir() else [stored]
    times = {("" if p == stored else p.relative_to(stored).as_posix()): p.stat().st_mtime_ns
             for p in files}
    (work / "setup.json").write_text(json.dumps({
        "registry": str(tmp_path / "r.db"), "storage": str(tmp_path / "storage"),
        "key": key, "times": times}))
    ln.disconnect()
    return work


def _children(fmt: str, work: Path, n: int) -> dict[int, dict[str, Any]]:
    """Run the mutants in children, a new one after each crash or hang; their results."""
    results: dict[int, dict[str, Any]] = {}
    first = 0
    while first < n:
        log = work / f"stderr-{first}.txt"
        with log.open("w") as err:
            child = subprocess.Popen(
                [sys.executable, str(HERE / "_mutants.py"), fmt, str(work), str(SEED),
                 str(first), str(n)], stdout=subprocess.PIPE, stderr=err, text=True)
            lines: queue.Queue[str | None] = queue.Queue()

            def pump(out: Any = child.stdout, sink: queue.Queue[str | None] = lines) -> None:
                for line in out:
                    sink.put(line)
                sink.put(None)

            threading.Thread(target=pump, daemon=True).start()
            begun, reading, hung = None, None, False
            while True:
                try:
                    line = lines.get(timeout=SILENT)
                except queue.Empty:
                    child.kill()
                    hung = True
                    break
                if line is None:
                    break
                msg = json.loads(line)
                if "begin" in msg:
                    begun, reading = msg["begin"], None
                elif "reading" in msg:
                    reading = msg["reading"]
                else:
                    results[msg["i"]] = msg
                    begun = None
            code = child.wait()
        if begun is None:
            assert code == 0, log.read_text()[-3000:]
            break
        if hung:
            what = "hang"
        elif code < 0:
            what = f"crash:{signal.Signals(-code).name}"
        else:
            what = f"exit:{code}"
        results[begun] = {"i": begun, "reads": {reading or "setup": what},
                          "stderr": log.read_text()[-1000:]}
        first = begun + 1
    return results


def _tally(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    registered: Counter[str] = Counter()
    by_path: Counter[str] = Counter()
    for res in results.values():
        for read, outcome in res["reads"].items():
            head = outcome.split(":", 1)[0]
            (registered if read in REGISTERED else by_path)[head] += 1
    return {"mutants": len(results), "registered": dict(registered), "by_path": dict(by_path)}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mutants_never_read_wrong_through_the_record(fmt, tmp_path) -> None:
    work = _prepare(fmt, tmp_path)
    results = _children(fmt, work, N)
    assert sorted(results) == list(range(N))
    bad = {i: r for i, r in results.items()
           if any(read in REGISTERED and not (o == "exact" or o.startswith("typed:"))
                  for read, o in r["reads"].items())}
    figures = _tally(results)
    report = os.environ.get("LAMIN_IO_MUTANT_REPORT")
    if report:
        with open(report, "a") as f:  # noqa: PTH123
            f.write(json.dumps({"format": fmt, **figures, "cases": list(results.values())})
                    + "\n")
    assert not bad, (figures, list(bad.values())[:5])
    # every mutant that changed anything was refused: the typed errors say which
    assert figures["registered"].get("typed", 0) > 0
