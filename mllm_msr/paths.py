"""Where mllm-msr keeps what it builds (models, benchmark data): ``$MSR_HOME``, default ``~/.cache/mllm-msr``."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from mllm_msr.hashing import file_sha256


def msr_home() -> Path:
    return Path(os.environ.get("MSR_HOME", "~/.cache/mllm-msr")).expanduser()


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
