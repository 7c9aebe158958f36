"""A managed vLLM OpenAI-compatible server: ``python -m vllm.entrypoints.openai.api_server`` on a
local model folder, in its own process group on loopback, health-checked, stopped at exit.

``ManagedServerBackend`` is a ``VLLMServerBackend`` that owns such a server and restarts it
(same port) when its process has died, before the next request is sent; the request that found
it dead is retried on the restarted server.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import BackendError
from .openai_client import VLLMServerBackend

log = logging.getLogger(__name__)

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(adapters: dict[str, str] | None) -> int:
    """The smallest rank vLLM accepts for ``--max-lora-rank`` that fits every adapter."""
    r = 8
    for path in (adapters or {}).values():
        try:
            r = max(r, int(json.loads((Path(path) / "adapter_config.json").read_text())["r"]))
        except (OSError, KeyError, ValueError):
            pass
    return next((x for x in _LORA_RANKS if x >= r), _LORA_RANKS[-1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` now (a bind test; connections of a stopped
    server left in TIME_WAIT do not count, as for the server's own SO_REUSEADDR bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def vllm_env(work_dir: Path, kv_cache_gib: float, extra: dict[str, str] | None = None
             ) -> dict[str, str]:
    """The environment both vLLM flavours need on this stack (offline, CPU KV cache size)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
    env.setdefault("VLLM_CACHE_ROOT", str(work_dir / "vllm-cache"))
    env.update(extra or {})
    return env


class ManagedVLLMServer:
    """Start ``python -m vllm.entrypoints.openai.api_server`` on a local model folder.

    Context manager; ``base_url`` (…/v1) and ``model`` (the served name) once started. The log
    streams to ``log_path``; the process is terminated (then killed) on exit and at interpreter
    exit; if it dies while starting, the error carries the log's tail. ``restart`` brings a dead
    server back on the same port (``restarts`` counts them).
    """

    def __init__(self, model_path: str | Path, lora_modules: dict[str, str] | None = None, *,
                 port: int | None = None, host: str = "127.0.0.1", max_model_len: int = 2048,
                 dtype: str | None = "float32", max_lora_rank: int | None = None,
                 max_logprobs: int = 20, kv_cache_gib: float = 1, enforce_eager: bool = True,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 work_dir: str | Path | None = None, startup_timeout: float = 300.0,
                 served_model_name: str | None = None) -> None:
        self.model_path = str(model_path)
        self.lora_modules = dict(lora_modules or {})
        self.host = host
        self._auto_port = port is None  # chosen here: re-chosen at start() if taken meanwhile
        self.port = port or free_port(host)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.max_lora_rank = max_lora_rank or lora_rank(self.lora_modules)
        self.max_logprobs = max_logprobs
        self.enforce_eager = enforce_eager
        self.extra_args = list(extra_args)
        self.work_dir = Path(work_dir) if work_dir else Path.cwd() / ".msr-vllm"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.env = vllm_env(self.work_dir, kv_cache_gib, env)
        self.startup_timeout = startup_timeout
        self.model = served_model_name or self.model_path
        self.log_path = self.work_dir / f"vllm-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.restarts = 0
        self._healthy = False  # set once /health answered, cleared by stop()
        self._log_mode = "w"
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               self.model_path, "--host", self.host, "--port", str(self.port),
               "--max-model-len", str(self.max_model_len), "--max-logprobs",
               str(self.max_logprobs)]
        if self.model != self.model_path:
            cmd += ["--served-model-name", self.model]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.lora_modules:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                    "--max-loras", str(max(1, len(self.lora_modules))), "--lora-modules",
                    *(f"{n}={p}" for n, p in self.lora_modules.items())]
        return cmd + self.extra_args

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> ManagedVLLMServer:
        if self.proc is not None:
            return self
        if not (Path(self.model_path) / "config.json").exists():  # hub access is off: fail fast
            raise BackendError(f"{self.model_path} is not a local HF model folder (no config.json)")
        self._claim_port()
        t0 = time.perf_counter()
        with open(self.log_path, self._log_mode) as log_f:
            self.proc = subprocess.Popen(self.command(), stdout=log_f, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=str(self.work_dir),
                                         start_new_session=True)
        self._log_mode = "a"  # a restart keeps the log of the death it follows
        log.info("vLLM server pid %d on %s (log %s)", self.proc.pid, self.url, self.log_path)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()  # reaps workers it left behind
                raise BackendError(f"vLLM server exited with code {code} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"vLLM server not healthy after {self.startup_timeout:.0f}s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(1.0)
        self.startup_s = time.perf_counter() - t0
        self._healthy = True
        log.info("vLLM server healthy after %.1fs", self.startup_s)
        return self

    def _claim_port(self, wait_s: float = 10.0) -> None:
        """Make sure nothing listens on our port before launching. Ports are picked when a server is
        built, so another server started in between may own it now, and its /health would pass for
        ours. A port picked here is picked again on the first start; a fixed port, or the port of a
        restart (clients hold its URL), gets ``wait_s`` to be released and is then refused."""
        if port_free(self.host, self.port):
            return
        if self._auto_port and not self.restarts:
            self.port = free_port(self.host)
            self.log_path = self.work_dir / f"vllm-server-{self.port}.log"
            return
        deadline = time.monotonic() + wait_s
        while not port_free(self.host, self.port):
            if time.monotonic() > deadline:
                raise BackendError(f"port {self.port} on {self.host} is already in use")
            time.sleep(0.5)

    def alive(self) -> bool:
        """True once the server answered /health, while its process runs (False while a
        restart is under way)."""
        return self._healthy and self.proc is not None and self.proc.poll() is None

    def restart(self) -> ManagedVLLMServer:
        """Stop what is left of the server (its workers included) and start it again."""
        code = self.proc.poll() if self.proc is not None else None
        log.warning("vLLM server on %s %s; restarting", self.url,
                    f"exited with code {code}" if code is not None else "restart requested")
        self.stop()
        self.restarts += 1
        return self.start()

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        self._healthy = False
        if proc is None:
            return
        if proc.poll() is not None:  # died: its workers (same process group) may linger
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # our own session: the server and its workers
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def backend(self, **kw: Any) -> VLLMServerBackend:
        """A ``VLLMServerBackend`` on this server (yes/no ids resolved from the local folder)."""
        from .hf_backend import answer_token_ids_for

        if "yes_token_id" not in kw:
            kw["yes_token_id"], kw["no_token_id"] = answer_token_ids_for(self.model_path)
        return VLLMServerBackend(self.base_url, self.model, **kw)

    def __enter__(self) -> ManagedVLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ManagedServerBackend(VLLMServerBackend):
    """A ``VLLMServerBackend`` that owns its ``ManagedVLLMServer`` (stopped by ``close``) and
    restarts it before a request when its process has died."""

    def __init__(self, server: ManagedVLLMServer, **kw: Any) -> None:
        from .hf_backend import answer_token_ids_for

        self.server = server.start()
        if "yes_token_id" not in kw:
            kw["yes_token_id"], kw["no_token_id"] = answer_token_ids_for(server.model_path)
        super().__init__(server.base_url, server.model, **kw)
        self.model_id = f"{Path(server.model_path).name}:{server.dtype or 'auto'}"  # the weights
        self._restart_lock = threading.Lock()
        self._closed = False

    def _before_request(self) -> None:
        if self._closed or self.server.alive():
            return
        with self._restart_lock:  # one thread restarts; the others wait, then find it alive
            if not self.server.alive():
                self.server.restart()
                self.pool.revive(self.server.base_url)

    def close(self) -> None:
        self._closed = True
        self.server.stop()
