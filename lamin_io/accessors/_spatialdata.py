"""SpatialData zarr stores: their tables as lazy AnnData accessors (no spatialdata needed)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from lamin_io.accessors._anndata import AnnDataAccessor, _Store
from lamin_io.accessors._attrs import attr
from lamin_io.accessors.readpath.zarr_store import open_zarr_group, zarr_root_attrs
from lamin_io.errors import CorruptArtifactError, NameNotFoundError, WriteNotSupportedError

if TYPE_CHECKING:
    from collections.abc import Callable

    from upath import UPath

__all__ = ["SpatialDataAccessor", "is_spatialdata", "open_spatialdata"]

_ELEMENT_GROUPS = ("images", "labels", "points", "shapes", "tables")


def _is_spatialdata_group(group: Any) -> bool:
    if attr(group, "spatialdata_attrs") is not None:
        return True
    keys = set(group.keys())
    return "tables" in keys and "obs" not in keys and bool(keys & set(_ELEMENT_GROUPS))


def is_spatialdata(path: UPath) -> bool:
    """Probe whether ``path`` is a SpatialData zarr store."""
    attrs = zarr_root_attrs(path)
    if attrs is not None and "spatialdata_attrs" in attrs:
        return True
    if attrs is not None and attrs.get("encoding-type") == "anndata":
        return False
    try:
        return _is_spatialdata_group(open_zarr_group(path, "r"))
    except CorruptArtifactError:
        return False


class _Tables(Mapping[str, AnnDataAccessor]):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def _names(self) -> list[str]:
        self._store.check()
        group = self._store.group
        return sorted(group["tables"].keys()) if "tables" in group else []

    def __getitem__(self, name: str) -> AnnDataAccessor:
        if name not in self._names():
            msg = f"no table {name!r}; tables: {', '.join(self._names()) or '(none)'}"
            raise NameNotFoundError(msg)
        return AnnDataAccessor(self._store, prefix=f"tables/{name}/")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class SpatialDataAccessor:
    """A SpatialData store: ``tables[name]`` are :class:`AnnDataAccessor` objects.

    Images, labels, points and shapes stay reachable as zarr groups via ``.storage``.
    Closing the accessor (or any of its tables) closes the store.
    """

    def __init__(self, store: _Store) -> None:
        self._store = store

    @property
    def tables(self) -> Mapping[str, AnnDataAccessor]:
        """The AnnData tables, opened lazily."""
        return _Tables(self._store)

    @property
    def storage(self) -> Any:
        """The root ``zarr.Group``."""
        return self._store.group

    def elements(self) -> dict[str, list[str]]:
        """Names of the stored elements per kind (images, labels, points, shapes, tables)."""
        group = self._store.group
        return {kind: sorted(group[kind].keys()) for kind in _ELEMENT_GROUPS if kind in group}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._store.closed

    def close(self) -> None:
        """Close the store."""
        self._store.close()

    def __enter__(self) -> SpatialDataAccessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"SpatialDataAccessor of {self._store.path} (closed)"
        parts = [f"{kind}: {', '.join(names)}" for kind, names in self.elements().items()]
        return f"SpatialDataAccessor of {self._store.path}\n    " + "\n    ".join(parts)


def open_spatialdata(path: UPath, *, mode: str = "r",
                     on_close: Callable[[], Any] | None = None) -> SpatialDataAccessor:
    """Open a SpatialData zarr store read-only (the format table's opener)."""
    if mode != "r":
        msg = f"SpatialData stores open read-only (mode 'r'), got {mode!r}"
        raise WriteNotSupportedError(msg)
    store = _Store(path)  # the format table opens .zarr folders only
    store.group  # noqa: B018 (opened now: a store that cannot be read fails here)
    return SpatialDataAccessor(store)
