"""Shared by the corruption tests: the five small artifacts, reading them, damaging them.

The artifacts: an AnnData as ``.h5ad`` and as ``.zarr`` (X in four chunks), a table as
``.parquet`` and ``.csv``, and the same AnnData as a ``.tiledbsoma`` experiment. Damage is
done to a stored object directly (a local path or an S3 object), never through lamin-io.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

FORMATS = {"h5ad": "x.h5ad", "zarr": "x.zarr", "parquet": "t.parquet", "csv": "t.csv",
           "tiledbsoma": "e.tiledbsoma"}
#: Per test: a read that takes longer than this is a hang (no timing is asserted below it).
LIMIT = 120.0


def anndata() -> Any:
    import anndata as ad

    rng = np.random.default_rng(0)
    x = rng.random((40, 12)).astype(np.float32)
    obs = pd.DataFrame({"g": pd.Categorical(rng.choice(list("abc"), 40)),
                        "n": rng.integers(0, 100, 40)}, index=[f"c{i}" for i in range(40)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(12)]))


def table() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"a": np.arange(50), "b": rng.random(50),
                         "s": [f"s{i}" for i in range(50)]})


def write_sources(folder: Path) -> dict[str, Path]:
    """Write the five artifacts into ``folder``; return their paths by format."""
    import tiledbsoma.io

    folder.mkdir(parents=True, exist_ok=True)
    adata = anndata()
    paths = {fmt: folder / name for fmt, name in FORMATS.items()}
    adata.write_h5ad(paths["h5ad"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (anndata: "zarr v2 will no longer be the default")
        adata.write_zarr(paths["zarr"], chunks=(10, 12))
    table().to_parquet(paths["parquet"], index=False)
    table().to_csv(paths["csv"], index=False)
    tiledbsoma.io.from_anndata(str(paths["tiledbsoma"]), adata, "RNA")
    return paths


def same(fmt: str, got: Any) -> bool:
    """Whether a loaded object equals what was written (tables, or X/obs/var of an AnnData)."""
    if fmt == "parquet":
        return isinstance(got, pd.DataFrame) and got.equals(table())
    if fmt == "csv":  # (as pandas reads back what it wrote: floats round-trip to 1 ulp)
        truth = pd.read_csv(io.StringIO(table().to_csv(index=False)))
        return isinstance(got, pd.DataFrame) and got.equals(truth)
    truth = anndata()
    try:
        x = got.X.toarray() if hasattr(got.X, "toarray") else np.asarray(got.X)
        if fmt == "tiledbsoma":  # (to_anndata gives its own index names and dtypes)
            return bool(np.array_equal(x, truth.X)
                        and list(got.obs["n"]) == list(truth.obs["n"])
                        and list(got.obs["g"].astype(str)) == list(truth.obs["g"].astype(str)))
        return bool(np.array_equal(x, truth.X) and got.obs.equals(truth.obs)
                    and got.var.equals(truth.var))
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


def read_opened(fmt: str, opened: Any) -> Any:
    """Read data through what ``open()`` returned (and close it); return it."""
    if fmt in ("h5ad", "zarr"):
        with opened as acc:
            return acc.to_memory()
    if fmt in ("parquet", "csv"):
        return opened.to_table().to_pandas()
    with opened as exp:
        return (exp.obs.read().concat().to_pandas(),
                exp.ms["RNA"].X["data"].read().tables().concat().to_pandas())


def within(fn: Callable[[], Any], limit: float = LIMIT) -> tuple[Any, BaseException | None]:
    """Run ``fn`` in a thread; fail the test if it does not finish within ``limit`` s.

    Returns ``(result, None)`` or ``(None, the exception)``.
    """
    import pytest

    out: list[Any] = [None, None]

    def run() -> None:
        try:
            out[0] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            out[1] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"the read did not finish within {limit:.0f} s (a hang)", pytrace=False)
    return out[0], out[1]


def text_of(exc: BaseException) -> str:
    """An error's message and notes: what a user sees."""
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


class Stored:
    """A stored object (file or folder, local or on S3), read and damaged directly."""

    def __init__(self, path: Any) -> None:
        self.fs = path.fs
        self.root = str(path.path).rstrip("/")
        self.local = path.protocol in ("", "file", "local")

    def _at(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def files(self) -> list[str]:
        """Relative paths of its files (``[""]`` for a file)."""
        if not self.fs.isdir(self.root):
            return [""]
        return sorted(f[len(self.root) + 1:] for f in self.fs.find(self.root))

    def match(self, *parts: str) -> str:
        """The one file whose relative path has all ``parts`` (a folder's)."""
        found = [f for f in self.files() if all(p in f for p in parts)]
        assert len(found) == 1, (parts, found)
        return found[0]

    def read(self, rel: str = "") -> bytes:
        return bytes(self.fs.cat_file(self._at(rel)))

    def write(self, rel: str, data: bytes, *, keep_state: bool = False) -> None:
        """Write a file's bytes; ``keep_state``: in place, with its size and time kept."""
        if not (keep_state and self.local):
            self.fs.pipe_file(self._at(rel), data)
            return
        target = self._at(rel)
        st = os.stat(target)
        assert len(data) == st.st_size
        with open(target, "r+b") as f:  # noqa: PTH123 (the same inode)
            f.write(data)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    def remove(self, rel: str = "") -> None:
        target = self._at(rel)
        if self.fs.isdir(target):
            self.fs.rm(target, recursive=True)
        else:
            self.fs.rm_file(target)

    def state(self) -> dict[str, str]:
        """Every stored file's SHA-256 by path (links as links): to tell nothing changed."""
        out = {}
        for rel in self.files():
            target = self._at(rel)
            if self.local and os.path.islink(target):
                out[rel] = f"link to {os.readlink(target)}"
            else:
                out[rel] = hashlib.sha256(self.read(rel)).hexdigest()
        return out
