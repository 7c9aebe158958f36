"""Plain helpers shared by the tests (import them: `from helpers import free_port`); fixtures live
in conftest.py, which tests never import."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from mllm_msr.data.synth import SynthConfig

# The shared small synthetic benchmark (conftest's `synth_root` / `synth_dataset`): 40 users, 60 items.
SMALL_SYNTH = SynthConfig(n_users=40, n_items=60, seed=1, image_size=32)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for servers the tests start."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, server: subprocess.Popen, tries: int = 240) -> bytes:
    """GET ``url`` until it answers; fail with the server's output if it dies or never answers."""
    for _ in range(tries):
        try:
            return bytes(urllib.request.urlopen(url, timeout=2).read())
        except OSError:
            if server.poll() is not None:
                pytest.fail(server.stdout.read()[-3000:] if server.stdout else f"server exited: {url}")
            time.sleep(0.5)
    pytest.fail(f"no answer from {url}")


def write_covers(folder: Path) -> list[Path]:
    """Three small PNG covers (different colour / shape / pattern) in ``folder``."""
    from mllm_msr.data.covers import draw_cover

    paths = []
    for k, (c, s, p) in enumerate([("red", "circle", "solid"), ("blue", "star", "striped"),
                                   ("green", "square", "dotted")]):
        path = folder / f"cover{k}.png"
        draw_cover(c, s, p, size=64).save(path)
        paths.append(path)
    return paths
