"""What the CPU (or GPU) can do natively, decided once for every role that picks a dtype.

``native_bf16(device_type)`` is True on CPUs with AMX or AVX512-BF16 (oneDNN's own check) and on
bf16-capable GPUs. ``resolve_dtype("auto", ...)`` turns the ``auto`` setting into ``bfloat16``
there and ``float32`` elsewhere; SFT's ``bf16=None`` uses the same check.
"""
from __future__ import annotations

from functools import cache


@cache
def native_bf16(device_type: str = "cpu") -> bool:
    """True when ``device_type`` runs bf16 matmuls natively (CPU: AMX / AVX512-BF16)."""
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device_type: str = "cpu") -> str:
    """``auto`` → ``bfloat16`` where :func:`native_bf16` holds, else ``float32``; other names unchanged."""
    if str(name).lower() != "auto":
        return str(name)
    return "bfloat16" if native_bf16(device_type) else "float32"
