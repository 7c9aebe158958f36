"""First `msr run` vs a second run on unchanged data (everything cached), wall time and ratio.

    python bench/bench_cache.py                        # the embedded composite (a few minutes)
    python bench/bench_cache.py --model tiny --n-users 20 --n-items 40
    python bench/bench_cache.py --n-users 30 --n-items 100 --repeats 5

Both runs are ``python -m mllm_msr.cli run --quiet`` subprocesses with the same ``--set`` flags,
their run folder and Chroma store in a fresh temporary folder (so neither depends on what
``$MSR_HOME`` or ``runs/`` already hold; the model folder and the generated benchmark data are
prepared, untimed, before the first run). The first run summarises every item, builds every
user memory and scores every candidate; the second must find all of it stored. The second run is
repeated ``--repeats`` times (median). Its ``metrics.json`` must report 0 model calls.

Target: first / second >= 20x. Results: one JSON line in ``bench/results/bench_cache.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import model_path, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 20.0
RESULTS = Path(__file__).resolve().parent / "results"


def msr(args: list[str], env: dict[str, str]) -> float:
    """Run ``msr <args>`` in a subprocess; wall seconds (raises with its output on failure)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mllm_msr.cli", *args], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"msr {' '.join(args[:1])} failed with code {p.returncode}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--n-users", type=int, default=20, help="synth.n_users (10%% are test users)")
    ap.add_argument("--n-items", type=int, default=60, help="synth.n_items")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the cached (second) run")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra msr --set key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_cache.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    run_dir = work / "run"
    sets = {"run_dir": run_dir, "store.path": work / "chroma", "synth.n_users": args.n_users,
            "synth.n_items": args.n_items}
    if args.model != "embedded":
        path = model_path(args.model, work)
        sets.update({"generator.model": path, "scorer.model": path})
    else:
        path = model_path("embedded", work)  # built once (untimed) before the first run
    flags = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    for s in args.sets:
        flags += ["--set", s]
    env = dict(os.environ)

    msr(["data", "synth", *flags], env)  # benchmark data generated untimed (cached by hash)
    print(f"model {path}; synth n_users={args.n_users} n_items={args.n_items}; work {work}")
    first = msr(["run", "--quiet", *flags], env)
    m1 = json.loads((run_dir / "metrics.json").read_text())
    print(f"first  run: {first:8.2f}s  model calls {m1['model_calls']}  stages {m1['timings_s']}",
          flush=True)
    seconds, m2 = [], {}
    for r in range(args.repeats):
        seconds.append(msr(["run", "--quiet", *flags], env))
        m2 = json.loads((run_dir / "metrics.json").read_text())
        print(f"second run #{r + 1}: {seconds[-1]:6.2f}s  model calls {m2['model_calls']}", flush=True)
    second = statistics.median(seconds)
    zero = all(v == 0 for v in m2["model_calls"].values())
    same = m2["metrics"] == m1["metrics"]
    ratio = first / second
    print(f"first {first:.2f}s vs second {second:.2f}s (median of {args.repeats}) -> ratio "
          f"{ratio:.1f}x  target >= {TARGET:g}x  {'MET' if ratio >= TARGET else 'NOT MET'}")
    print(f"second run: summarization calls = {m2['model_calls']['item_summaries']} "
          f"(user {m2['model_calls']['user_summaries']}, scored {m2['model_calls']['scored_pairs']}); "
          f"all zero: {zero}; identical metrics: {same}")
    write_result(args.out, {
        "bench": "cache", "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
        "n_users": args.n_users, "n_items": args.n_items, "test_users": m1["users"],
        "first_s": round(first, 2), "second_s": round(second, 2),
        "second_runs_s": [round(s, 2) for s in seconds], "ratio": round(ratio, 2),
        "target": TARGET, "met": ratio >= TARGET, "first_model_calls": m1["model_calls"],
        "second_model_calls": m2["model_calls"], "second_zero_calls": zero,
        "identical_metrics": same})
    return 0 if zero and same else 1


if __name__ == "__main__":
    sys.exit(main())
