"""Prefix-shared vs naive yes/no scoring of one user's candidates, side by side in one run.

    python bench/bench_scoring.py                      # tiny random Idefics3 (seconds)
    python bench/bench_scoring.py --model embedded     # the real SmolLM2 + vision composite
    python bench/bench_scoring.py --model /path/to/hf/folder --candidates 21 --repeats 5

Both paths score the same 21 requests, built by the recommender's own prompt (preference text and
question shared, then each candidate's cover and title), with the transformers backend in ONE batch; the
timings alternate naive / shared per repeat and report medians, the speedup, and max |Δ score|.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import model_path, recommend_requests  # noqa: E402


def requests(images: list[Path], n: int):
    """n candidates with the given covers, through the recommender's own prompt."""
    from mllm_msr.data.schema import Item

    genres = ("fantasy film", "western film", "mystery novel", "science fiction story", "comedy")
    return recommend_requests([Item(f"c{k}", f"A {genres[k % 5]}: The Silent Archive {k * 7 % 13}",
                                    image_path=images[k % len(images)]) for k in range(n)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | embedded | an HF folder")
    ap.add_argument("--candidates", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    from mllm_msr.data.covers import COLOURS, PATTERNS, SHAPES, draw_cover
    from mllm_msr.models.hf_backend import TransformersBackend

    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    path = model_path(args.model, work)
    images = []
    for k in range(args.candidates):
        p = work / f"cover{k}.png"
        draw_cover(list(COLOURS)[k % 8], SHAPES[k % 5], PATTERNS[k % 3]).save(p)
        images.append(p)

    t0 = time.perf_counter()
    b = TransformersBackend(path, dtype=args.dtype, batch_size=args.candidates,
                            threads=args.threads)
    print(f"model {path} loaded in {time.perf_counter() - t0:.1f}s "
          f"(torch threads {__import__('torch').get_num_threads()})")
    reqs = requests(images, args.candidates)
    toks = [b.tokenizer(b.render(r)[0], add_special_tokens=False)["input_ids"] for r in reqs]
    plan = b._plan(toks)
    c = max(c for _, c in plan)
    print(f"{len(reqs)} candidates, prompt tokens (before image expansion) "
          f"{min(map(len, toks))}-{max(map(len, toks))}, shared prefix {c} tokens in {len(plan)} group(s)")
    b.score_yes_no(reqs[:2], prefix_sharing=False)  # warm-up
    groups0 = b.stats["prefix_groups"]
    naive_t, shared_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        naive = b.score_yes_no(reqs, prefix_sharing=False)
        naive_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        shared = b.score_yes_no(reqs, prefix_sharing=True)
        shared_t.append(time.perf_counter() - t)
    tn, ts = statistics.median(naive_t), statistics.median(shared_t)
    delta = max(abs(a - s) for a, s in zip(naive, shared, strict=True))
    rank_same = sorted(range(len(naive)), key=lambda i: -naive[i]) == \
        sorted(range(len(shared)), key=lambda i: -shared[i])
    print(f"naive  scoring: {tn * 1000:8.1f} ms  (median of {args.repeats})")
    print(f"shared scoring: {ts * 1000:8.1f} ms  (prefix groups per call: "
          f"{(b.stats['prefix_groups'] - groups0) / args.repeats:g})")
    print(f"speedup: {tn / ts:.2f}x   max |delta score|: {delta:.2e}   same ranking: {rank_same}")
    return 0 if delta < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
