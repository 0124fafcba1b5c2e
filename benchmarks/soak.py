"""Soak report: memory and open handles over time while 4 processes read and 2 save.

Runs ``tests/reliability/test_soak.py`` (the same workload CI checks for errors, wrong
bytes and leaks) for ``--seconds`` and renders what its processes sampled into
``results/soak.md``: per role, resident memory and open file handles at the start, the
middle and the end, and the operations done.

    python benchmarks/soak.py --seconds 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from _harness import machine

HERE = Path(__file__).resolve().parent


def _at(samples: list[list[float]], fraction: float) -> list[float]:
    return samples[min(int(len(samples) * fraction), len(samples) - 1)]


def render(results: list[dict[str, Any]], seconds: float) -> str:
    """Return the Markdown report of one soak run."""
    lines = [f"# Soak: {seconds:g} s, 4 readers and 2 savers on the loopback S3 server", "",
             "| process | operations | errors | wrong reads | RSS start / middle / end (MB) "
             "| open handles start / middle / end | Python objects start / middle / end |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["role"], r["worker"])):
        s = r["samples"]
        if not s:
            continue
        rss = " / ".join(f"{_at(s, f)[1]:.0f}" for f in (0, 0.5, 1))
        fds = " / ".join(f"{_at(s, f)[2]}" for f in (0, 0.5, 1))
        objects = " / ".join(f"{_at(s, f)[3]:,}" for f in (0, 0.5, 1))
        lines.append(f"| {r['role']} {r['worker']} | {r['ops']} | {len(r['errors'])} | "
                     f"{r['wrong']} | {rss} | {fds} | {objects} |")
    growth = [s[-1][1] - _at(s, 0.25)[1] for r in results if (s := r["samples"])]
    lines += ["", f"Median RSS growth from a quarter of the run to its end: "
              f"{median(growth):+.1f} MB a process.", "", "```", json.dumps(machine()), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the soak test for ``--seconds`` and write ``results/soak.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "soak.json"
        env = dict(os.environ, LAMIN_IO_SOAK_SECONDS=str(args.seconds),
                   LAMIN_IO_SOAK_REPORT=str(report))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p",
                        "no:cacheprovider", str(HERE.parent / "tests/reliability/test_soak.py")],
                       env=env, check=True, cwd=HERE.parent)
        results = json.loads(report.read_text())
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "soak.json").write_text(json.dumps(results))
    (HERE / "results" / "soak.md").write_text(render(results, args.seconds))
    print((HERE / "results" / "soak.md").read_text())


if __name__ == "__main__":
    main()
