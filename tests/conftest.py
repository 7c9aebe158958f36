"""Shared fixtures: a tiny random Idefics3 model folder, a few tiny cover images and the small
synthetic benchmark. Session-scoped and cheap (the model builds in ~1 s). Plain helpers live in
helpers.py: tests never import conftest.
"""
from __future__ import annotations

import os

import pytest

from helpers import SMALL_SYNTH, write_covers

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
    return write_covers(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Folder of the shared small synthetic benchmark (helpers.SMALL_SYNTH); read-only for tests."""
    from mllm_msr.data.synth import generate_benchmark

    return generate_benchmark(tmp_path_factory.mktemp("synth") / "small", SMALL_SYNTH)


@pytest.fixture(scope="session")
def synth_dataset(synth_root):
    """The shared small synthetic benchmark, loaded; tests must not mutate it."""
    from mllm_msr.data.loaders import load_microlens

    return load_microlens(synth_root)


@pytest.fixture(scope="session")
def tiny_image(tiny_images):
    """One small PNG cover."""
    return tiny_images[0]


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
