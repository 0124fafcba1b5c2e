"""Seeded random mutants of a stored artifact, read in a child process (run as a script).

``python _mutants.py <format> <workdir> <seed> <first> <count>`` restores the stored object
from ``<workdir>/pristine``, applies mutant ``i`` (``first <= i < count``), reads the
artifact through its record and the damaged copy by path, and prints one JSON line per
mutant (``{"i": ..., "mutation": ..., "reads": {read: outcome}}``), after a
``{"begin": i}`` line: a parent that sees a begun mutant without its line knows which
one crashed the child, and starts a new child after it.

Outcomes: ``exact`` (what was written came back: the mutation changed nothing that
matters), ``typed:<error>`` (a lamin-io error), ``wrong`` (other data, no error: a
silently wrong read), ``raw:<error>`` (a library's own error), and, added by the parent,
``crash:<signal>`` and ``hang``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    from _damage import Stored

#: The registered reads of every mutant; ``open`` (with a read through the accessor) is
#: added for these formats where the mutation moved the stored state (see the README).
OPENED = ("h5ad", "zarr", "parquet")
KINDS = ("flip", "zero", "truncate", "append")
FOLDER_KINDS = ("delete", "duplicate", "add")


def mutate(stored: Stored, rng: np.random.Generator, *, local: bool) -> dict[str, Any]:
    """Apply one random mutation to a stored object; return what it did."""
    files = stored.files()
    folder = files != [""]
    kinds = KINDS + FOLDER_KINDS if folder else KINDS
    kind = str(rng.choice(kinds))
    rel = str(rng.choice(files))
    data = bytearray(stored.read(rel))
    keep = bool(local and kind in ("flip", "zero") and data and rng.random() < 0.5)
    done: dict[str, Any] = {"kind": kind, "file": rel, "size": len(data), "keep_state": keep}
    if kind == "flip" and data:
        at = rng.integers(0, len(data), int(rng.integers(1, 9)))
        for a in at:
            data[int(a)] ^= int(rng.integers(1, 256))
        done["at"] = sorted(int(a) for a in at)
    elif kind == "zero" and data:
        start = int(rng.integers(0, len(data)))
        end = min(len(data), start + int(rng.integers(1, 513)))
        data[start:end] = bytes(end - start)
        done["range"] = [start, end]
    elif kind == "truncate" and data:
        data = data[: int(rng.integers(0, len(data)))]
        done["to"] = len(data)
    elif kind == "append" or not data:
        data += rng.bytes(int(rng.integers(1, 65)))
        done["kind"] = "append"
    elif kind == "delete":
        stored.remove(rel)
        return done
    elif kind == "duplicate":  # another file's bytes over this one
        other = str(rng.choice(files))
        stored.write(rel, stored.read(other))
        done["from"] = other
        return done
    else:  # "add": a copy of this file under a new name beside it
        name = f"{rel}.{int(rng.integers(1e6))}"  # (beside it, in its folder)
        stored.write(name, bytes(data))
        done["added"] = name
        return done
    stored.write(rel, bytes(data), keep_state=keep)
    return done


def _outcome(fn: Callable[[], Any], exact: Callable[[Any], bool]) -> str:
    from lamin_io.errors import LaminIOError

    try:
        got = fn()
    except LaminIOError as exc:
        return f"typed:{type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 (the point: which ones escape)
        return f"raw:{type(exc).__name__}: {str(exc)[:160]}"
    return "exact" if exact(got) else "wrong"


def equal(a: Any, b: Any) -> bool:
    """Whether two reads gave the same data (AnnData, DataFrames, tuples of them)."""
    import pandas as pd

    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame):
        return bool(a.equals(b))
    if hasattr(a, "X") and hasattr(b, "X"):
        def dense(x: Any) -> np.ndarray:
            return x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        try:
            return bool(np.array_equal(dense(a.X), dense(b.X)) and a.obs.equals(b.obs)
                        and a.var.equals(b.var) and list(a.obsm) == list(b.obsm)
                        and list(a.layers) == list(b.layers) and list(a.uns) == list(b.uns))
        except (TypeError, ValueError):
            return False
    return False


def _digest(path: Any) -> str:
    from lamin_io.storage import hash_path, to_upath

    return hash_path(to_upath(path), mute=True)[0]


def _by_path(fmt: str, path: Path) -> dict[str, Callable[[], Any]]:
    """Reads of a file by path (no record): the format's loader, and open() with a read."""
    from _damage import read_opened

    import lamin_io as ln
    from lamin_io.accessors import format_for
    from lamin_io.storage import suffix_of, to_upath

    def load() -> Any:
        upath = to_upath(path)
        return format_for(suffix_of(upath.name), upath).resolve("load")(upath)

    def opened() -> Any:
        return read_opened(fmt, ln.open(path))

    return {"path load": load, "path open": opened}


def restore(stored: Stored, pristine: Path, times: dict[str, int]) -> None:
    """Put the stored object back as it was saved: bytes, modification times, no extras."""
    if stored.files() == [""] or not Path(stored.root).is_dir():
        keep = {""}
    else:
        keep = {p.relative_to(pristine).as_posix() for p in pristine.rglob("*") if p.is_file()}
        for rel in stored.files():
            if rel not in keep:
                stored.remove(rel)
    for rel in keep:
        source = pristine / rel if rel else pristine
        target = Path(stored.root) / rel if rel else Path(stored.root)
        data = source.read_bytes()
        if target.exists():
            with target.open("r+b") as f:  # the same inode
                f.write(data)
                f.truncate()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        os.utime(target, ns=(times[rel], times[rel]))


def main(fmt: str, work: Path, seed: int, first: int, count: int) -> None:
    from _damage import FORMATS, Stored, read_opened, same

    import lamin_io as ln

    warnings.simplefilter("ignore")
    setup = json.loads((work / "setup.json").read_text())
    ln.connect(setup["registry"], setup["storage"])
    art = ln.Artifact.get(key=setup["key"])
    stored = Stored(art.path)
    times = {k: int(v) for k, v in setup["times"].items()}
    reference = {name: fn() for name, fn in _by_path(fmt, work / "reference" /
                                                        FORMATS[fmt]).items()}
    for i in range(first, count):
        restore(stored, work / "pristine" / FORMATS[fmt], times)
        cache = work / f"cache-{i}"  # the first read after the damage (see check_stored)
        os.environ["LAMIN_IO_CACHE_DIR"] = str(cache)
        rng = np.random.default_rng([seed, list(FORMATS).index(fmt), i])
        mutation = mutate(stored, rng, local=stored.local)
        print(json.dumps({"begin": i}), flush=True)
        reads: dict[str, str] = {}

        def read(name: str, fn: Callable[[], Any], exact: Callable[[Any], bool],
                 reads: dict[str, str] = reads) -> None:
            print(json.dumps({"reading": name}), flush=True)  # (names a crash's read)
            reads[name] = _outcome(fn, exact)

        read("load", lambda: art.load(mute=True), lambda got: same(fmt, got))
        read("cache", lambda: art.cache(mute=True), lambda got: _digest(got) == art.hash)
        if fmt in OPENED and not mutation["keep_state"]:
            read("open", lambda: read_opened(fmt, art.open()), lambda got: same(fmt, got))
        copy = work / f"path-{i}" / FORMATS[fmt]  # the damaged bytes, by path
        if Path(stored.root).is_dir():
            shutil.copytree(stored.root, copy)
        elif Path(stored.root).exists():
            copy.parent.mkdir(parents=True)
            shutil.copyfile(stored.root, copy)
        if copy.exists():
            for name, fn in _by_path(fmt, copy).items():
                read(name, fn, lambda got, name=name: equal(got, reference[name]))
        shutil.rmtree(copy.parent, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        digest = hashlib.sha256(json.dumps(mutation, sort_keys=True).encode()).hexdigest()[:8]
        print(json.dumps({"i": i, "mutation": mutation, "id": digest, "reads": reads}),
              flush=True)
    restore(stored, work / "pristine" / FORMATS[fmt], times)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
