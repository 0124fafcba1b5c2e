"""Registry keys: validation and the reserved prefix.

A key is a relative POSIX path such as ``"project/pbmc.h5ad"``. lamin-io keeps its own
objects (managed uploads, in-flight temporaries) under :data:`RESERVED_PREFIX` inside each
storage root; user keys may not start with it.
"""

from __future__ import annotations

from lamin_io.errors import CorruptRegistryError, InvalidKeyError
from lamin_io.storage import suffix_of

__all__ = ["RESERVED_PREFIX", "check_storage_key", "object_key", "validate_key"]

#: Prefix inside every storage root that lamin-io keeps for itself.
RESERVED_PREFIX = ".lamin-io"


def validate_key(key: str, *, suffix: str | None) -> str:
    """Return ``key`` if it is safe, else raise :class:`InvalidKeyError`.

    ``suffix`` is the file's suffix the key must end with (``None`` skips that check, as for
    collections).
    """
    if not isinstance(key, str) or not key.strip():
        msg = f"key must be a non-empty string, got {key!r}"
        raise InvalidKeyError(msg)
    problems = _path_problems(key)
    if problems:
        msg = (f"unsafe key {key!r}: {'; '.join(problems)}; "
               f"use a relative path like 'project/file.h5ad'")
        raise InvalidKeyError(msg)
    parts = key.split("/")
    if parts[0] == RESERVED_PREFIX:
        msg = f"key {key!r} lies under the reserved prefix {RESERVED_PREFIX!r}: choose another"
        raise InvalidKeyError(msg)
    if suffix is not None:
        key_suffix = suffix_of(key)
        if key_suffix.lower() != suffix.lower():
            expected = repr(suffix) if suffix else "no suffix"
            msg = (f"key {key!r} has suffix {key_suffix!r} but the file has {expected}: "
                   f"the key must end in {suffix or 'no suffix'}")
            raise InvalidKeyError(msg)
    return key


def _path_problems(key: str) -> list[str]:
    """Return why ``key`` is not a plain relative POSIX path inside a root (empty: it is)."""
    problems = []
    if key != key.strip():
        problems.append("leading or trailing whitespace")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        problems.append("it is absolute")
    if "\\" in key:
        problems.append("it contains a backslash (use '/')")
    if "\x00" in key:
        problems.append("it contains a NUL byte")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts):
        problems.append("it contains a '.' or '..' component")
    if any(p == "" for p in parts[1:-1]) or key.endswith("/") and len(key) > 1:
        problems.append("it contains an empty component ('//' or trailing '/')")
    if "://" in key:
        problems.append("it looks like a URL")
    return problems


def check_storage_key(storage_key: object, *, what: str) -> str:
    """Return a storage key read back from the registry, if it stays inside its root.

    Registry rows are checked like user keys before anything touches storage: a row edited
    outside lamin-io (``../``, an absolute path, a URL) must never make a read, ``delete``
    or ``gc`` reach outside the storage root.

    Raises
    ------
    CorruptRegistryError
        The key is not a plain relative path.
    """
    text = storage_key if isinstance(storage_key, str) else ""
    problems = _path_problems(text) if text.strip() else ["it is empty"]
    if problems:
        msg = (f"{what}: the registry holds the storage key {storage_key!r}, which would "
               f"reach outside the storage root ({'; '.join(problems)}); nothing in storage "
               f"was touched. The registry was edited outside lamin-io: repair or remove "
               f"that row")
        raise CorruptRegistryError(msg)
    return text


def object_key(uid: str, suffix: str) -> str:
    """Return the storage key of a managed upload, unique per artifact uid."""
    return f"{RESERVED_PREFIX}/objects/{uid}{suffix}"
