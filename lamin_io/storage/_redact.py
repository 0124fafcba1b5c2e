"""Secrets out of log output: a filter on the loggers of the S3 libraries lamin-io calls.

botocore logs every request it sends at DEBUG level, signed headers included; with
temporary credentials those carry the session token (``x-amz-security-token``). When
lamin-io creates an S3 client or filesystem it adds :class:`RedactSecrets` to the loggers
of botocore, aiobotocore, s3fs, fsspec and urllib3 (those that exist then; it adds it again
to loggers made later, at the next client). The filter rewrites a record's message:

* the values of ``x-amz-security-token`` headers and query parameters, of
  ``X-Amz-Credential``, and of secret-looking fields (``aws_secret_access_key``,
  ``SessionToken``, ``password``, ...) become ``<redacted>``;
* so does every secret lamin-io was given or found: S3 keys and tokens from
  ``storage_options`` and the ``AWS_*`` variables, a registry password.

It only edits records: it installs no handler and changes no level.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["REDACTED", "RedactSecrets", "protect_logs", "redact"]

REDACTED = "<redacted>"
#: Loggers (and their children) whose records the filter cleans.
LOGGER_PREFIXES = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3")
#: Environment variables holding secrets.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "PGPASSWORD")

_FIELD = re.compile(
    r"(?i)((?:x-amz-security-token|x-amz-credential|aws_secret_access_key|"
    r"aws_session_token|secretaccesskey|sessiontoken|secret_key|security_token|password)"
    r"""['"]?\s*[:=]\s*b?['"]?)([^'"\s,;&}\]\)]+)""")

_lock = threading.Lock()
_secrets: set[str] = set()


def _known_secrets() -> list[str]:
    with _lock:
        found = set(_secrets)
    found.update(v for name in SECRET_VARIABLES if (v := os.environ.get(name)))
    # longest first: a secret containing another is replaced whole
    return sorted((s for s in found if len(s) >= 6), key=len, reverse=True)


def redact(text: str) -> str:
    """Return ``text`` with secret values and secret-looking fields replaced."""
    for secret in _known_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _FIELD.sub(lambda m: m.group(1) + REDACTED, text)


class RedactSecrets(logging.Filter):
    """A logging filter that removes secrets from a record's message (see the module)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a record that cannot format is not ours to fix)
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactSecrets()


def protect_logs(secrets: Iterable[object] = ()) -> None:
    """Add the filter to the S3 libraries' loggers; remember ``secrets`` to redact."""
    with _lock:
        _secrets.update(s for s in secrets if isinstance(s, str) and s)
    names = [name for name in list(logging.Logger.manager.loggerDict)
             if name.split(".")[0] in LOGGER_PREFIXES]
    for name in {*LOGGER_PREFIXES, *names}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
