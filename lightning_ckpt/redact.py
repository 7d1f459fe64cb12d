"""Credentials from ``storage_options`` never reach a log, whoever logs them.

This package never logs option values, but the clients it drives may: botocore at ``DEBUG``
logs each request's headers, session token included. Every ``storage_options`` mapping passes
through :func:`register_secrets`, which remembers the values of credential-like options
(``key``, ``secret``, ``token``, ``password``, ``aws_secret_access_key``, ...; nested dicts too)
and installs, once, a log record factory that replaces those values with ``<redacted>`` in every
record's message, from any logger. Records are only made for enabled levels, so with ``DEBUG``
logging off this costs nothing.

Example:
    >>> import logging
    >>> register_secrets({"key": "AKIAEXAMPLE", "client_kwargs": {"endpoint_url": "http://127.0.0.1"}})
    >>> logging.getLogger("doc").makeRecord("doc", logging.INFO, "f", 1, "id=%s", ("AKIAEXAMPLE",), None).getMessage()
    'id=<redacted>'
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "redact", "register_secrets"]

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|signature|sas|auth", re.IGNORECASE)
_MIN_LENGTH = 4  # shorter values would redact ordinary words

_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def _collect(options: Any, found: set[str], secret_here: bool = False) -> None:
    if isinstance(options, Mapping):
        for name, value in options.items():
            _collect(value, found, secret_here or bool(_SECRET_NAME.search(str(name))))
    elif isinstance(options, (list, tuple)):
        for value in options:
            _collect(value, found, secret_here)
    elif secret_here and isinstance(options, str) and len(options) >= _MIN_LENGTH:
        found.add(options)


def register_secrets(options: Mapping[str, Any] | None) -> None:
    """Remember the credential values in ``options`` and make sure log records are scrubbed of them."""
    found: set[str] = set()
    _collect(options or {}, found)
    if not found:
        return
    with _lock:
        _secrets.update(found)
        _install()


def redact(text: str) -> str:
    """``text`` with every registered credential replaced by ``<redacted>``."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _install() -> None:
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it would
            return record
        if any(secret in message for secret in _secrets):
            record.msg, record.args = redact(message), None
        return record

    logging.setLogRecordFactory(scrubbing_factory)
    _installed = True
