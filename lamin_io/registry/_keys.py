"""Registry keys: validation and the reserved prefix.

A key is a relative POSIX path such as ``"project/pbmc.h5ad"``. lamin-io keeps its own
objects (managed uploads, in-flight temporaries) under :data:`RESERVED_PREFIX` inside each
storage root; user keys may not start with it.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from lamin_io.errors import CorruptRegistryError, InvalidKeyError
from lamin_io.storage import suffix_of

__all__ = ["RESERVED_PREFIX", "check_key_length", "check_storage_key", "object_key",
           "validate_key"]

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
    first = unicodedata.normalize("NFKC", key.split("/")[0]).casefold()
    if first == RESERVED_PREFIX:  # (also in another case: some filesystems ignore it)
        msg = f"key {key!r} lies under the reserved prefix {RESERVED_PREFIX!r}: choose another"
        raise InvalidKeyError(msg)
    check_key_length(key, "")
    if suffix is not None:
        key_suffix = suffix_of(key)
        if key_suffix.lower() != suffix.lower():
            expected = repr(suffix) if suffix else "no suffix"
            msg = (f"key {key!r} has suffix {key_suffix!r} but the file has {expected}: "
                   f"the key must end in {suffix or 'no suffix'}")
            raise InvalidKeyError(msg)
    return key


#: S3's limit on an object key, in UTF-8 bytes.
S3_KEY_BYTES = 1024
#: What a key adds to the storage prefix in the longest object key lamin-io writes for it:
#: ``/.lamin-io/objects/<16-character uid>`` plus room for a temporary upload's name.
_OBJECT_KEY_OVERHEAD = len(f"/{RESERVED_PREFIX}/objects/") + 16 + 64
_URL_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def _decoded(key: str) -> list[str]:
    """Return ``key`` percent-decoded once, twice, ... while that changes it (at most 4x)."""
    out = []
    for _ in range(4):
        if not _URL_ESCAPE.search(key):
            break
        key = unquote(key, errors="replace")
        out.append(key)
    return out


def _plain_problems(key: str) -> list[str]:
    problems = []
    if key != key.strip():
        problems.append("leading or trailing whitespace")
    if key.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", key):
        problems.append("it is absolute (a root, a drive letter or a UNC path)")
    if "\\" in key:
        problems.append("it contains a backslash (use '/')")
    controls = sorted({c for c in key if unicodedata.category(c) in ("Cc", "Cf", "Cs")})
    if controls:
        shown = ", ".join(f"U+{ord(c):04X}" for c in controls[:4])
        problems.append(f"it contains control or invisible characters ({shown})")
    parts = key.split("/")
    if any(p and set(p) == {"."} for p in parts):
        problems.append("it contains a '.' or '..' component")
    if parts[0] == "~":
        problems.append("it starts with '~' (a home directory)")
    if any(p == "" for p in parts[1:-1]) or key.endswith("/") and len(key) > 1:
        problems.append("it contains an empty component ('//' or trailing '/')")
    if "://" in key:
        problems.append("it looks like a URL")
    return problems


def _path_problems(key: str) -> list[str]:
    """Return why ``key`` is not a plain relative POSIX path inside a root (empty: it is).

    The key is also checked as a server, a shell or a filesystem could read it:
    percent-decoded (once and twice: ``%2e%2e``, ``%252e%252e``) and NFKC-normalized
    (a fullwidth solidus U+FF0F is a ``/`` to some systems).
    """
    problems = _plain_problems(key)
    if problems:
        return problems
    for decoded in _decoded(key):
        found = _plain_problems(decoded)
        if found or decoded.count("/") > key.count("/"):
            return [f"percent-decoded it reads {decoded!r}: "
                    + ("; ".join(found) or "its escapes hide a '/'")]
    normalized = unicodedata.normalize("NFKC", key)
    if normalized != key:
        odd = sorted({c for c in key if unicodedata.normalize("NFKC", c) != c
                      and set(unicodedata.normalize("NFKC", c)) & set("/\\.:%~")})
        found = _plain_problems(normalized)
        if odd or found:
            shown = ", ".join(f"U+{ord(c):04X}" for c in odd[:4])
            return [f"Unicode normalization (NFKC) turns it into {normalized!r}"
                    + (f" ({shown} become path characters)" if odd else "")]
    return []


def check_key_length(key: str, storage_root: str) -> None:
    """Refuse a key whose longest object key in ``storage_root`` would pass S3's limit.

    Raises
    ------
    InvalidKeyError
        The storage prefix, the key and what lamin-io adds pass 1024 UTF-8 bytes.
    """
    prefix = storage_root.split("://", 1)[1].partition("/")[2] if "://" in storage_root \
        else ""
    length = len(prefix.encode()) + len(key.encode()) + _OBJECT_KEY_OVERHEAD
    if length > S3_KEY_BYTES:
        msg = (f"key {key[:40]!r}... is {len(key.encode())} bytes long: with the storage "
               f"prefix and lamin-io's own names its objects would pass S3's "
               f"{S3_KEY_BYTES}-byte key limit; use a key under "
               f"{max(S3_KEY_BYTES - length + len(key.encode()), 0)} bytes")
        raise InvalidKeyError(msg)


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
