"""Storage settings translated for the readers that do not speak fsspec.

fsspec options (what a :class:`upath.UPath` carries) are the one description of how to
reach an object store. pyarrow, polars and tiledbsoma each take their own spelling of the
same facts; :func:`s3_access` resolves those facts (explicit options first, then the
standard AWS chain: environment, profile, config files), and the per-engine functions in
this module only rename them.

Credentials from the AWS chain are checked when a path is opened but never frozen into a
client: temporary ones (STS, SSO, ``credential_process``, instance and container roles)
expire, and a long-lived dataset must sign its next request with the current ones. pyarrow
and TileDB get no keys, so the AWS SDK inside them resolves and refreshes the chain itself;
polars gets :class:`AwsCredentialProvider`, which asks botocore anew. s3fs (the h5ad cache
downloads, zarr) builds its client from aiobotocore's chain, which refreshes on its own.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lamin_io.storage._filesystem import credentials_error
from lamin_io.storage._options import (
    CONNECT_TIMEOUT,
    POLARS_REQUEST_TIMEOUT,
    POLARS_RETRY_WINDOW,
    READ_TIMEOUT,
    RETRIES,
    credential_fingerprint,
    mask,
    resolve_endpoint,
    retries_in,
)
from lamin_io.storage._paths import is_local
from lamin_io.storage._redact import protect_logs

if TYPE_CHECKING:
    import pyarrow.fs
    from upath import UPath

__all__ = ["POLARS_CREDENTIALS_TTL", "AwsCredentialProvider", "S3Access",
           "polars_credential_provider", "polars_storage_options", "pyarrow_filesystem",
           "s3_access", "tiledb_config"]

#: URL schemes that s3fs, pyarrow and polars all read as S3.
S3_PROTOCOLS = frozenset({"s3", "s3a"})

#: Seconds polars keeps what :class:`AwsCredentialProvider` returned before it asks again
#: (the expiry the provider reports). botocore renews temporary credentials 10 to 15
#: minutes before they expire (an STS role session lasts 15 minutes at least), so those
#: polars holds are still valid when it asks; a key rotated in a credential file, a
#: ``credential_process`` or a variable is in use within this time. Asking costs ~40 us
#: (botocore answers from memory until it renews), once per scan and period.
POLARS_CREDENTIALS_TTL = 5

#: TileDB's longest wait for the next bytes of an answer (its own default, and the AWS C++
#: SDK's): a shorter read timeout in the storage options wins.
TILEDB_REQUEST_TIMEOUT = 3.0

#: Where an :class:`S3Access`'s credentials come from (see :attr:`S3Access.credentials`).
CredentialSource = Literal["anonymous", "given", "chain", "role", "frozen"]


def forget_clients() -> None:
    """Drop the cached botocore sessions and pyarrow S3 clients (see ``reset_clients``)."""
    _s3_filesystem.cache_clear()
    _aws_session.cache_clear()


def _forget_clients_after_fork() -> None:
    global _session_lock
    forget_clients()
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

    session = botocore.session.Session(profile=profile)
    protect_logs()  # (botocore's loggers exist now)
    return session


@dataclass(frozen=True)
class S3Access:
    """How to reach an S3 bucket, resolved from fsspec options and the AWS chain.

    Secrets are held in memory only and masked in the repr. ``credentials`` says where the
    credentials come from, and so what each engine is handed:

    - ``"anonymous"``: none, unsigned requests (``anon=True``).
    - ``"given"``: ``key``/``secret``/``token`` from the options, passed on as they are.
    - ``"chain"``: the standard AWS chain, for the profile the environment names
      (``AWS_DEFAULT_PROFILE``, ``AWS_PROFILE``, else ``default``); ``key`` is ``None``.
      pyarrow and TileDB resolve and refresh the chain in their own AWS SDK, polars through
      :class:`AwsCredentialProvider`.
    - ``"role"``: the options name another ``profile``, one that assumes ``role_arn`` from
      the environment's profile; pyarrow and TileDB assume the role themselves (and renew
      it), polars through :class:`AwsCredentialProvider`.
    - ``"frozen"``: the options name another profile that pyarrow and TileDB cannot be told
      (they read the environment's profile only): its credentials, resolved now, are in
      ``key``/``secret``/``token`` for them and are **not renewed**; polars still renews
      them through :class:`AwsCredentialProvider`. Set ``AWS_PROFILE`` to that profile
      instead of passing ``profile=`` for temporary credentials that outlive a dataset.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    retries: int = RETRIES
    credentials: CredentialSource = "chain"
    profile: str | None = None
    role_arn: str | None = None
    role_session_name: str | None = None
    external_id: str | None = None

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
        return _aws_names(self.key, self.secret, self.token)

    def __repr__(self) -> str:
        shown = mask({"key": self.key, "secret": self.secret, "token": self.token})
        return (f"S3Access(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"anon={self.anon}, credentials={self.credentials!r}, "
                f"profile={self.profile!r}, key={shown['key'] if self.key else None}, "
                f"secret={shown['secret'] if self.secret else None}, "
                f"token={shown['token'] if self.token else None})")


def _aws_names(key: str | None, secret: str | None, token: str | None) -> dict[str, str]:
    """Return the credentials that are set, under their AWS names."""
    named = (("aws_access_key_id", key), ("aws_secret_access_key", secret),
             ("aws_session_token", token))
    return {name: value for name, value in named if value}


def _ambient_profile() -> str:
    """Return the profile the AWS SDKs read when none is named (botocore's order)."""
    return (os.environ.get("AWS_DEFAULT_PROFILE") or os.environ.get("AWS_PROFILE")
            or "default")


def _current_credentials(profile: str | None, where: str, endpoint: str | None) -> Any:
    """Return botocore's current credentials for ``profile`` (renewed when due), frozen.

    The session is the cached one for the present credential sources
    (:func:`_aws_session`), so temporary credentials are fetched again only when botocore
    renews them.

    Raises
    ------
    CredentialsError
        The chain has no credentials, or a source failed (a missing profile, partial keys,
        a failing ``credential_process``).
    """
    import botocore.exceptions

    session = _aws_session(profile, credential_fingerprint())
    try:
        with _session_lock:
            credentials = session.get_credentials()
            frozen = None if credentials is None else credentials.get_frozen_credentials()
    except botocore.exceptions.BotoCoreError as exc:
        raise credentials_error(where, endpoint, str(exc)) from None
    if frozen is None or frozen.access_key is None:
        raise credentials_error(where, endpoint)
    return frozen


def _role_of(session: Any) -> dict[str, str] | None:
    """Return ``role_arn`` (and session name, external id) if an AWS SDK can assume it.

    pyarrow and TileDB assume a role with the credentials of their default chain, so only
    a role profile whose ``source_profile`` is the environment's profile qualifies (and one
    that needs no MFA code).
    """
    with _session_lock:
        config = session.get_scoped_config()
    if (not config.get("role_arn") or config.get("mfa_serial")
            or config.get("source_profile") != _ambient_profile()):
        return None
    return {"role_arn": config["role_arn"],
            "role_session_name": config.get("role_session_name"),
            "external_id": config.get("external_id")}


def s3_access(path: UPath) -> S3Access:
    """Resolve endpoint, region and credentials for an ``s3://`` path.

    Explicit fsspec options win (``endpoint_url``, ``anon``, ``key``/``secret``/``token``,
    ``client_kwargs={"region_name": ...}``, ``profile``); what they leave open comes from
    the standard AWS chain as boto3 resolves it (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
    ``AWS_ACCESS_KEY_ID``, profiles, config files). Timeouts and the retry count come from
    the botocore ``config_kwargs`` (:data:`lamin_io.storage.S3_DEFAULTS` unless overridden).

    Credentials from the chain are checked here (botocore resolves them, running a
    ``credential_process`` or reading an SSO cache if that is the source) but not kept,
    except for a ``profile`` the engines' AWS SDKs cannot be told (see
    :attr:`S3Access.credentials`): each engine then signs with the chain's current ones.

    Raises
    ------
    CredentialsError
        Not anonymous, and the chain has no credentials (or names a profile that does not
        exist, or a source fails): every engine would otherwise fall back on its own chain,
        or on unsigned requests. Anonymous access is used only when asked for (``anon=True``).
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
    profile = options.get("profile")
    source: CredentialSource = "anonymous" if anon else "given" if key is not None else "chain"
    role: dict[str, Any] = {}
    if not anon and (key is None or region is None):
        import botocore.exceptions

        session = _aws_session(profile, credential_fingerprint())
        try:
            with _session_lock:
                region = region or session.get_config_variable("region")
        except botocore.exceptions.BotoCoreError as exc:  # a missing profile
            raise credentials_error(str(path), endpoint, str(exc)) from None
        if key is None:
            frozen = _current_credentials(profile, str(path), endpoint)  # exist, or an error
            if profile is not None and profile != _ambient_profile():
                role = _role_of(session) or {}
                source = "role" if role else "frozen"
            if source == "frozen":
                key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
    config = dict(options.get("config_kwargs") or {})
    return S3Access(
        endpoint_url=endpoint, region=region or "us-east-1", anon=anon,
        key=key, secret=secret, token=token,
        connect_timeout=float(config.get("connect_timeout", CONNECT_TIMEOUT)),
        read_timeout=float(config.get("read_timeout", READ_TIMEOUT)),
        retries=retries_in(options),
        credentials=source, profile=profile, **role)


def tiledb_config(path: UPath) -> dict[str, str] | None:
    """Return TileDB's ``vfs.s3.*`` settings for ``path``; ``None`` if local.

    For ``s3://`` paths: ``vfs.s3.region``, ``vfs.s3.scheme``, a custom endpoint as
    ``vfs.s3.endpoint_override`` (host and port) with path-style addressing
    (``vfs.s3.use_virtual_addressing=false``), how to sign, and the connect/read timeouts
    and retry count of the fsspec options. Signing follows :attr:`S3Access.credentials`:
    ``vfs.s3.no_sign_request`` for anonymous access; for the standard AWS chain no
    credentials at all, so TileDB's AWS SDK resolves the chain itself and renews temporary
    credentials while a context lives; ``vfs.s3.aws_role_arn`` (with session name and
    external id) for a role profile it can assume; the keys
    (``vfs.s3.aws_access_key_id``, ``vfs.s3.aws_secret_access_key``,
    ``vfs.s3.aws_session_token``) when they were given, or for another profile (not renewed).
    TileDB's AWS SDK reads the AWS config and credentials files once per process: after
    they (or ``AWS_PROFILE``) changed, the chain's current credentials are handed over as
    keys instead, which TileDB does not renew. Other remote protocols return ``None``:
    TileDB then resolves them itself.

    The result may hold secrets: hand it to TileDB, never print or log it.

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
    elif access.credentials in ("chain", "role") and not _tiledb_reads_current_files():
        frozen = _current_credentials(access.profile, str(path), access.endpoint_url)
        keys = _aws_names(frozen.access_key, frozen.secret_key, frozen.token)
        config.update({f"vfs.s3.{k}": v for k, v in keys.items()})
    elif access.credentials == "role":
        named = (("aws_role_arn", access.role_arn), ("aws_session_name", access.role_session_name),
                 ("aws_external_id", access.external_id))
        config.update({f"vfs.s3.{k}": v for k, v in named if v})
    else:  # no keys for the chain: TileDB's own AWS SDK resolves and renews them
        config.update({f"vfs.s3.{k}": v for k, v in access.aws_credentials().items()})
    config["vfs.s3.connect_timeout_ms"] = str(int(access.connect_timeout * 1000))
    # TileDB waits for every request of a batch it sends in parallel, each with its own
    # retries: never longer than its own default of 3 s a read
    config["vfs.s3.request_timeout_ms"] = str(
        int(min(access.read_timeout, TILEDB_REQUEST_TIMEOUT) * 1000))
    config["vfs.s3.connect_max_tries"] = str(access.retries)  # (retries, as botocore's)
    return config


#: :func:`credential_fingerprint` (``files_only``) when lamin-io first handed TileDB the
#: AWS chain in this process (kept in a forked child: TileDB's state is inherited too).
_tiledb_files: str | None = None


def _tiledb_reads_current_files() -> bool:
    """Whether TileDB's AWS SDK has the AWS config files as they are now.

    It reads them (and the profile variables) once per process, when it first reaches S3,
    and never again: a later context would resolve the chain from what the files said then
    (even sign nothing, if they had no credentials). The files are taken to have been read
    when lamin-io first hands TileDB the chain.
    """
    global _tiledb_files
    now = credential_fingerprint(files_only=True)
    with _session_lock:
        if _tiledb_files is None:
            _tiledb_files = now
        return _tiledb_files == now


def pyarrow_filesystem(path: UPath, *, use_fsspec: bool = False) -> pyarrow.fs.FileSystem:
    """Return the ``pyarrow.fs.FileSystem`` that reads ``path`` (paths as fsspec spells them).

    Local paths get pyarrow's ``LocalFileSystem``; ``s3://`` paths pyarrow's native
    ``S3FileSystem`` built from :func:`s3_access` (endpoint, region, how to sign, and the
    connect/read timeouts and retry count of the fsspec options). Any other protocol, or
    ``use_fsspec=True``, wraps the path's fsspec filesystem. Either way the paths to read
    are ``path.path`` and what ``path.fs.find`` lists (``bucket/key`` on S3).

    With credentials from the standard AWS chain the client gets none: the AWS SDK inside
    pyarrow resolves the chain itself (environment, shared files, ``credential_process``,
    SSO, web identity, container and instance roles) and renews temporary credentials, so a
    dataset that lives for hours keeps reading. A ``profile`` in the options that is not the
    environment's (``AWS_PROFILE``) cannot be told to pyarrow: a role profile assumed from
    the environment's profile becomes ``role_arn`` (renewed by pyarrow), any other is
    resolved once into keys that are not renewed (see :attr:`S3Access.credentials`).

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
    access = s3_access(path)
    own_chain = access.credentials in ("chain", "role")  # resolved by pyarrow's AWS SDK
    return _s3_filesystem(access, credential_fingerprint() if own_chain else "")


@functools.lru_cache(maxsize=32)
def _s3_filesystem(access: S3Access, sources: str) -> pyarrow.fs.S3FileSystem:
    """Return pyarrow's S3 client for ``access``, one per process and access (pooled connections).

    For the AWS chain ``access`` holds no secrets: one client per endpoint and settings
    serves every read, signing with what the SDK's chain holds now (renewed as they expire).
    ``sources`` (:func:`credential_fingerprint` for the chain, else ``""``) is part of the
    cache key only: after a change of profile, variables or credential files the next open
    gets a client that reads them anew (the SDK reads its profile when a client is made).
    Made anew in a forked child: the parent's client threads and connections are not there.
    """
    import pyarrow.fs as pafs

    options: dict[str, Any] = {"region": access.region, "scheme": access.scheme,
                               "endpoint_override": access.endpoint_host,
                               "connect_timeout": access.connect_timeout,
                               "request_timeout": access.read_timeout,
                               # (pyarrow's max_attempts counts the first attempt too)
                               "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                                   max_attempts=access.retries + 1)}
    if access.anon:
        options["anonymous"] = True
    elif access.credentials == "role":
        options.update(role_arn=access.role_arn, session_name=access.role_session_name,
                       external_id=access.external_id)
    elif access.key is not None:  # given, or frozen: the chain ("chain") is pyarrow's own
        options.update(access_key=access.key, secret_key=access.secret,
                       session_token=access.token)
        protect_logs([access.secret, access.token])
    return pafs.S3FileSystem(**options)


def polars_storage_options(path: UPath) -> dict[str, Any] | None:
    """Return polars' ``storage_options`` (object_store keys) for ``path``; ``None`` if local.

    For ``s3://`` paths: ``aws_endpoint_url``, ``aws_region``, the credentials given in the
    options (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``) or
    ``aws_skip_signature`` for anonymous access, ``aws_allow_http`` for an ``http://``
    endpoint, and the timeouts and retries (``connect_timeout``, ``read_timeout``,
    ``timeout``, ``max_retries``, ``retry_timeout_ms``; see
    :mod:`lamin_io.storage._options`). Credentials from the AWS chain are not here: pass
    :func:`polars_credential_provider` as ``credential_provider=``. Other remote protocols
    return ``None``: polars then resolves them itself (or read them with
    ``use_fsspec=True``).

    The result may hold secrets: hand it to polars, never print or log it.

    Parameters
    ----------
    path
        A normalized path (see :func:`lamin_io.storage.to_upath`).
    """
    if is_local(path) or path.protocol not in S3_PROTOCOLS:
        return None
    access = s3_access(path)
    options: dict[str, Any] = {"aws_region": str(access.region)}
    if access.endpoint_url:
        options["aws_endpoint_url"] = access.endpoint_url
    if access.scheme == "http":
        options["aws_allow_http"] = "true"
    if access.anon:
        options["aws_skip_signature"] = "true"
    elif access.credentials == "given":
        options.update(access.aws_credentials())
    # no retry starts after the retry window: polars may send a failing request twice
    # (a read, then a second try of its own), each within the window and one timeout
    options.update(connect_timeout=f"{access.connect_timeout:g}s",
                   read_timeout=f"{access.read_timeout:g}s",
                   timeout=f"{max(POLARS_REQUEST_TIMEOUT, access.read_timeout):g}s",
                   retry_timeout_ms=int(POLARS_RETRY_WINDOW * access.read_timeout * 1000),
                   max_retries=access.retries)
    return options


def polars_credential_provider(path: UPath) -> AwsCredentialProvider | None:
    """Return polars' ``credential_provider`` for ``path``, or ``None`` where none is needed.

    ``None`` for local and non-S3 paths, anonymous access and credentials given in the
    options (:func:`polars_storage_options` carries those). Otherwise an
    :class:`AwsCredentialProvider` for the options' ``profile`` (or the environment's),
    after checking that the chain has credentials.

    Parameters
    ----------
    path
        A normalized path (see :func:`lamin_io.storage.to_upath`).

    Raises
    ------
    CredentialsError
        The chain has no credentials (see :func:`s3_access`).
    """
    if is_local(path) or path.protocol not in S3_PROTOCOLS:
        return None
    access = s3_access(path)
    if access.anon or access.credentials == "given":
        return None
    return AwsCredentialProvider(profile=access.profile, where=str(path),
                                 endpoint_url=access.endpoint_url)


@dataclass(frozen=True)
class AwsCredentialProvider:
    """The AWS chain's current credentials, as polars' ``credential_provider`` asks for them.

    Each call returns botocore's credentials for ``profile`` (the environment's when
    ``None``) as they are now: renewed by botocore before they expire, read again when
    the credential files or variables change. The expiry returned tells polars to ask again
    after :data:`POLARS_CREDENTIALS_TTL` seconds, so a scan that lives long signs with
    current credentials. Holds no secrets (it pickles with a LazyFrame), and works in a
    forked child (the botocore session is made anew there).

    Parameters
    ----------
    profile
        The AWS profile, or ``None`` for the environment's.
    where, endpoint_url
        The path and endpoint, named by the :class:`~lamin_io.errors.CredentialsError`
        raised when the chain has no credentials.

    Examples
    --------
    >>> provider = polars_credential_provider(path)                     # doctest: +SKIP
    >>> pl.scan_parquet(url, storage_options=polars_storage_options(path),
    ...                 credential_provider=provider)                   # doctest: +SKIP
    """

    profile: str | None = None
    where: str = "S3"
    endpoint_url: str | None = None

    def __call__(self) -> tuple[dict[str, str], int]:
        """Return ``({"aws_access_key_id": ..., ...}, expiry in epoch seconds)``."""
        frozen = _current_credentials(self.profile, self.where, self.endpoint_url)
        credentials = _aws_names(frozen.access_key, frozen.secret_key, frozen.token)
        return credentials, int(time.time()) + POLARS_CREDENTIALS_TTL


os.register_at_fork(after_in_child=_forget_clients_after_fork)
