"""Load on the interactive paths (issue #16): `msr web` and `langgraph dev`, on loopback only.

    python bench/bench_load.py                        # tiny random model, 200 requests per server
    python bench/bench_load.py --requests 40 --clients 4 --users 8     # smoke

Each server is started as a subprocess on 127.0.0.1 (a free port) with a small benchmark
(``synth.n_users=200`` -> 20 test users, ``synth.n_items=60``), the tiny random Idefics3 model
(zero-shot; the model is not the point here) and its own Chroma folder in a temporary folder.
Every user's page / pipeline is requested once first (warm-up, not timed: it builds the user's
memory). Then ``--requests`` requests go out from ``--clients`` concurrent clients over
``--users`` users, half recommendations and half chat feedback, in a seeded random order:

* `msr web`: ``GET /user/{id}`` (the pipeline ranks the candidates) or ``POST /user/{id}/chat``
  (feedback folded into the memory; the 303 answer is not followed). Users are drawn at random for
  every request, so one user's requests may run concurrently.
* `langgraph dev`, through the LangGraph SDK: a ``pipeline`` run or a ``chat`` run, each user with
  one pipeline thread and one chat thread; each client owns ``users / clients`` users (a
  LangGraph thread takes one run at a time, as one browser session would).

Checks after the load (servers stopped, the store read from its folder):

* no feedback version lost: every chat request answered OK left exactly one stored ``feedback``
  summary version for its user (versions counted per user);
* none attached to the wrong user: each feedback version covers exactly its user's history;
* (langgraph) no thread's checkpoint mixes users: every checkpoint of a thread holds its user's id,
  and every chat message in a thread carries that thread's user's marker; each chat thread holds
  one human message per chat request sent to it.

Reports p50 / p95 latency (ms) overall and per kind, and the error count. Result: one JSON line in
``bench/results/load.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from _common import model_path, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MARK = re.compile(r"\[u=(\S+) n=(\d+)\]")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no answer from {url}: {log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p95_ms": None}
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1)}


def summary(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    row = {"requests": len(results), "errors": len(results) - len(ok),
           "error_kinds": dict(Counter(r["error"] for r in results if not r["ok"])),
           **percentiles([r["ms"] for r in ok])}
    for kind in ("recommend", "chat"):
        sub = [r["ms"] for r in ok if r["kind"] == kind]
        row[kind] = {"requests": sum(r["kind"] == kind for r in results), **percentiles(sub)}
    return row


def plan(n: int, users: list[str], seed: int) -> list[tuple[int, str, str]]:
    """(request number, user, kind): half recommend, half chat, seeded order."""
    rng = random.Random(seed)
    kinds = ["recommend", "chat"] * (n // 2) + ["recommend"] * (n % 2)
    rng.shuffle(kinds)
    return [(i, rng.choice(users), k) for i, k in enumerate(kinds)]


async def run_clients(requests: list[tuple[int, str, str]], clients: int, call) -> list[dict]:
    """``clients`` workers take requests from one queue; ``call(i, user, kind)`` does one."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    out: list[dict] = []

    async def worker() -> None:
        while not queue.empty():
            i, user, kind = queue.get_nowait()
            t = time.perf_counter()
            try:
                await call(i, user, kind)
                res = {"ok": True, "error": None}
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                res = {"ok": False, "error": type(e).__name__}
            out.append({"i": i, "user": user, "kind": kind, "ms": (time.perf_counter() - t) * 1000, **res})

    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


def check_feedback(store_path: Path, histories: dict[str, list[str]], chats_ok: Counter) -> dict:
    """Feedback versions per user vs the chat requests answered OK; each covers its user's history."""
    from mllm_msr.stores.summaries import StoreConfig, SummaryStore

    store = SummaryStore(StoreConfig(path=str(store_path)))
    lost, extra, wrong, stored = 0, 0, 0, 0
    for user, hist in histories.items():
        fb = [v for v in store.user_history(user) if v.source == "feedback"]
        stored += len(fb)
        lost += max(0, chats_ok[user] - len(fb))
        extra += max(0, len(fb) - chats_ok[user])
        wrong += sum(v.user_id != user or list(v.covered) != hist for v in fb)
    return {"feedback_versions": stored, "feedback_lost": lost, "feedback_unexpected": extra,
            "feedback_wrong_user": wrong}


# ---- msr web -----------------------------------------------------------------------------------------
def bench_web(args, flags: list[str], env: dict, histories: dict[str, list[str]], work: Path) -> dict:
    import httpx

    port = free_port()
    log = work / "web.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mllm_msr.cli", "web", "--host", "127.0.0.1", "--port",
                                 str(port), "--users", str(args.users), *flags, "--set",
                                 f"store.path={work / 'web-chroma'}"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/", proc, log)
        users = list(histories)

        async def go() -> list[dict]:
            # idle connections expire before uvicorn's 5 s keep-alive does: no request is sent on a
            # connection the server is closing
            limits = httpx.Limits(keepalive_expiry=1.0)
            async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
                for u in users:  # warm-up: builds each user's memory
                    (await http.get("/user/" + quote(u, safe=""))).raise_for_status()

                async def call(i: int, user: str, kind: str) -> None:
                    if kind == "recommend":
                        r = await http.get("/user/" + quote(user, safe=""))
                        r.raise_for_status()
                        if "id='recs'" not in r.text:
                            raise ValueError("no recommendations on the page")
                    else:
                        r = await http.post(f"/user/{quote(user, safe='')}/chat",
                                            data={"message": f"more like the blue ones [u={user} n={i}]"})
                        if r.status_code != 303:
                            raise httpx.HTTPStatusError(str(r.status_code), request=r.request, response=r)

                t = time.perf_counter()
                res = await run_clients(plan(args.requests, users, args.seed), args.clients, call)
                print(f"web: {len(res)} requests in {time.perf_counter() - t:.1f}s", flush=True)
                return res

        results = asyncio.run(go())
    finally:
        stop(proc)
    chats = Counter(r["user"] for r in results if r["ok"] and r["kind"] == "chat")
    return {**summary(results), **check_feedback(work / "web-chroma", histories, chats)}


# ---- langgraph dev --------------------------------------------------------------------------------------
def bench_langgraph(args, cfg: dict, env: dict, histories: dict[str, list[str]], cases: dict, work: Path) -> dict:
    import yaml
    from langgraph_sdk import get_client

    (work / "lg.yaml").write_text(yaml.safe_dump({**cfg, "store": {"path": str(work / "lg-chroma")}}))
    port = free_port()
    log = work / "langgraph.log"
    cli = Path(sys.executable).parent / "langgraph"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(cli), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port",
                                 str(port), "--config", str(ROOT / "langgraph.json")],
                                cwd=ROOT, env={**env, "MSR_CONFIG": str(work / "lg.yaml")}, stdout=fh,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    users = list(histories)
    try:
        wait_up(base + "/ok", proc, log)

        async def go():
            client = get_client(url=base, timeout=600)
            threads: dict[tuple[str, str], str] = {}
            for u in users:
                for graph in ("pipeline", "chat"):
                    t = await client.threads.create(metadata={"user": u, "graph": graph})
                    threads[u, graph] = t["thread_id"]

            def pipeline_input(u: str) -> dict:
                c = cases[u]
                return {"user_id": u, "history": list(c.history), "history_timestamps": list(c.history_timestamps),
                        "candidates": list(c.candidates)}

            for u in users:  # warm-up: builds each user's memory
                await client.runs.wait(threads[u, "pipeline"], "pipeline", input=pipeline_input(u))

            async def call(i: int, user: str, kind: str) -> None:
                if kind == "recommend":
                    out = await client.runs.wait(threads[user, "pipeline"], "pipeline", input=pipeline_input(user),
                                                 raise_error=True)
                    if len(out.get("ranking", [])) != len(cases[user].candidates):
                        raise ValueError("incomplete ranking")
                else:
                    out = await client.runs.wait(threads[user, "chat"], "chat", raise_error=True, input={
                        "user_id": user, "history": histories[user],
                        "messages": [{"role": "user", "content": f"more like the blue ones [u={user} n={i}]"}]})
                    if not out.get("messages"):
                        raise ValueError("no answer")

            # each client owns users[c::clients]: one run at a time per thread
            reqs = plan(args.requests, users, args.seed)
            owned = [[r for r in reqs if users.index(r[1]) % args.clients == c] for c in range(args.clients)]
            t0 = time.perf_counter()
            parts = await asyncio.gather(*(run_clients(o, 1, call) for o in owned))
            res = [r for p in parts for r in p]
            print(f"langgraph: {len(res)} requests in {time.perf_counter() - t0:.1f}s", flush=True)

            mixed, markers_missing = 0, 0
            sent = Counter((r["user"], "chat") for r in res if r["kind"] == "chat")
            for (u, graph), tid in threads.items():
                history = await client.threads.get_history(tid, limit=1000)
                owners = {s["values"].get("user_id") for s in history if s.get("values")} - {None}
                state = await client.threads.get_state(tid)
                marks = [MARK.search(str(m.get("content", ""))) for m in state["values"].get("messages", [])
                         if m.get("type") == "human"]
                mixed += int(owners != {u} or any(m is None or m.group(1) != u for m in marks))
                markers_missing += abs(len(marks) - sent[u, graph]) if graph == "chat" else 0
            return res, mixed, markers_missing

        results, mixed, missing = asyncio.run(go())
    finally:
        stop(proc)
    chats = Counter(r["user"] for r in results if r["ok"] and r["kind"] == "chat")
    return {**summary(results), "threads": 2 * len(users), "threads_mixing_users": mixed,
            "chat_messages_missing_from_threads": missing,
            **check_feedback(work / "lg-chroma", histories, chats)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | embedded | an HF folder")
    ap.add_argument("--requests", type=int, default=200, help="requests per server")
    ap.add_argument("--clients", type=int, default=10, help="concurrent clients")
    ap.add_argument("--users", type=int, default=20, help="users (the first test users; n_users = 10x this)")
    ap.add_argument("--n-items", type=int, default=60, help="synth.n_items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["web", "langgraph"], default=None, help="run one server only")
    ap.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    env = {**os.environ, "MSR_HOME": str(work / "home"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1"}
    os.environ.update({k: env[k] for k in ("MSR_HOME", "HF_HUB_OFFLINE")})
    path = model_path(args.model, work)
    cfg = {"generator": {"model": str(path)}, "scorer": {"model": str(path)}, "recommender": {"adapter": None},
           "synth": {"n_users": 10 * args.users, "n_items": args.n_items}}
    flags = ["--set", f"generator.model={path}", "--set", f"scorer.model={path}", "--set", "recommender.adapter=null",
             "--set", f"synth.n_users={10 * args.users}", "--set", f"synth.n_items={args.n_items}"]

    from mllm_msr.config import load_config
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.pipeline import finalize_config, load_data

    mcfg = finalize_config(load_config(None, flags[1::2]))
    test = build_splits(load_data(mcfg), mcfg.protocol).test[: args.users]
    cases = {c.user_id: c for c in test}
    histories = {c.user_id: list(c.history) for c in test}
    print(f"{len(histories)} users, {args.requests} requests per server, {args.clients} clients; work {work}",
          flush=True)

    row: dict = {"bench": "load", "model": args.model, "users": len(histories), "clients": args.clients,
                 "requests_per_server": args.requests, "seed": args.seed, "n_items": args.n_items}
    if args.only in (None, "web"):
        row["web"] = bench_web(args, flags, env, histories, work)
        print("web:", json.dumps(row["web"]), flush=True)
    if args.only in (None, "langgraph"):
        row["langgraph"] = bench_langgraph(args, cfg, env, histories, cases, work)
        print("langgraph:", json.dumps(row["langgraph"]), flush=True)
    parts = [row[k] for k in ("web", "langgraph") if k in row]
    ok = all(p["errors"] == 0 and p["feedback_lost"] == 0 and p["feedback_wrong_user"] == 0
             and p.get("threads_mixing_users", 0) == 0 for p in parts)
    write_result(args.out, {**row, "ok": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
