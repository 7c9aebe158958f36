"""Shared fixtures: a tiny random Idefics3 model folder and a few tiny cover images.

Session-scoped and cheap (the model builds in ~1 s); other test modules may add fixtures here.
"""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["ci_strict"]  # under CI=1 / MSR_CI=1 a skip is a failure

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory):
    """Path of a tiny random-weights Idefics3 HF folder (processor + ChatML template + image
    tokens), loadable by transformers, peft and vLLM."""
    from mllm_msr.models.embedded import build_tiny_idefics3

    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3"))


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
    """Three small PNG covers (different colour / shape / pattern)."""
    from mllm_msr.data.covers import draw_cover

    d = tmp_path_factory.mktemp("images")
    paths = []
    for k, (c, s, p) in enumerate([("red", "circle", "solid"), ("blue", "star", "striped"),
                                   ("green", "square", "dotted")]):
        path = d / f"cover{k}.png"
        draw_cover(c, s, p, size=64).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_image(tiny_images):
    """One small PNG cover."""
    return tiny_images[0]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for servers the tests start."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, server, tries: int = 240) -> bytes:
    """GET ``url`` until it answers; fail with the server's output if it dies or never answers."""
    import time
    import urllib.request

    for _ in range(tries):
        try:
            return urllib.request.urlopen(url, timeout=2).read()
        except OSError:
            if server.poll() is not None:
                pytest.fail(server.stdout.read()[-3000:])
            time.sleep(0.5)
    pytest.fail(f"no answer from {url}")


@pytest.fixture(scope="session")
def postgres_url():
    """Superuser URL of a throwaway PostgreSQL cluster on loopback, shared by the session
    (tests/servers.py); make per-test databases with servers.postgres_database."""
    from servers import postgres_cluster

    with postgres_cluster() as url:
        yield url


@pytest.fixture(scope="session")
def chroma_endpoint():
    """(host, port) of a `chroma run` server on loopback, shared by the session (tests/servers.py);
    give each test its own `store.database`."""
    from servers import chroma_server

    with chroma_server() as endpoint:
        yield endpoint
