"""Credentials out of everything written or logged: one function for URIs, one for configs.

A tracking URI such as ``http://user:password@host:5000`` or a data URL with a signed query
(``?token=...``, ``X-Amz-Signature=...``) must not end up in ``config.yaml``, checkpoints,
exports, MLflow params or log lines. ``redact_uri`` replaces the userinfo (user and password) and the
values of credential-like query parameters with ``***``; ``redact`` applies it to every string in
a (nested) config dict; ``redact_text`` to every URL inside a free-text message. The values used
at run time are never changed: only what is written or printed goes through here.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters whose value is a credential (compared lowercased; "_" and "-" ignored), and
# name fragments that mark one (X-Amz-Signature, X-Goog-Credential, api_key, client_secret, ...).
_SECRET_PARAMS = {"token", "key", "secret", "password", "passwd", "pwd", "sig", "signature", "accesstoken",
                  "apikey", "auth", "authorization", "credential", "credentials", "sessiontoken",
                  "securitytoken", "clientsecret", "code", "accesskey"}
_SECRET_FRAGMENTS = ("token", "secret", "password", "signature", "credential", "apikey", "accesskey")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def _secret_param(name: str) -> bool:
    n = name.lower().replace("_", "").replace("-", "")
    return n in _SECRET_PARAMS or any(f in n for f in _SECRET_FRAGMENTS)


def redact_uri(uri: str) -> str:
    """``uri`` with its userinfo and the values of credential-like query parameters masked.

    ``http://user:pw@host:5000/x?token=abc&page=2`` -> ``http://***@host:5000/x?token=***&page=2``.
    Anything that is not a URL is returned unchanged.
    """
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"  # a user name can be the token itself
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_param(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _secret_param(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through ``redact_uri`` (for log lines and errors)."""
    if "://" not in text:
        return text
    return _URL_RE.sub(lambda m: redact_uri(m.group(0)), text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, strings) with every URL string redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
