"""Storage: paths, filesystems, credentials, transfer, cache, hashing and progress.

This layer knows files and objects only: no registry records and no formats.
"""

from lamin_io.storage._cache import cache_dir, cached_copy, cached_download, check_stored
from lamin_io.storage._engines import (
    POLARS_CREDENTIALS_TTL,
    AwsCredentialProvider,
    S3Access,
    polars_credential_provider,
    polars_storage_options,
    pyarrow_filesystem,
    s3_access,
    tiledb_config,
)
from lamin_io.storage._filesystem import (
    bound_retries,
    broken_answer,
    error_codes,
    missing_path,
    refresh_if_credentials_changed,
    reset_clients,
    storage_error,
    storage_errors,
)
from lamin_io.storage._hashing import Manifest, hash_path, manifest_hash
from lamin_io.storage._options import (
    RETRIES,
    StorageOptions,
    StorageSettings,
    resolve_endpoint,
    retries_in,
    without_credentials,
)
from lamin_io.storage._paths import (
    PathLike,
    is_local,
    link_outside,
    make_local_dir,
    relative_key,
    suffix_of,
    to_upath,
)
from lamin_io.storage._progress import ProgressCallback
from lamin_io.storage._redact import protect_logs, redact
from lamin_io.storage._transfer import (
    abort_upload,
    download,
    fingerprint,
    folder_states,
    open_uploads,
    remove,
    upload,
)

__all__ = [
    "RETRIES",
    "protect_logs",
    "redact",
    "abort_upload",
    "open_uploads",
    "POLARS_CREDENTIALS_TTL",
    "AwsCredentialProvider",
    "Manifest",
    "PathLike",
    "ProgressCallback",
    "S3Access",
    "StorageOptions",
    "StorageSettings",
    "bound_retries",
    "broken_answer",
    "cache_dir",
    "cached_copy",
    "cached_download",
    "check_stored",
    "download",
    "error_codes",
    "fingerprint",
    "folder_states",
    "hash_path",
    "is_local",
    "link_outside",
    "make_local_dir",
    "manifest_hash",
    "missing_path",
    "polars_credential_provider",
    "polars_storage_options",
    "pyarrow_filesystem",
    "refresh_if_credentials_changed",
    "relative_key",
    "remove",
    "reset_clients",
    "resolve_endpoint",
    "retries_in",
    "s3_access",
    "storage_error",
    "storage_errors",
    "suffix_of",
    "tiledb_config",
    "to_upath",
    "upload",
    "without_credentials",
]
