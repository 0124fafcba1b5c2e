"""The exceptions lamin-io raises.

Every error is a :class:`LaminIOError`. Each subclass also inherits the builtin a caller
would naturally catch (``except FileNotFoundError`` still works for a missing path), and its
message says what failed, where, and what to do about it. Messages never carry secrets.
"""

from __future__ import annotations

__all__ = [
    "ArtifactNotFoundError",
    "CorruptArtifactError",
    "CorruptRegistryError",
    "AccessorClosedError",
    "BucketNotFoundError",
    "CredentialsError",
    "ExportError",
    "ImportConflictError",
    "IndexOutOfRangeError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "LaminIOError",
    "MissingDependencyError",
    "MultipleResultsError",
    "NameNotFoundError",
    "ObjectExistsError",
    "PathNotFoundError",
    "RegistryError",
    "RegistryLockedError",
    "RegistryMismatchError",
    "RegistryPermissionError",
    "RegistryUnreachableError",
    "SaveInterruptedError",
    "SchemaVersionError",
    "SourceChangedError",
    "StorageError",
    "StorageModifiedError",
    "StorageObjectMissingError",
    "StoragePermissionError",
    "StorageServiceError",
    "StorageTimeoutError",
    "StorageUnreachableError",
    "UnsupportedFormatError",
    "UnsupportedLayoutError",
    "WriteNotSupportedError",
]


class LaminIOError(Exception):
    """Root of every error lamin-io raises."""


class InvalidArgumentError(LaminIOError, ValueError):
    """An argument has a value that cannot be used (wrong type, unknown option, bad range)."""


class InvalidKeyError(LaminIOError, ValueError):
    """A registry key is unsafe, reserved, or its suffix does not match the file's.

    Unsafe means: a ``..`` component, absolute, a backslash, or empty.
    """


class PathNotFoundError(LaminIOError, FileNotFoundError):
    """A local path or remote URL given by the user does not exist."""


class UnsupportedFormatError(LaminIOError, ValueError):
    """No reader is registered for a file's suffix or encoding."""


class UnsupportedLayoutError(UnsupportedFormatError):
    """An element of a readable file is stored in a layout lamin-io cannot read.

    The message names the element; reading the file with the library that wrote it (for
    AnnData: ``anndata.read_h5ad``/``read_zarr``) and writing it again gives a current layout.
    """


class MissingDependencyError(LaminIOError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""


class ArtifactNotFoundError(LaminIOError, LookupError):
    """No registry record matches the query."""


class MultipleResultsError(LaminIOError, LookupError):
    """A query that must select one record matched several."""


class RegistryError(LaminIOError):
    """The registry database cannot be used as asked."""


class RegistryMismatchError(RegistryError):
    """A record of one registry used while connected to another: reconnect to its own."""


class RegistryLockedError(RegistryError, TimeoutError):
    """The registry database stayed locked by another writer past the busy timeout."""


class RegistryUnreachableError(RegistryError, ConnectionError):
    """The registry's database server did not answer (refused, unknown host, timed out)."""


class RegistryPermissionError(RegistryError, PermissionError):
    """The registry's database refused an operation to this role (a reader saving, say)."""


class CorruptRegistryError(RegistryError):
    """A registry row holds a value lamin-io never writes (edited outside lamin-io)."""


class SaveInterruptedError(RegistryError):
    """A save's pending record was collected by ``gc`` before the save could finish."""


class SchemaVersionError(RegistryError):
    """The registry (or a registry export) was written by a newer lamin-io than the one running."""


class ExportError(LaminIOError, ValueError):
    """A registry export is damaged or incomplete, or its folder cannot be written.

    Damaged: its manifest is missing or unreadable, a table's parquet file is missing or
    truncated, or its rows do not match the manifest's count or checksum. Nothing is
    imported from it.
    """


class ImportConflictError(RegistryError, ValueError):
    """Importing an export would change what the target registry holds.

    The target is not empty (``if_exists="fail"``), or a record of the export is in it with
    other content (``if_exists="append"``). Nothing is imported.
    """


class StorageError(LaminIOError, OSError):
    """Base for errors of the storage layer (local disk or object store)."""


class StorageUnreachableError(StorageError, ConnectionError):
    """The storage endpoint did not answer after bounded retries."""


class StorageTimeoutError(StorageUnreachableError, TimeoutError):
    """The storage endpoint accepted no connection, or sent no answer, within the timeouts.

    Every attempt the retry budget allows timed out: a black-holed or hung endpoint.
    """


class StorageServiceError(StorageError, ConnectionError):
    """The storage service kept answering with a server error (S3's 5xx) after retries."""


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The S3 bucket a path or storage root names does not exist at the endpoint."""


class CredentialsError(StorageError, PermissionError):
    """No credentials were found for storage that needs them.

    Anonymous access is used only when asked for (``anon=True``), never as a fallback.
    """


class StorageObjectMissingError(StorageError, FileNotFoundError):
    """A registered artifact's stored object is gone from storage."""


class StoragePermissionError(StorageError, PermissionError):
    """The object store refused a request (S3's 403 Forbidden).

    The credentials are not valid (a wrong or expired key), or they lack a permission the
    operation needs (see "For a team" in the README).
    """


class StorageModifiedError(StorageError):
    """A stored object no longer matches its record (overwritten behind the registry's back)."""


class CorruptArtifactError(StorageError):
    """A stored object's bytes are damaged or incomplete (a folder lacks a file it lists)."""


class SourceChangedError(StorageError):
    """The file or folder being saved changed while it was hashed and uploaded."""


class ObjectExistsError(StorageError, FileExistsError):
    """A conditional create found an object already at the target key."""


class IndexOutOfRangeError(LaminIOError, IndexError):
    """A positional index lies outside an axis."""


class NameNotFoundError(LaminIOError, KeyError):
    """An obs/var name or an element key does not exist."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class AccessorClosedError(LaminIOError, ValueError):
    """An accessor was used after ``close()``."""


class WriteNotSupportedError(LaminIOError, ValueError):
    """A write mode was asked of a format or store that cannot be written back."""
