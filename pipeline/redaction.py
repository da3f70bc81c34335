"""Secrets kept out of MLflow: which keys look like secrets, params and tags without them, config text and
mappings with their values redacted, and store URIs and error messages without credentials."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

REDACTED = "<redacted>"

_SECRET_PARTS = ("password", "passwd", "secret", "credential")
_SECRET_LAST_WORDS = {"token", "key", "apikey", "accesskey", "privatekey", "accesstoken", "authtoken"}


def _words(segment: str) -> list[str]:
    """``MLFLOW_TRACKING_TOKEN`` -> [mlflow, tracking, token]; ``apiKey`` -> [api, key]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", segment)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def looks_secret(key: str) -> bool:
    """Whether a param/tag/metric/config key names a secret.

    A dotted segment is secret when one of its words contains password/passwd/secret/credential, or
    when its last word is "token" or "key" (also apikey, accesskey, privatekey, accesstoken, authtoken):
    ``hf_token``, ``MLFLOW_TRACKING_TOKEN``, ``api_key``, ``apiKey``, ``AWS_SECRET_ACCESS_KEY``. Whole
    words rather than substrings keep hyperparameters such as ``procl.key_dim``, ``max_new_tokens``,
    ``pad_token_id`` and ``tokenizer`` (and a task called "turkey").
    """
    for segment in str(key).split("."):
        words = _words(segment)
        if any(part in word for word in words for part in _SECRET_PARTS):
            return True
        if words and words[-1] in _SECRET_LAST_WORDS:
            return True
    return False


def flatten_public(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists of dicts by index: ``sources.0.name``); a secret-looking key
    drops its whole subtree. Lists holding dicts are flattened too, or str() would leak their secrets."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if looks_secret(name):
            log.info("not logging %r to MLflow: its name looks like a secret", name)
            continue
        if isinstance(value, (list, tuple)) and any(isinstance(item, Mapping) for item in value):
            value = {str(index): item for index, item in enumerate(value)}
        if isinstance(value, Mapping) and value:
            flat |= flatten_public(value, name)
        else:
            flat[name] = value
    return flat


def redact_uri(uri: str) -> str:
    """The URI without user:password@ (error messages name the store, never its credentials)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def error_line(exc: BaseException) -> str:
    """First line of the error, without any user:password@ that MLflow's own messages repeat (and without
    SQLAlchemy's autoflush note, which comes before the database's own error, e.g. "disk is full")."""
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith("(raised as a result of")]
    first = re.sub(r"//[^/@\s]+@", "//***@", lines[0][:300]) if lines else ""
    return f"{type(exc).__name__}: {first}"


_ASSIGNMENT = re.compile(r"""^(?P<lead>\s*(?:-\s*)?["']?)(?P<key>[A-Za-z0-9_.\-]+)(?P<sep>["']?\s*[:=]\s*)(?P<value>.*?)\s*$""")


def redacted_text(text: str) -> str | None:
    """The config text with secret-looking ``key: value`` / ``key = value`` / ``"key": value`` values
    replaced, or None when nothing needed redacting."""
    changed = False
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = _ASSIGNMENT.match(body)
        if match and looks_secret(match["key"]) and match["value"] not in ("", "{", "["):
            comma = "," if match["value"].endswith(",") else ""
            line = f'{match["lead"]}{match["key"]}{match["sep"]}"{REDACTED}"{comma}{line[len(body):]}'
            changed = True
        lines.append(line)
    return "".join(lines) if changed else None


def redacted_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with the value of every secret-looking key (``looks_secret``), at any depth, replaced."""
    def redact(value: Any, key: str) -> Any:
        if looks_secret(key):
            return REDACTED
        if isinstance(value, Mapping):
            return {k: redact(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [redact(item, key) if isinstance(item, (Mapping, list, tuple)) else item for item in value]
        return value

    return redact(dict(values), "")
