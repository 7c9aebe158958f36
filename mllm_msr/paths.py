"""Where mllm-msr keeps what it builds (models, benchmark data): ``$MSR_HOME``, default ``~/.cache/mllm-msr``."""
from __future__ import annotations

import os
from pathlib import Path


def msr_home() -> Path:
    return Path(os.environ.get("MSR_HOME", "~/.cache/mllm-msr")).expanduser()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed (weights provenance, cache keys of images)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
