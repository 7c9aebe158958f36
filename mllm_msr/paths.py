"""Where mllm-msr keeps what it builds (models, benchmark data): ``$MSR_HOME``, default ``~/.cache/mllm-msr``."""
from __future__ import annotations

import os
from pathlib import Path


def msr_home() -> Path:
    return Path(os.environ.get("MSR_HOME", "~/.cache/mllm-msr")).expanduser()
