"""The registry: records for storage roots, artifacts and collections, in SQL."""

from lamin_io.registry._artifact import Artifact, ArtifactSet
from lamin_io.registry._collection import Collection, CollectionSet
from lamin_io.registry._connection import Connection, connect, current, disconnect
from lamin_io.registry._export import ExportReport, export_registry
from lamin_io.registry._gc import GcReport, gc
from lamin_io.registry._import import ImportReport, import_registry
from lamin_io.registry._keys import RESERVED_PREFIX
from lamin_io.registry._run import Run, RunSet, Transform, TransformSet, active_run, finish, track
from lamin_io.registry._soma import save_tiledbsoma_experiment

__all__ = [
    "RESERVED_PREFIX",
    "Artifact",
    "ArtifactSet",
    "Collection",
    "CollectionSet",
    "Connection",
    "ExportReport",
    "GcReport",
    "ImportReport",
    "Run",
    "RunSet",
    "Transform",
    "TransformSet",
    "active_run",
    "connect",
    "current",
    "disconnect",
    "export_registry",
    "finish",
    "gc",
    "import_registry",
    "save_tiledbsoma_experiment",
    "track",
]
