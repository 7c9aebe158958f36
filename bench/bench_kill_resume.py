"""SIGKILL at random points of a small `msr run`, resuming each time (issue #16).

    python bench/bench_kill_resume.py                      # 20 kills, tiny random model (~10 min)
    python bench/bench_kill_resume.py --kills 3 --n-users 20 --n-items 30   # smoke

A clean `msr run` (fresh store and run folder) is the reference. Then the same run on another
fresh folder is started and SIGKILLed ``--kills`` times at random moments, resumed each time, and
finally run to the end. Every 5th kill falls uniformly in start-up (imports, data, Chroma open,
model load); the others come 0-0.1 s after a random number of the attempt's own events (model
requests and store writes): the gaps between sorted random positions over the clean run's events,
so the kills spread over item summaries, user memories and scoring, mid-batch or between batches.

Every attempt runs `msr run` through this script's ``--child`` mode, which logs each store write
(the keys of the item / user summaries written, after Chroma accepted them) and each model request
to a shared JSON-lines file; a line is in the kernel's page cache as soon as it is written, so a
SIGKILL does not lose it. Checks:

* the final ``metrics.json`` equals the clean run's, field by field;
* the store holds exactly the clean run's item and user summary keys;
* no stored summary was ever recomputed: across all attempts each key was written exactly once
  (a summary is written only after it is computed, so a second write would be a recomputation);
* model requests wasted by the kills (requests in flight when killed): total minus the clean run's.

Result: one JSON line in ``bench/results/kill_resume.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import model_path, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOG_ENV = "MSR_KILL_LOG"


# ---- child: `msr run` with its store writes and model requests logged ----------------------------
def _log(kind: str, **fields) -> None:
    with open(os.environ[LOG_ENV], "a") as fh:
        fh.write(json.dumps({"t": time.time(), "pid": os.getpid(), "kind": kind, **fields}) + "\n")


def child(argv: list[str]) -> None:
    from mllm_msr.cli import app
    from mllm_msr.models.hf_backend import TransformersBackend
    from mllm_msr.stores.summaries import SummaryStore

    put_items, put_users = SummaryStore.put_items, SummaryStore.put_user_versions
    generate, score = TransformersBackend.generate, TransformersBackend.score_yes_no

    def logged_items(self, summaries, extra=None):
        rows = list(summaries)
        put_items(self, rows, extra)
        _log("items", keys=[s.key for s in rows])

    def logged_users(self, versions):
        rows = list(versions)
        put_users(self, rows)
        _log("users", keys=[v.key for v in rows])

    def logged_generate(self, requests, **kw):
        _log("generate", n=len(requests))
        return generate(self, requests, **kw)

    def logged_score(self, requests):
        _log("score", n=len(requests))
        return score(self, requests)

    SummaryStore.put_items, SummaryStore.put_user_versions = logged_items, logged_users  # type: ignore[method-assign]
    TransformersBackend.generate, TransformersBackend.score_yes_no = logged_generate, logged_score  # type: ignore[method-assign]
    _log("start")
    app(argv, standalone_mode=True)


# ---- parent ----------------------------------------------------------------------------------------
def _events(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []


def _kill_after(proc: subprocess.Popen, log: Path, delay: float, events: int | None) -> float | None:
    """SIGKILL ``proc`` ``delay`` s after its start, or (``events`` set) ``delay`` s after it logged
    its ``events``-th model request / store write; seconds since start at the kill, None if it
    ended first."""
    t0 = time.time()

    def work_events() -> int:
        return sum(e["pid"] == proc.pid and e["kind"] != "start" for e in _events(log))

    if events is not None:
        while proc.poll() is None and work_events() < events:
            time.sleep(0.01)
        t1 = time.time()
        while proc.poll() is None and time.time() - t1 < delay:
            time.sleep(0.01)
    else:  # a start-up kill comes at the latest with the first model request or store write
        while proc.poll() is None and time.time() - t0 < delay and work_events() == 0:
            time.sleep(0.01)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.time() - t0


def _cmd(flags: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", "run", "--quiet", *flags]


def _store_keys(path: Path) -> dict[str, set[str]]:
    import chromadb

    client = chromadb.PersistentClient(path=str(path))
    return {name: set(client.get_collection(name).get(include=[])["ids"])
            for name in ("item_summaries", "user_summaries")}


def _scores(run_dir: Path) -> dict[str, list]:
    rows = [json.loads(x) for x in (run_dir / "scores.jsonl").read_text().splitlines() if x.strip()]
    return {r["user_id"]: r["scores"] for r in rows}


def _writes(events: list[dict]) -> Counter:
    return Counter(k for e in events if e["kind"] in ("items", "users") for k in e["keys"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | embedded | an HF folder")
    ap.add_argument("--n-users", type=int, default=30, help="synth.n_users (10%% are test users)")
    ap.add_argument("--n-items", type=int, default=50, help="synth.n_items")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs before the final, uninterrupted attempt")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--out", type=Path, default=RESULTS / "kill_resume.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-kill-"))
    path = model_path(args.model, work)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "MSR_HOME": str(work / "home")}

    def flags(name: str) -> list[str]:
        sets = {"run_dir": work / name, "store.path": work / name / "chroma", "synth.n_users": args.n_users,
                "synth.n_items": args.n_items, "items.batch_size": 4, "generator.model": path,
                "scorer.model": path}
        return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    # reference: one uninterrupted run
    clean_log = work / "clean.jsonl"
    t0 = time.time()
    done = subprocess.run(_cmd(flags("clean")), env={**env, LOG_ENV: str(clean_log)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    clean_s = time.time() - t0
    ev = _events(clean_log)
    startup = ev[1]["t"] - ev[0]["t"] if len(ev) > 1 else clean_s
    work_s = max(1.0, ev[-1]["t"] - ev[1]["t"]) if len(ev) > 1 else 1.0
    ref = json.loads((work / "clean" / "metrics.json").read_text())
    print(f"clean run {clean_s:.1f}s (start-up {startup:.1f}s, work {work_s:.1f}s), model calls {ref['model_calls']}",
          flush=True)

    # the same run, killed at random points, resumed each time. Kill points: every 5th in start-up;
    # the others after a random number of the attempt's own events (model requests, store writes),
    # the gaps between sorted random positions over the clean run's events, so they spread over
    # the run (positions over the first 70% of its events: an attempt also gets a little further
    # than its kill point, and the series must not finish before its last kill).
    rng = random.Random(args.seed)
    n_work = len(ev) - 1
    n_startup = args.kills // 5
    positions = sorted(rng.sample(range(1, max(args.kills, int(0.7 * n_work))), args.kills - n_startup))
    gaps = [b - a for a, b in zip([0, *positions], positions, strict=False)]
    slots = [None if k % 5 == 0 and k // 5 < n_startup else gaps.pop(0) for k in range(args.kills)]
    log = work / "killed.jsonl"
    kills: list[dict] = []
    for attempt, events_before_kill in enumerate(slots, 1):
        delay = rng.uniform(0.0, startup) if events_before_kill is None else rng.uniform(0.0, 0.1)
        with open(work / "attempt.err", "w") as err:
            proc = subprocess.Popen(_cmd(flags("killed")), env={**env, LOG_ENV: str(log)},
                                    stdout=subprocess.DEVNULL, stderr=err)
            killed_at = _kill_after(proc, log, delay, events_before_kill)
        if killed_at is None:
            if proc.returncode != 0:
                raise SystemExit(f"attempt {attempt} failed: {(work / 'attempt.err').read_text()[-4000:]}")
            print(f"attempt {attempt} finished before its kill point", flush=True)
            break
        new = [e for e in _events(log) if e["pid"] == proc.pid]
        stage = next((e["kind"] for e in reversed(new) if e["kind"] != "start"), "start-up")
        kills.append({"phase": "start-up" if events_before_kill is None else f"after {events_before_kill} events",
                      "at_s": round(killed_at, 2), "last_event": stage,
                      "writes": sum(len(e.get("keys", ())) for e in new)})
        print(f"kill {len(kills):2d} at {killed_at:5.1f}s ({kills[-1]['phase']}; last event: {stage}, "
              f"{kills[-1]['writes']} summaries written)", flush=True)
    attempts, finished_early = len(kills), int(len(kills) < args.kills)
    final = subprocess.run(_cmd(flags("killed")), env={**env, LOG_ENV: str(log)}, capture_output=True, text=True)
    if final.returncode != 0:
        raise SystemExit(final.stderr[-4000:])
    got = json.loads((work / "killed" / "metrics.json").read_text())

    events = _events(log)
    writes = _writes(events)
    stored = _store_keys(work / "killed" / "chroma")
    ref_stored = _store_keys(work / "clean" / "chroma")
    recomputed = sorted(k for k, n in writes.items() if n > 1)
    requests = sum(e["n"] for e in events if e["kind"] in ("generate", "score"))
    ref_requests = sum(e["n"] for e in ev if e["kind"] in ("generate", "score"))
    # metrics both runs report (the shared checkout may gain a metric while the bench runs), and
    # every scored row
    common = sorted(set(got["metrics"]) & set(ref["metrics"]))
    same_metrics = [got["metrics"][k] for k in common] == [ref["metrics"][k] for k in common]
    same_scores = _scores(work / "killed") == _scores(work / "clean")
    same_store = stored == ref_stored
    row = {
        "bench": "kill_resume", "model": args.model, "n_users": args.n_users, "n_items": args.n_items,
        "test_users": ref["users"], "kills": len(kills), "attempts": attempts + 1, "finished_early": finished_early,
        "seed": args.seed, "clean_s": round(clean_s, 1), "startup_s": round(startup, 1),
        "identical_metrics": same_metrics, "metrics_compared": common, "identical_scores": same_scores,
        "metrics": got["metrics"], "clean_metrics": ref["metrics"],
        "identical_store_keys": same_store,
        "stored": {k: len(v) for k, v in stored.items()},
        "summaries_written": sum(writes.values()), "summaries_recomputed": len(recomputed),
        "model_requests_all_attempts": requests, "model_requests_clean": ref_requests,
        "model_requests_wasted_by_kills": requests - ref_requests,
        "kill_points": kills,
    }
    print(f"{len(kills)} kills: identical metrics {same_metrics}, scores {same_scores}, store {same_store}, "
          f"summaries recomputed {len(recomputed)}, wasted model requests {requests - ref_requests} "
          f"of {ref_requests}")
    ok = same_metrics and same_scores and same_store and not recomputed and len(kills) == args.kills
    write_result(args.out, {**row, "ok": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
