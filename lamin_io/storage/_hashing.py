"""Full-content SHA-256 of files and folders, computed while streaming.

A file's hash covers every byte. A folder's hash covers its sorted manifest of
``(relative path, size, sha256)`` lines, so two folders differing anywhere hash apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from lamin_io._faults import kill_point
from lamin_io.storage._progress import ProgressCallback

if TYPE_CHECKING:
    from upath import UPath

__all__ = ["BLOCK_SIZE", "Manifest", "folder_files", "hash_path", "hash_stream", "manifest_hash"]

BLOCK_SIZE = 8 * 2**20


@dataclass(frozen=True)
class Manifest:
    """The files of a folder: sorted ``(relative path, size, sha256)`` entries."""

    entries: tuple[tuple[str, int, str], ...]

    @property
    def size(self) -> int:
        """Total bytes of all files."""
        return sum(e[1] for e in self.entries)

    def to_json(self) -> list[list[object]]:
        """Return the entries as JSON-ready lists."""
        return [list(e) for e in self.entries]

    @classmethod
    def from_json(cls, data: list[list[object]]) -> Manifest:
        """Build a manifest from :meth:`to_json` output."""
        return cls(tuple((str(p), int(s), str(h)) for p, s, h in data))  # type: ignore[call-overload]


def hash_stream(f: BinaryIO, callback: ProgressCallback | None = None,
                sink: BinaryIO | None = None) -> tuple[str, int]:
    """Hash a binary stream block by block; optionally copy every block into ``sink``."""
    h = hashlib.sha256()
    n = 0
    while block := f.read(BLOCK_SIZE):
        h.update(block)
        if sink is not None:
            sink.write(block)
        n += len(block)
        if callback is not None:
            callback.relative_update(len(block))
    return h.hexdigest(), n


def manifest_hash(manifest: Manifest) -> str:
    """Return the SHA-256 of a folder manifest."""
    h = hashlib.sha256()
    for rel, size, digest in manifest.entries:
        h.update(f"{rel}\t{size}\t{digest}\n".encode())
    return h.hexdigest()


def folder_files(path: UPath) -> list[tuple[str, int]] | None:
    """Return the sorted ``(relative path, size)`` of every file below a folder.

    ``None`` when ``path`` is a file. These are the files a folder's manifest lists.
    """
    if not path.is_dir():
        return None
    root = path.path.rstrip("/")
    infos = path.fs.find(root, detail=True, withdirs=False)
    return sorted((name[len(root) + 1 :], int(info["size"])) for name, info in infos.items())


def hash_path(path: UPath, *, mute: bool = False) -> tuple[str, int, Manifest | None]:
    """Return ``(sha256, size, manifest)`` of a file (manifest ``None``) or a folder."""
    fs = path.fs
    root = path.path.rstrip("/")
    files = folder_files(path)
    if files is None:
        size = int(fs.info(root)["size"])
        with ProgressCallback(f"hashing {path.name}", mute=mute) as cb:
            cb.set_size(size)
            with fs.open(root, "rb", block_size=BLOCK_SIZE) as f:
                digest, n = hash_stream(f, cb)
        kill_point("hashing")
        return digest, n, None
    entries = []
    with ProgressCallback(f"hashing {path.name}", mute=mute) as cb:
        cb.set_size(sum(s for _, s in files))
        for rel, _ in files:
            with fs.open(f"{root}/{rel}", "rb", block_size=BLOCK_SIZE) as f:
                digest, n = hash_stream(f, cb)
            entries.append((rel, n, digest))
            kill_point("hashing")
    manifest = Manifest(tuple(entries))
    return manifest_hash(manifest), manifest.size, manifest
