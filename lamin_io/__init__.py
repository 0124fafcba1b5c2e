"""lamin-io: register scientific files once, open them lazily, stream them into training.

>>> import lamin_io as ln                                                  # doctest: +SKIP
>>> ln.connect()                     # embedded SQLite registry + local storage, no set-up
>>> artifact = ln.Artifact("pbmc.h5ad", key="pbmc/raw.h5ad").save()
>>> ln.Artifact.get(key="pbmc/raw.h5ad").load()

Heavy modules (SQLAlchemy, anndata, pandas, s3fs) are imported on first use, so
``import lamin_io`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lamin_io import errors

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactSet",
    "Collection",
    "Run",
    "Transform",
    "__version__",
    "connect",
    "disconnect",
    "errors",
    "export_registry",
    "finish",
    "gc",
    "import_registry",
    "open",
    "probe",
    "save_tiledbsoma_experiment",
    "track",
]

_LAZY = {
    "Artifact": "lamin_io.registry",
    "ArtifactSet": "lamin_io.registry",
    "Collection": "lamin_io.registry",
    "Run": "lamin_io.registry",
    "Transform": "lamin_io.registry",
    "finish": "lamin_io.registry",
    "track": "lamin_io.registry",
    "connect": "lamin_io.registry",
    "disconnect": "lamin_io.registry",
    "export_registry": "lamin_io.registry",
    "gc": "lamin_io.registry",
    "import_registry": "lamin_io.registry",
    "open": "lamin_io.accessors",
    "probe": "lamin_io.accessors",
    "save_tiledbsoma_experiment": "lamin_io.registry",
}

if TYPE_CHECKING:
    from lamin_io.accessors import open, probe
    from lamin_io.registry import (
        Artifact,
        ArtifactSet,
        Collection,
        Run,
        Transform,
        connect,
        disconnect,
        export_registry,
        finish,
        gc,
        import_registry,
        save_tiledbsoma_experiment,
        track,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'lamin_io' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
