"""The registry: records for storage roots, artifacts and collections, in SQL."""

from lamin_io.registry._artifact import Artifact, ArtifactSet
from lamin_io.registry._collection import Collection, CollectionSet
from lamin_io.registry._connection import Connection, connect, current, disconnect
from lamin_io.registry._gc import GcReport, gc
from lamin_io.registry._keys import RESERVED_PREFIX
from lamin_io.registry._soma import save_tiledbsoma_experiment

__all__ = [
    "RESERVED_PREFIX",
    "Artifact",
    "ArtifactSet",
    "Collection",
    "CollectionSet",
    "Connection",
    "GcReport",
    "connect",
    "current",
    "disconnect",
    "gc",
    "save_tiledbsoma_experiment",
]
