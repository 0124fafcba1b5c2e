"""Importing lamin-io stays light: heavy libraries are imported only where they are used.

Each check runs in a fresh interpreter. ``.ci/run`` also runs this file as a script, before
the tests (``python tests/test_import.py``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Libraries no import of the package or of its subpackages may bring in.
HEAVY = ("anndata", "zarr", "h5py", "pandas", "polars", "tiledbsoma", "torch")
#: ``import ...`` -> what must not be imported after it. The registry builds its schema
#: (SQLAlchemy tables) on import, so importing ``lamin_io.registry`` imports sqlalchemy;
#: ``lamin_io`` and the layers below the registry do not.
CHECKS = {
    "lamin_io": (*HEAVY, "sqlalchemy"),
    "lamin_io.storage, lamin_io.accessors, lamin_io.loaders": (*HEAVY, "sqlalchemy"),
    "lamin_io, lamin_io.accessors, lamin_io.storage, lamin_io.registry": HEAVY,
}


def imported_after(imports: str, names: tuple[str, ...]) -> list[str]:
    """Return which of ``names`` a fresh interpreter holds after ``import <imports>``."""
    code = (f"import sys\nimport {imports}\n"
            f"print(' '.join(n for n in {names!r} if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        msg = f"import {imports} failed:\n{done.stderr}"
        raise RuntimeError(msg)
    return done.stdout.split()


@pytest.mark.parametrize("imports", list(CHECKS))
def test_import_stays_light(imports: str) -> None:
    assert imported_after(imports, CHECKS[imports]) == []


if __name__ == "__main__":
    heavy = {imports: imported_after(imports, names) for imports, names in CHECKS.items()}
    for imports, found in heavy.items():
        if found:
            print(f"import {imports} imports {', '.join(found)}", file=sys.stderr)
    sys.exit(1 if any(heavy.values()) else 0)
