"""What every benchmark here shares: one process per configuration, and honest meters.

* :func:`run_isolated` runs one configuration in a fresh Python process (imports, caches
  and memory of one tool never leak into another's numbers) and returns its JSON answer.
* :class:`Meter` measures one timed region from inside that process: wall time, the
  bytes the process read through system calls (``/proc/self/io``: ``rchar`` counts
  page-cache hits too, ``read_bytes`` only what came from the disk), and the machine's
  CPU ticks, from which :func:`steal` tells the share its host took for other guests
  (``/proc/stat``: a shared virtual machine's noise, which no repeat averages out when it
  lasts);
  :class:`PeakMemory` the peak resident memory above the level before the runs (the
  kernel's high-water mark, reset through ``/proc/self/clear_refs``).
* :func:`evict` drops files from the page cache (``posix_fadvise(DONTNEED)``, no root
  needed) for cold-cache runs; :func:`cached_fraction` checks that it worked.
* :func:`machine` describes the machine, Python and package versions for the report.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _cpu_ticks() -> tuple[int, int]:
    """The machine's stolen and total CPU ticks since boot (``/proc/stat``; 0, 0 without)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0, 0
    return ticks[7], sum(ticks)  # user nice system idle iowait irq softirq steal


@dataclass
class Meter:
    """Time, bytes read and the machine's CPU ticks, of the ``with`` block."""

    seconds: float = 0.0
    rchar: int = 0
    read_bytes: int = 0
    #: The machine's CPU ticks in the block: (stolen by the host, all); see :func:`steal`.
    ticks: tuple[int, int] = (0, 0)
    _t0: float = field(default=0.0, repr=False)
    _io0: dict[str, int] = field(default_factory=dict, repr=False)
    _ticks0: tuple[int, int] = field(default=(0, 0), repr=False)

    def __enter__(self) -> Meter:
        self._io0 = _io()
        self._ticks0 = _cpu_ticks()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        io = _io()
        self.rchar = io["rchar"] - self._io0["rchar"]
        self.read_bytes = io["read_bytes"] - self._io0["read_bytes"]
        now = _cpu_ticks()
        self.ticks = (now[0] - self._ticks0[0], now[1] - self._ticks0[1])


def steal(meters: list[Meter]) -> float:
    """The share of the machine's CPU time the host took for others during ``meters``.

    Summed over the blocks: a clock tick is 10 ms, too coarse for one short block.
    """
    total = sum(m.ticks[1] for m in meters)
    return sum(m.ticks[0] for m in meters) / total if total else 0.0


class PeakMemory:
    """Peak resident memory of the process above its level when the block started, in MB.

    Spans every run of a configuration (a run's freed memory often stays with the
    allocator, so a later run's own peak would be hidden): the baseline is the process
    after its imports and warm-up, as a user's session would be before the read.
    """

    def __init__(self) -> None:
        self.mb = 0.0
        self._rss0 = 0

    def __enter__(self) -> PeakMemory:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the kernel's peak-RSS high-water mark to the current RSS
        self._rss0 = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.mb = max(0, _status_kb("VmHWM") - self._rss0) / 1024


def files_of(path: Path) -> list[Path]:
    """The files of a file or folder."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Drop a file's (or a folder's files') pages from the page cache."""
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(path: Path) -> float:
    """Fraction of a file's (or folder's) bytes in the page cache, by ``mincore``."""
    import mmap

    total = resident = 0
    page = mmap.PAGESIZE
    for p in files_of(path):
        size = p.stat().st_size
        if size == 0:
            continue
        total += size
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              str(p)], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            resident += int(out.stdout.split()[0])
        else:  # no fincore: assume cached (the check then cannot pass by accident)
            resident += (size + page - 1) // page * page
    return resident / total if total else 0.0


def run_isolated(script: Path, config: dict[str, Any], *, timeout: float = 900,
                 python: str = sys.executable) -> dict[str, Any]:
    """Run ``script --worker CONFIG_JSON`` in a new process; return its last JSON line."""
    return run_json([python, str(script), "--worker", json.dumps(config)], timeout=timeout)


def run_json(command: list[str], *, timeout: float = 900) -> dict[str, Any]:
    """Run a command; return the JSON object of its last ``{`` line (or its error)."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def machine() -> dict[str, Any]:
    """The machine, Python and the versions of the packages that matter here."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for pkg in ("lamin-io", "lamindb", "anndata", "h5py", "zarr", "numpy", "scipy", "dask",
                "fsspec", "s3fs", "moto"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions}


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
