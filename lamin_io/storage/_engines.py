"""Storage settings translated for the readers that do not speak fsspec.

fsspec options (what a :class:`upath.UPath` carries) are the one description of how to
reach an object store. pyarrow, polars and tiledbsoma each take their own spelling of the
same facts; :func:`s3_access` resolves those facts once (explicit options first, then the
standard AWS chain: environment, profile, config files), and the per-engine functions in
this module only rename them.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lamin_io.storage._filesystem import credentials_error
from lamin_io.storage._options import credential_fingerprint, mask, resolve_endpoint
from lamin_io.storage._paths import is_local

if TYPE_CHECKING:
    import pyarrow.fs
    from upath import UPath

__all__ = ["S3Access", "polars_storage_options", "pyarrow_filesystem", "s3_access",
           "tiledb_config"]

#: URL schemes that s3fs, pyarrow and polars all read as S3.
S3_PROTOCOLS = frozenset({"s3", "s3a"})


def _forget_clients_after_fork() -> None:
    global _session_lock
    _s3_filesystem.cache_clear()
    _aws_session.cache_clear()
    _session_lock = threading.Lock()  # a thread of the parent may have held it at the fork


#: botocore sessions are not safe to use from several threads at once.
_session_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _aws_session(profile: str | None, fingerprint: str) -> Any:
    """Return a botocore session for ``profile``, one per profile and credential sources.

    ``fingerprint`` (:func:`credential_fingerprint`: a digest of the AWS environment
    variables and the credential and config files' sizes and times) is the cache key
    only: edited files or changed variables make a new session, which reads them again.
    Making a session costs ~20 ms (botocore registers its event handlers); that was paid
    at every open of a remote file. Temporary credentials refresh themselves.
    """
    import botocore.session

    return botocore.session.Session(profile=profile)


@dataclass(frozen=True)
class S3Access:
    """How to reach an S3 bucket, resolved from fsspec options and the AWS chain.

    Secrets are held in memory only and masked in the repr.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    connect_timeout: float | None = None
    read_timeout: float | None = None
    max_attempts: int | None = None

    @property
    def scheme(self) -> str:
        """``"http"`` or ``"https"``, from the endpoint (default ``"https"``)."""
        if self.endpoint_url and self.endpoint_url.startswith("http://"):
            return "http"
        return "https"

    @property
    def endpoint_host(self) -> str | None:
        """The endpoint without its scheme (``"127.0.0.1:9000"``), or ``None``."""
        if not self.endpoint_url:
            return None
        return self.endpoint_url.split("://", 1)[-1].rstrip("/")

    def aws_credentials(self) -> dict[str, str]:
        """Return the credentials given, under their AWS names (``aws_access_key_id``, ...)."""
        named = (("aws_access_key_id", self.key), ("aws_secret_access_key", self.secret),
                 ("aws_session_token", self.token))
        return {name: value for name, value in named if value}

    def __repr__(self) -> str:
        shown = mask({"key": self.key, "secret": self.secret, "token": self.token})
        return (f"S3Access(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"anon={self.anon}, key={shown['key'] if self.key else None}, "
                f"secret={shown['secret'] if self.secret else None}, "
                f"token={shown['token'] if self.token else None})")


def s3_access(path: UPath) -> S3Access:
    """Resolve endpoint, region and credentials for an ``s3://`` path.

    Explicit fsspec options win (``endpoint_url``, ``anon``, ``key``/``secret``/``token``,
    ``client_kwargs={"region_name": ...}``, ``profile``); what they leave open comes from
    the standard AWS chain as boto3 resolves it (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
    ``AWS_ACCESS_KEY_ID``, profiles, config files). Timeouts and the retry count come from
    the botocore ``config_kwargs`` (:data:`lamin_io.storage.S3_DEFAULTS` unless overridden).

    Raises
    ------
    CredentialsError
        Not anonymous, and the chain has no credentials (or names a profile that does not
        exist): every engine would otherwise fall back on its own chain, or on unsigned
        requests. Anonymous access is used only when asked for (``anon=True``).
    """
    options: dict[str, Any] = dict(path.storage_options)
    client = dict(options.get("client_kwargs") or {})
    endpoint = (options.get("endpoint_url") or client.get("endpoint_url")
                or resolve_endpoint(None))
    anon = bool(options.get("anon", False))
    key = options.get("key") or client.get("aws_access_key_id")
    secret = options.get("secret") or client.get("aws_secret_access_key")
    token = options.get("token") or client.get("aws_session_token")
    region = client.get("region_name")
    if not anon and (key is None or region is None):
        import botocore.exceptions

        session = _aws_session(options.get("profile"), credential_fingerprint())
        try:
            with _session_lock:
                region = region or session.get_config_variable("region")
                if key is None:
                    credentials = session.get_credentials()
                    if credentials is not None:
                        frozen = credentials.get_frozen_credentials()
                        key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
        except botocore.exceptions.BotoCoreError as exc:  # a missing profile, partial keys
            raise credentials_error(str(path), endpoint, str(exc)) from None
        if key is None:
            raise credentials_error(str(path), endpoint)
    config = dict(options.get("config_kwargs") or {})
    attempts = (config.get("retries") or {}).get("max_attempts")
    return S3Access(
        endpoint_url=endpoint, region=region or "us-east-1", anon=anon,
        key=key, secret=secret, token=token,
        connect_timeout=_seconds(config.get("connect_timeout")),
        read_timeout=_seconds(config.get("read_timeout")),
        max_attempts=None if attempts is None else int(attempts))


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def tiledb_config(path: UPath) -> dict[str, str] | None:
    """Return TileDB's ``vfs.s3.*`` settings for ``path``; ``None`` if local.

    For ``s3://`` paths: ``vfs.s3.region``, ``vfs.s3.scheme``, a custom endpoint as
    ``vfs.s3.endpoint_override`` (host and port) with path-style addressing
    (``vfs.s3.use_virtual_addressing=false``), the credentials (``vfs.s3.aws_access_key_id``,
    ``vfs.s3.aws_secret_access_key``, ``vfs.s3.aws_session_token``) or
    ``vfs.s3.no_sign_request`` for anonymous access, and the connect/read timeouts and retry
    count of the fsspec options. Other remote protocols return ``None``: TileDB then
    resolves them itself.

    The result holds secrets: hand it to TileDB, never print or log it.

    Parameters
    ----------
    path
        A normalized path (see :func:`lamin_io.storage.to_upath`).
    """
    if is_local(path) or path.protocol not in S3_PROTOCOLS:
        return None
    access = s3_access(path)
    config = {"vfs.s3.region": str(access.region), "vfs.s3.scheme": access.scheme}
    if access.endpoint_host:
        config["vfs.s3.endpoint_override"] = access.endpoint_host
        config["vfs.s3.use_virtual_addressing"] = "false"
    if access.anon:
        config["vfs.s3.no_sign_request"] = "true"
    else:
        config.update({f"vfs.s3.{k}": v for k, v in access.aws_credentials().items()})
    for seconds, name in ((access.connect_timeout, "vfs.s3.connect_timeout_ms"),
                          (access.read_timeout, "vfs.s3.request_timeout_ms")):
        if seconds is not None:
            config[name] = str(int(seconds * 1000))
    if access.max_attempts is not None:
        config["vfs.s3.connect_max_tries"] = str(access.max_attempts)
    return config


def pyarrow_filesystem(path: UPath, *, use_fsspec: bool = False) -> pyarrow.fs.FileSystem:
    """Return the ``pyarrow.fs.FileSystem`` that reads ``path`` (paths as fsspec spells them).

    Local paths get pyarrow's ``LocalFileSystem``; ``s3://`` paths pyarrow's native
    ``S3FileSystem`` built from :func:`s3_access` (endpoint, region, credentials or anonymous
    access, and the connect/read timeouts and retry count of the fsspec options). Any other
    protocol, or ``use_fsspec=True``, wraps the path's fsspec filesystem. Either way the
    paths to read are ``path.path`` and what ``path.fs.find`` lists (``bucket/key`` on S3).

    Parameters
    ----------
    path
        A normalized path (see :func:`lamin_io.storage.to_upath`).
    use_fsspec
        Read through the path's fsspec filesystem even where pyarrow has a native one.
    """
    import pyarrow.fs as pafs

    if not use_fsspec and is_local(path):
        return pafs.LocalFileSystem()
    if use_fsspec or path.protocol not in S3_PROTOCOLS:
        return pafs.PyFileSystem(pafs.FSSpecHandler(path.fs))
    return _s3_filesystem(s3_access(path))


@functools.lru_cache(maxsize=32)
def _s3_filesystem(access: S3Access) -> pyarrow.fs.S3FileSystem:
    """Return pyarrow's S3 client for ``access``, one per process and access (pooled connections).

    Made anew in a forked child: the parent's client threads and connections are not there.
    """
    import pyarrow.fs as pafs

    options: dict[str, Any] = {"region": access.region, "scheme": access.scheme,
                               "endpoint_override": access.endpoint_host,
                               "connect_timeout": access.connect_timeout,
                               "request_timeout": access.read_timeout}
    if access.anon:
        options["anonymous"] = True
    elif access.key is not None:
        options.update(access_key=access.key, secret_key=access.secret,
                       session_token=access.token)
    if access.max_attempts is not None:
        options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(
            max_attempts=access.max_attempts)
    return pafs.S3FileSystem(**options)


def polars_storage_options(path: UPath) -> dict[str, str] | None:
    """Return polars' ``storage_options`` (object_store keys) for ``path``; ``None`` if local.

    For ``s3://`` paths: ``aws_endpoint_url``, ``aws_region``, the credentials
    (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``) or
    ``aws_skip_signature`` for anonymous access, ``aws_allow_http`` for an ``http://``
    endpoint, and the connect timeout. Other remote protocols return ``None``: polars then
    resolves them itself (or read them with ``use_fsspec=True``).

    The result holds secrets: hand it to polars, never print or log it.

    Parameters
    ----------
    path
        A normalized path (see :func:`lamin_io.storage.to_upath`).
    """
    if is_local(path) or path.protocol not in S3_PROTOCOLS:
        return None
    access = s3_access(path)
    options: dict[str, str] = {"aws_region": str(access.region)}
    if access.endpoint_url:
        options["aws_endpoint_url"] = access.endpoint_url
    if access.scheme == "http":
        options["aws_allow_http"] = "true"
    if access.anon:
        options["aws_skip_signature"] = "true"
    else:
        options.update(access.aws_credentials())
    if access.connect_timeout is not None:
        options["connect_timeout"] = f"{access.connect_timeout:g}s"
    return options


os.register_at_fork(after_in_child=_forget_clients_after_fork)
