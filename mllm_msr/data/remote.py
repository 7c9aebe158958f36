"""Opt-in fetching of remote item images (off by default: datasets name URLs written by strangers).

Only http(s), with a byte cap and a time limit, written atomically into the dataset's image folder
and then validated like any local image (format, size, decompression bombs)."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, Field


class RemoteImageConfig(BaseModel):
    """Remote image policy."""

    enabled: bool = Field(False, description="Fetch image URLs named in the data (never by default).")
    max_bytes: int = Field(5_000_000, gt=0, description="Largest image accepted, in bytes.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request time limit, seconds.")


class RemoteImageError(ValueError):
    pass


def fetch_image(url: str, dest: Path, cfg: RemoteImageConfig) -> Path:
    """Download ``url`` to ``dest`` within the policy's limits, or raise RemoteImageError."""
    if not cfg.enabled:
        raise RemoteImageError(f"remote images are disabled; not fetching {url}")
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise RemoteImageError(f"only http(s) image URLs are fetched, not {scheme or 'no scheme'}: {url}")
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=cfg.timeout_s) as resp:  # noqa: S310 - scheme checked
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
                raise RemoteImageError(f"{url}: {declared} bytes exceeds the {cfg.max_bytes}-byte limit")
            got = 0
            with open(tmp, "wb") as f:
                while chunk := resp.read(65536):
                    got += len(chunk)
                    if got > cfg.max_bytes:
                        raise RemoteImageError(f"{url}: more than {cfg.max_bytes} bytes; stopped")
                    f.write(chunk)
        os.replace(tmp, dest)
        return dest
    except RemoteImageError:
        raise
    except Exception as e:  # noqa: BLE001 - network errors of every kind become one clear error
        raise RemoteImageError(f"{url}: {type(e).__name__}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
