"""Where mllm-msr keeps what it builds (models, benchmark data): ``$MSR_HOME``, default ``~/.cache/mllm-msr``."""
from __future__ import annotations

import os
import functools
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


def adapter_sha256(folder: str | Path | None) -> str | None:
    """Hash of a PEFT adapter folder's weights (None when there is no such file): keys cached
    scores and eval rows to the adapter's content, not its name or path."""
    weights = Path(folder) / "adapter_model.safetensors" if folder else None
    if weights is None or not weights.is_file():
        return None
    st = weights.stat()
    return _cached_sha256(str(weights.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    """file_sha256 once per (file, version): eval hashes the same adapters for every row and seed."""
    return file_sha256(path)
