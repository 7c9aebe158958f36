"""Time to the first answer of the interactive commands, as a new user meets them: `msr chat` and
`msr recommend` on a fresh store, then again once that user's summaries are cached.

    python bench/bench_interactive.py                  # the embedded model, the first test user
    python bench/bench_interactive.py --model tiny --set synth.n_users=20 --set synth.n_items=40 --out /tmp/i.json

Each measurement is a fresh process of the real CLI (``python -m mllm_msr.cli``), its run folder
and Chroma store in a temporary folder (the model weights are already built: installing is not
answering):

* ``chat_fresh``: `msr chat --user U` on an empty store, a message typed at the prompt; seconds
  from the process start to the first reply (``msr>``); ``chat_next``: the same session's second
  reply (a second message);
* ``chat_cached``: the same again in a new process on the store the first one filled;
* ``recommend_fresh`` / ``recommend_cached``: `msr recommend --user U` (the user's test
  candidates) on an empty store, then on the store it filled; seconds to exit (the ranked table).

Targets: ≤ 60 s fresh, ≤ 5 s cached. Results: ``bench/results/bench_interactive.json``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import bench_setup, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
FRESH_TARGET, CACHED_TARGET = 60.0, 5.0
PROMPT = "msr>"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mllm_msr.cli", *args]


def chat_times(flags: list[str], user: str, messages: list[str], timeout: float) -> tuple[list[float], str]:
    """Seconds from process start to each ``msr>`` reply, and the output."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cli("chat", "--user", user, *flags), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    times: list[float] = []
    out: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            out.append(line)
            if PROMPT in line:
                times.append(time.perf_counter() - t0)
                seen.set()
        seen.set()  # the process ended: stop waiting

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert p.stdin is not None
    for k, m in enumerate(messages):
        seen.clear()
        p.stdin.write(m + "\n")
        p.stdin.flush()
        if not seen.wait(timeout) or len(times) <= k:
            p.kill()
            print(f"no reply within {timeout}s or the chat ended:\n{''.join(out)[-2000:]}")
            return times, "".join(out)
    p.stdin.write("quit\n")
    p.stdin.close()
    p.wait(timeout=120)
    reader.join(5)
    return times, "".join(out)


def timed_run(args: list[str], timeout: float) -> tuple[float | None, str]:
    """Seconds to exit (None: still running after ``timeout``), and the output."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return time.perf_counter() - t0, p.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--user", default=None, help="user id (default: the first test user)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="msr --set key=value (repeatable)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one step may take before it counts "
                    "as not answered (recorded as this bound, flagged in 'timed_out')")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_interactive.json")
    args = ap.parse_args(argv)

    from mllm_msr.data.protocol import build_splits

    work, sets, cfg, ds = bench_setup(args.model, args.sets, "bench-interactive-")
    user = args.user or build_splits(ds, cfg.protocol).test[0].user_id
    print(f"user {user}; dataset {ds.name} ({len(ds.items)} items)", flush=True)

    def flags(store: str) -> list[str]:
        return [a for s in [*sets, f"run_dir={work / store / 'run'}", f"store.path={work / store / 'chroma'}"]
                for a in ("--set", s)]

    msgs = ["I like blue covers and fantasy films", "something with stripes please"]
    res: dict[str, float | None] = {}
    times, out = chat_times(flags("chat"), user, msgs, args.timeout)
    res["chat_fresh_s"] = times[0] if times else None
    res["chat_next_s"] = times[1] - times[0] if len(times) > 1 else None
    progress_shown = "item summaries" in out
    times, _ = chat_times(flags("chat"), user, msgs[:1], args.timeout)
    res["chat_cached_s"] = times[0] if times else None
    res["recommend_fresh_s"], rec_out = timed_run(cli("recommend", "--user", user, *flags("rec")), args.timeout)
    res["recommend_cached_s"], _ = timed_run(cli("recommend", "--user", user, *flags("rec")), args.timeout)
    # a step that did not answer within --timeout counts as the timeout (a lower bound), flagged
    timed_out = sorted(k for k, v in res.items() if v is None)
    res = {k: round(args.timeout if v is None else v, 2) for k, v in res.items()}
    for k, v in res.items():
        target = FRESH_TARGET if "fresh" in k else CACHED_TARGET
        print(f"{k:20s} {'>' if k in timed_out else ' '}{v:7.1f} s  "
              f"(target <= {target:g} s: {'met' if v <= target and k not in timed_out else 'NOT met'})")
    worst_fresh = max(res["chat_fresh_s"], res["recommend_fresh_s"])
    worst_cached = max(res["chat_cached_s"], res["recommend_cached_s"])
    ratio = round(worst_fresh / FRESH_TARGET, 3)
    print(f"ratio worst fresh / target: {ratio:.2f}; worst cached {worst_cached:.1f} s; "
          f"progress shown: {progress_shown}; timed out: {timed_out or 'none'}")
    write_result(args.out, {"bench": "interactive", "model": args.model, "user": user, "sets": args.sets,
                            **res, "ratio": ratio, "fresh_target_s": FRESH_TARGET, "cached_target_s": CACHED_TARGET,
                            "fresh_met": worst_fresh <= FRESH_TARGET, "cached_met": worst_cached <= CACHED_TARGET,
                            "progress_shown": progress_shown, "timed_out": timed_out,
                            "recommend_tail": rec_out.strip().splitlines()[-3:] if rec_out else []})
    return 0


if __name__ == "__main__":
    sys.exit(main())
