"""The one place that hashes: SHA-256 of bytes, of JSON-able values and of files.

Every cache key, config hash, prompt version and weights provenance goes through these, so the
same input always gives the same hex string wherever it is computed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_hex(data: bytes | str, length: int | None = None) -> str:
    """Hex SHA-256 of ``data`` (str is UTF-8 encoded), cut to ``length`` characters when given."""
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:length]


def json_digest(value: Any, length: int | None = 24) -> str:
    """Stable hash of a JSON-able value: keys sorted, non-JSON values as ``str``."""
    return sha256_hex(json.dumps(value, sort_keys=True, default=str), length)


def digest(*parts: Any) -> str:
    """Stable 24-hex-character hash of JSON-able parts (cache keys of summaries and scores)."""
    return json_digest(parts)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed (weights provenance, cache keys of images)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def omit_at_default(data: dict[str, Any], model: Any, *fields: str) -> dict[str, Any]:
    """``data`` (a pydantic model's dump) without ``fields`` that still hold their declared default:
    a setting added later leaves every hash, cache key and file of the settings before it unchanged."""
    for name in fields:
        if getattr(model, name) == type(model).model_fields[name].default:
            data.pop(name, None)
    return data
