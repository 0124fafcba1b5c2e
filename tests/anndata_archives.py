"""Files written by old anndata versions, from anndata's own sdist (not kept in this repo).

anndata keeps them in ``tests/data/archives/<version>/`` (``adata.h5ad``, and for 0.7 on
``adata.zarr.zip``) for its backwards-compatibility tests; its source distribution on PyPI
ships them. :func:`archives` downloads the sdist of the installed anndata with pip, once,
and unpacks the archives (zipped zarr stores unzipped beside them). Set
``LAMIN_IO_TEST_ANNDATA_ARCHIVES`` to a local copy of that ``archives`` folder to skip the
download (offline runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

ENV = "LAMIN_IO_TEST_ANNDATA_ARCHIVES"


def _unzip_stores(root: Path) -> None:
    for zipped in sorted(root.glob("*/adata.zarr.zip")):
        target = zipped.with_suffix("")  # adata.zarr
        if not target.exists():
            with zipfile.ZipFile(zipped) as z:
                z.extractall(target)


def archives(workdir: Path) -> Path:
    """The ``archives`` folder: ``<version>/adata.h5ad`` and ``<version>/adata.zarr``."""
    local = os.environ.get(ENV)
    if local:
        root = Path(local)
        if not any(root.glob("*/adata.h5ad")):
            msg = f"{ENV}={local} holds no <version>/adata.h5ad: point it at anndata's archives"
            raise RuntimeError(msg)
        copy = workdir / "archives"
        if not copy.exists():  # unzip beside a copy: the given folder stays as it is
            import shutil

            shutil.copytree(root, copy)
        _unzip_stores(copy)
        return copy
    wanted = f"anndata=={version('anndata')}"
    download = workdir / "sdist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--quiet", "-d", str(download), wanted],
        capture_output=True, text=True, check=False)
    sdists = sorted(download.glob("anndata-*.tar.gz"))
    if result.returncode != 0 or not sdists:
        msg = (f"could not download the sdist of {wanted} for its archive of old AnnData "
               f"files ({result.stderr.strip()[-500:]}); set {ENV} to a copy of anndata's "
               f"tests/data/archives folder to run offline")
        raise RuntimeError(msg)
    root = workdir / "archives"
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if "archives" in parts and member.isfile():
                rel = Path(*parts[parts.index("archives") + 1:])
                source = tar.extractfile(member)
                assert source is not None
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(source.read())
    _unzip_stores(root)
    return root


def scanpy_example() -> Path:
    """``10x_pbmc68k_reduced.h5ad`` from scanpy's wheel (written by anndata < 0.7)."""
    spec = find_spec("scanpy")
    if spec is None or not spec.submodule_search_locations:
        msg = "scanpy is not installed: pip install -e '.[test]'"
        raise RuntimeError(msg)
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / \
        "10x_pbmc68k_reduced.h5ad"
    if not path.is_file():
        msg = f"scanpy's example file is missing: {path}"
        raise RuntimeError(msg)
    return path
