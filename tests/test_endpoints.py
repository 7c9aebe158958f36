"""Several OpenAI-compatible endpoints: spread, failover, a clear error when all are down (local
HTTP servers); and (slow) real vLLM servers: one SIGKILLed mid-batch loses nothing and changes
no result, and a managed server whose process was SIGKILLed is restarted and the request retried."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import free_port
from mllm_msr.models.base import BackendError, ChatRequest, yes_no_probability
from mllm_msr.models.openai_client import VLLMServerBackend
from test_backends import _completion, _FlakyServer, candidates, mixed_requests

GOOD = _completion([("yes", -0.5), ("no", -1.5)])
ERR = {"error": {"message": "boom", "type": "server_error"}}


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused


# ----------------------------------------------------------------------------- local HTTP servers
def test_requests_spread_over_endpoints():
    with _FlakyServer([(200, GOOD)]) as a, _FlakyServer([(200, GOOD)]) as b:
        backend = VLLMServerBackend([a, b], "m", max_concurrency=1, backoff_s=0.01)
        scores = backend.score_yes_no([ChatRequest.user(f"q{k}") for k in range(8)])
        assert scores == pytest.approx([yes_no_probability(-0.5, -1.5)] * 8)
        assert [e.requests for e in backend.pool.endpoints] == [4, 4]  # round robin when idle
        assert backend.stats["retries"] == 0


def test_dead_endpoint_fails_over_without_losing_requests():
    server = _FlakyServer([(200, GOOD)])
    with server as live:
        dead = _dead_url()
        backend = VLLMServerBackend([dead, live], "m", max_concurrency=3, max_retries=1,
                                    backoff_s=0.01)
        scores = backend.score_yes_no([ChatRequest.user(f"q{k}") for k in range(9)])
        assert scores == pytest.approx([yes_no_probability(-0.5, -1.5)] * 9)
        assert server.calls == 9  # every request answered by the live endpoint
        down, up = backend.pool.endpoints
        assert down.failures >= 1 and up.failures == 0
        assert backend.stats["failovers"] == down.failures
        assert "Connection" in down.last_error


def test_server_errors_retry_on_another_endpoint():
    failing = _FlakyServer([(500, ERR)])
    with failing as bad, _FlakyServer([(200, GOOD)]) as good:
        backend = VLLMServerBackend([bad, good], "m", max_concurrency=1, max_retries=1,
                                    backoff_s=0.01)
        assert backend.generate([ChatRequest.user(f"q{k}") for k in range(4)]) == ["yes"] * 4
        assert failing.calls == backend.stats["retries"] >= 1  # each 500 retried elsewhere


def test_all_endpoints_down_is_a_clear_error():
    urls = [_dead_url(), _dead_url()]
    backend = VLLMServerBackend(urls, "m", max_retries=2, backoff_s=0.01)
    with pytest.raises(BackendError, match="all 2 endpoints are down") as err:
        backend.score_yes_no([ChatRequest.user("q")], labels=["user-1/item-2"])
    assert all(u in str(err.value) for u in urls) and "user-1/item-2" in str(err.value)
    assert sum(e.requests for e in backend.pool.endpoints) == 4  # max_retries + one per endpoint


def test_model_config_base_urls():
    from mllm_msr.models.factory import ModelConfig, make_backend

    cfg = ModelConfig(backend="vllm-server", model="served", base_urls=["http://a/v1", "http://b/v1"])
    assert cfg.base_url == "http://a/v1" and cfg.endpoints() == ["http://a/v1", "http://b/v1"]
    cfg = ModelConfig(backend="vllm-server", model="served", base_url="http://a/v1",
                      base_urls=["http://b/v1", "http://a/v1"])
    assert cfg.endpoints() == ["http://a/v1", "http://b/v1"]
    backend = make_backend(cfg)
    assert [e.url for e in backend.pool.endpoints] == ["http://a/v1", "http://b/v1"]


# ----------------------------------------------------------------------------- real vLLM (slow)
def _wait_until(cond, runs) -> None:
    """Wait for ``cond()``; fail if the runs finish first (the kill would not be mid-run)."""
    while not cond():
        assert not all(r.done() for r in runs), "the batch ended before the kill"
        time.sleep(0.02)


def _sigkill(server) -> None:
    """Kill a managed server like a crash would: the API process and its engine, no clean-up."""
    pid = server.proc.pid
    os.killpg(pid, signal.SIGKILL)
    server.proc.wait(30)


def test_a_server_never_takes_a_port_another_server_listens_on(tmp_path):
    """Two servers built before either starts can be handed the same free port; the second must not
    take the first one's /health for its own (seen in a clean-clone run: both replicas had one URL)."""
    import socket

    from mllm_msr.models.vllm_server import ManagedVLLMServer

    first = ManagedVLLMServer(tmp_path / "model", work_dir=tmp_path / "a")
    second = ManagedVLLMServer(tmp_path / "model", work_dir=tmp_path / "b")
    second.port = first.port  # what a free-port race hands out
    with socket.socket() as listening:  # the first server is up
        listening.bind((first.host, first.port))
        listening.listen()
        second._claim_port()
        assert second.port != first.port and str(second.port) in second.log_path.name
        fixed = ManagedVLLMServer(tmp_path / "model", port=first.port, work_dir=tmp_path / "c")
        with pytest.raises(BackendError, match=f"port {first.port} .*in use"):
            fixed._claim_port(wait_s=0)
        first.restarts = 1  # a restart keeps its URL: it waits for the port, then refuses
        with pytest.raises(BackendError, match="in use"):
            first._claim_port(wait_s=0.6)
    port = first.port
    first._claim_port(wait_s=0)  # released: the restart goes ahead on the same port
    assert first.port == port
    for srv in (first, second, fixed):
        srv.stop()


@pytest.fixture(scope="module")
def two_servers(tiny_idefics3, tmp_path_factory):
    from mllm_msr.models.vllm_server import ManagedVLLMServer

    servers = [ManagedVLLMServer(tiny_idefics3, max_model_len=1024,
                                 work_dir=tmp_path_factory.mktemp(f"vllm-{k}")) for k in range(2)]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


def _workload(images):
    gen = mixed_requests(images) * 6 + [ChatRequest.user(f"Describe item {k}.") for k in range(16)]
    score = mixed_requests(images) + candidates(images, 21) * 2
    return gen, score


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_one_of_two_servers_mid_batch(two_servers, tiny_idefics3, tiny_images):
    from mllm_msr.models.factory import ModelConfig, make_backend

    cfg = ModelConfig(backend="vllm-server", model=str(tiny_idefics3), max_concurrency=4,
                      base_urls=[s.base_url for s in two_servers])
    gen, score = _workload(tiny_images)
    clean = make_backend(cfg)
    want_gen = clean.generate(gen, max_new_tokens=12)
    want_score = clean.score_yes_no(score)
    assert all(e.requests > 0 and e.failures == 0 for e in clean.pool.endpoints)

    backend = make_backend(cfg)
    victim = backend.pool.endpoints[1]
    with ThreadPoolExecutor(2) as ex:
        gen_run = ex.submit(backend.generate, gen, max_new_tokens=12)
        score_run = ex.submit(backend.score_yes_no, score)
        _wait_until(lambda: victim.requests >= 6, (gen_run, score_run))
        _sigkill(two_servers[1])  # a few requests in: kill the second server mid-run
        got_gen, got_score = gen_run.result(), score_run.result()
    print(f"after the kill: failovers {backend.stats['failovers']}, per endpoint "
          f"{[(e.requests, e.failures) for e in backend.pool.endpoints]}")
    assert got_gen == want_gen  # greedy: same text, nothing lost
    assert got_score == pytest.approx(want_score, abs=1e-5)
    assert victim.failures >= 1 and backend.stats["failovers"] >= 1
    assert backend.pool.endpoints[0].failures == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_managed_server_restarts_after_sigkill(two_servers, tiny_images):
    from mllm_msr.models.vllm_server import ManagedServerBackend

    server = two_servers[0]
    backend = ManagedServerBackend(server, max_concurrency=4, backoff_s=0.2)
    reqs = mixed_requests(tiny_images) + candidates(tiny_images, 8)
    want = backend.score_yes_no(reqs)
    want_text = backend.generate(reqs, max_new_tokens=8)
    _sigkill(server)
    assert not server.alive()
    assert backend.score_yes_no(reqs) == pytest.approx(want, abs=1e-5)  # restarted first
    assert server.restarts == 1 and server.alive()
    # killed while requests are in flight: they are retried once the server is back
    endpoint = backend.pool.endpoints[0]
    sent = endpoint.requests
    with ThreadPoolExecutor(1) as ex:
        run = ex.submit(backend.generate, reqs * 3, max_new_tokens=8)
        _wait_until(lambda: endpoint.requests >= sent + 6, (run,))
        _sigkill(server)
        assert run.result() == want_text * 3
    assert server.restarts == 2 and server.alive()
