"""Storage settings: one description of a storage root that every reader translates from.

``StorageSettings`` is built once per storage root by :func:`lamin_io.connect` and handed
down to fsspec (``fsspec_options``), pyarrow, polars and tiledbsoma, so all of them see the
same endpoint, region and credentials. Secrets stay in memory: they are masked in every repr
and never written to the registry.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["CONNECT_TIMEOUT", "POLARS_REQUEST_TIMEOUT", "POLARS_RETRY_WINDOW", "READ_TIMEOUT",
           "RETRIES", "S3FS_TRIES", "S3_DEFAULTS", "StorageOptions", "StorageSettings",
           "credential_fingerprint", "retries_in", "without_credentials"]

#: Keys whose values are secrets and are never shown or stored.
SECRET_KEYS = frozenset({"key", "secret", "token", "password", "aws_secret_access_key",
                         "aws_access_key_id", "aws_session_token", "session_token"})

#: Seconds to wait for a TCP connection to the S3 endpoint (every client).
CONNECT_TIMEOUT = 3
#: Seconds to wait for the next bytes of an answer, once a request is sent (every client;
#: TileDB at most its own default, 3 s).
READ_TIMEOUT = 5
#: Retries of a failed request after its first attempt (4 attempts in all): a transient
#: error, reset or timeout is retried; the same one 4 times running is an error.
RETRIES = 3
#: polars' limit on one whole request, answer and body, beside the read timeout.
POLARS_REQUEST_TIMEOUT = 60
#: polars starts no retry later than this many read timeouts after a request's first
#: attempt: a request that hangs is tried twice, one that cannot connect three times.
POLARS_RETRY_WINDOW = 1.5
#: s3fs's own tries of a call, around botocore's retries (1: none of its own, so that one
#: retry budget holds; s3fs's default of 5 multiplies botocore's attempts by 5).
S3FS_TRIES = 1

#: Bounded retries and timeouts so an unreachable endpoint fails in seconds, not minutes
#: (botocore's ``Config``: ``retries.max_attempts`` counts retries, not attempts).
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        "retries": {"max_attempts": RETRIES, "mode": "standard"},
    },
}

_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
)


class StorageOptions(TypedDict, total=False):
    """fsspec storage options understood for S3 roots (any other s3fs option passes through)."""

    endpoint_url: str
    anon: bool
    key: str
    secret: str
    token: str
    profile: str
    client_kwargs: dict[str, Any]
    config_kwargs: dict[str, Any]


def retries_in(options: Mapping[str, Any]) -> int:
    """Return the retries after a first attempt that fsspec-style S3 options allow.

    Read from botocore's ``config_kwargs["retries"]``: ``max_attempts`` counts retries,
    ``total_max_attempts`` attempts (it wins when both are given); :data:`RETRIES` when
    neither is set. Every client lamin-io drives gets this budget.
    """
    config = dict(dict(options.get("config_kwargs") or {}).get("retries") or {})
    if config.get("total_max_attempts") is not None:
        return max(0, int(config["total_max_attempts"]) - 1)
    if config.get("max_attempts") is not None:
        return max(0, int(config["max_attempts"]))
    return RETRIES


def credential_fingerprint(*, files_only: bool = False) -> str:
    """Return a digest of the ambient AWS credential sources (environment and config files).

    The digest changes whenever credentials change, without ever holding them in clear.
    ``files_only``: a digest of the AWS config and credentials files alone (which files,
    their sizes and times) and of the profile variables that pick a section in them.
    """
    h = hashlib.sha256()
    names = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE") if files_only else _CREDENTIAL_ENV
    for name in names:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    for env, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
                         ("AWS_CONFIG_FILE", "~/.aws/config")):
        p = Path(os.environ.get(env, default)).expanduser()
        try:
            st = p.stat()
            h.update(f"{p}:{st.st_mtime_ns}:{st.st_size}\0".encode())
        except OSError:
            h.update(f"{p}:-\0".encode())
    return h.hexdigest()


#: Options that name whose credentials to use (besides :data:`SECRET_KEYS`).
_CREDENTIAL_KEYS = SECRET_KEYS | {"profile", "profile_name"}


def without_credentials(options: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``options`` without credentials (keys, secrets, tokens, profiles).

    What one endpoint's settings may lend another: timeouts and retries, never whose
    credentials to send.
    """
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k.lower() in _CREDENTIAL_KEYS:
            continue
        out[k] = without_credentials(v) if isinstance(v, dict) else v
    return out


def mask(options: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``options`` with secret values replaced by ``'***'``."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k.lower() in SECRET_KEYS:
            out[k] = "***"
        elif isinstance(v, dict):
            out[k] = mask(v)
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class StorageSettings:
    """How to reach one storage root.

    Parameters
    ----------
    root
        ``/abs/local/dir`` or ``s3://bucket/prefix`` (no trailing slash).
    endpoint_url
        S3-compatible endpoint; defaults to ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
    anon
        Anonymous access, for public buckets.
    region
        AWS region, if it must be given explicitly.
    options
        Further fsspec options (may hold secrets; never persisted, never shown).
    """

    root: str
    endpoint_url: str | None = None
    anon: bool = False
    region: str | None = None
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def protocol(self) -> str:
        """``'file'`` for local roots, otherwise the URL scheme (``'s3'``)."""
        return self.root.split("://", 1)[0] if "://" in self.root else "file"

    @property
    def is_remote(self) -> bool:
        """Whether the root lives in an object store."""
        return self.protocol != "file"

    def public_dict(self) -> dict[str, Any]:
        """Return the non-secret settings, safe to persist in the registry."""
        return {"endpoint_url": self.endpoint_url, "anon": self.anon, "region": self.region}

    def fsspec_options(self) -> dict[str, Any]:
        """Return the options for ``fsspec.filesystem(protocol, **options)``."""
        if not self.is_remote:
            return {}
        opts: dict[str, Any] = {"anon": self.anon}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.region:
            opts.setdefault("client_kwargs", {})["region_name"] = self.region
        opts.update(self.options)
        return opts

    def __repr__(self) -> str:
        extra = f", options={mask(self.options)}" if self.options else ""
        return (f"StorageSettings(root={self.root!r}, endpoint_url={self.endpoint_url!r}, "
                f"anon={self.anon}, region={self.region!r}{extra})")


def resolve_endpoint(endpoint_url: str | None) -> str | None:
    """Return ``endpoint_url`` or the endpoint the standard AWS variables name."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)
