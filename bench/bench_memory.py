"""Peak memory of a default `msr run`, summed over its whole process tree (vLLM server included).

    python bench/bench_memory.py                       # the default `msr run` (its 100 test users), fresh store
    python bench/bench_memory.py --users 2             # quick
    python bench/bench_memory.py --backend vllm-server # both roles served by a managed vLLM server
    python bench/bench_memory.py --model tiny --users 1 --set synth.n_users=20 --set synth.n_items=40

``python -m mllm_msr.cli run --quiet`` runs in a subprocess with its run folder and Chroma store
in a fresh temporary folder (so it really loads the model and computes). Every ``--interval``
seconds the process tree under it is walked through ``/proc`` and the resident set sizes are
summed (also the proportional set sizes, which do not double-count pages shared between the
processes); the peak of each sum is reported, with ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the
largest single process) as a cross-check.

Target: peak RSS (process tree sum) < 6 GB. Results: ``bench/results/bench_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import model_path, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_GB = 6.0
RESULTS = Path(__file__).resolve().parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process (0, 0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0, 0
    pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pss = rss
    return rss, pss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--users", type=int, default=None, help="test users evaluated (msr run --users; "
                    "default: the run's own max_test_users)")
    ap.add_argument("--backend", default="default",
                    choices=["default", "transformers", "vllm", "vllm-server"],
                    help="generator + scorer backend ('default': the config's own, as `msr run` with no flag)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra msr --set key=value (repeatable)")
    ap.add_argument("--interval", type=float, default=0.25, help="sampling period, seconds")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_memory.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    sets = {"run_dir": work / "run", "store.path": work / "chroma"}
    path = model_path(args.model, work)  # built before (outside) the measured run
    if args.model != "embedded":
        sets.update({"generator.model": path, "scorer.model": path})
    if args.backend != "default":
        sets.update({"generator.backend": args.backend, "scorer.backend": args.backend})
    flags = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    for s in args.sets:
        flags += ["--set", s]
    cmd = [sys.executable, "-m", "mllm_msr.cli", "run", "--quiet",
           *(["--users", str(args.users)] if args.users else []), *flags]
    subprocess.run([sys.executable, "-m", "mllm_msr.cli", "data", "synth", *flags], check=True,
                   capture_output=True)  # benchmark data generated outside the measured run
    print(f"model {path}; backend {args.backend}; {args.users or 'default'} test user(s); sampling every "
          f"{args.interval}s")
    log = open(work / "run.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    peak_rss = peak_pss = peak_n = samples = 0
    peak_at = 0.0
    while proc.poll() is None:
        pids = tree(proc.pid)
        vals = [rss_pss(p) for p in pids]
        rss, pss = sum(v[0] for v in vals), sum(v[1] for v in vals)
        samples += 1
        if rss > peak_rss:
            peak_rss, peak_at = rss, time.perf_counter() - t0
        peak_pss = max(peak_pss, pss)
        peak_n = max(peak_n, sum(1 for v in vals if v[0]))
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    log.close()
    if proc.returncode != 0:
        sys.stderr.write((work / "run.log").read_text(errors="replace")[-4000:])
        raise SystemExit(f"msr run failed with code {proc.returncode}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    gb = peak_rss / 1e9
    print(f"msr run: {wall:.1f}s, {samples} samples, up to {peak_n} processes; model calls "
          f"{metrics['model_calls']}")
    print(f"peak RSS (process tree sum): {gb:.2f} GB at {peak_at:.0f}s; peak PSS sum "
          f"{peak_pss / 1e9:.2f} GB; largest single process (ru_maxrss) {maxrss / 1e9:.2f} GB")
    print(f"ratio peak/target: {gb / TARGET_GB:.2f} (target < {TARGET_GB:g} GB)  "
          f"{'MET' if gb < TARGET_GB else 'NOT MET'}")
    write_result(args.out, {
        "bench": "memory", "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
        "backend": args.backend, "users": metrics["users"], "wall_s": round(wall, 1),
        "peak_rss_gb": round(gb, 3), "peak_pss_gb": round(peak_pss / 1e9, 3),
        "max_single_rss_gb": round(maxrss / 1e9, 3), "processes": peak_n,
        "ratio": round(gb / TARGET_GB, 3), "target_gb": TARGET_GB, "met": gb < TARGET_GB,
        "model_calls": metrics["model_calls"], "timings_s": metrics.get("timings_s")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
