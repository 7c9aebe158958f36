"""Yes/no scoring of one user's candidates: transformers naive vs prefix-shared, bf16, and vLLM
(prefix caching, exact yes/no logprobs), side by side in one run, with the shipped LoRA adapter.

    python bench/bench_scoring.py                      # the embedded model + shipped adapter, 12 users
    python bench/bench_scoring.py --users 3 --no-vllm  # quick
    python bench/bench_scoring.py --model tiny --users 2 --no-vllm --out /tmp/s.json   # smoke

Every variant scores the same requests, built by the recommender's own prompt: ``--users``
different preference texts (one "user" each; different texts, so vLLM's prefix cache cannot reuse
one user's prompt for the next) × ``--candidates`` candidates (cover + title). Per user and
variant one ``score_yes_no`` call is timed; the medians over users are reported.

* ``hf_naive``: transformers, every full prompt in one batch (first ``--naive-users`` users only);
* ``hf_shared``: transformers with the shared prefix run once (the reference scores, fp32);
* ``hf_shared_bf16``: the same in bfloat16;
* ``vllm`` / ``vllm_bf16``: ``VLLMInProcessBackend`` (in process, LoRA per request, prefix caching).

Parity against ``hf_shared``: max |Δp|, and the fraction of users with the same top-5 and the same
full ranking. Target: the chosen backend ≥ transformers shared in speed, |Δp| ≤ 1e-3 (fp32) /
≤ 0.01 and the same top-5 for ≥ 99% of users (bf16). Results: ``bench/results/bench_scoring.json``.
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

from _common import model_path, parity, recommend_requests, user_contexts, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHIPPED = Path(__file__).resolve().parent.parent / "mllm_msr" / "weights" / "rec_adapter"  # the paper row's


def candidates(images: list[Path], n: int):
    from mllm_msr.data.schema import Item

    genres = ("fantasy film", "western film", "mystery novel", "science fiction story", "comedy")
    return [Item(f"c{k}", f"A {genres[k % 5]}: The Silent Archive {k * 7 % 13}",
                 image_path=images[k % len(images)]) for k in range(n)]


def timed(backend, users: list[list], **kw) -> tuple[list[list[float]], list[float]]:
    scores, secs = [], []
    for reqs in users:
        t = time.perf_counter()
        scores.append(backend.score_yes_no(reqs, **kw))
        secs.append(time.perf_counter() - t)
    return scores, secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="tiny | embedded | an HF folder")
    ap.add_argument("--adapter", default="shipped",
                    help="'shipped' (mllm_msr/weights/rec_adapter; embedded only), 'none' or a peft folder")
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--naive-users", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-vllm", action="store_true", help="transformers variants only")
    ap.add_argument("--no-bf16", action="store_true", help="float32 variants only")
    ap.add_argument("--catalog", default="default", choices=["default", "alt"],
                    help="the candidates' cover vocabulary and style (mllm_msr.data.covers.CATALOGS)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_scoring.json")
    args = ap.parse_args(argv)

    from mllm_msr.data.covers import draw_cover, get_catalog
    from mllm_msr.models.devices import native_bf16
    from mllm_msr.models.hf_backend import TransformersBackend

    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    path = model_path(args.model, work)
    adapter = None
    if args.adapter == "shipped":
        adapter = str(SHIPPED) if args.model == "embedded" else None
    elif args.adapter != "none":
        adapter = args.adapter
    adapters = {"rec": adapter} if adapter else None
    catalog = get_catalog(args.catalog)
    images = []
    for k in range(args.candidates):
        p = work / f"cover{k}.png"
        draw_cover(*catalog.cycle(k), catalog=catalog).save(p)
        images.append(p)
    items = candidates(images, args.candidates)
    users = [recommend_requests(items, ctx, adapter="rec" if adapter else None)
             for ctx in user_contexts(args.users)]
    print(f"model {path}; adapter {adapter or 'none'}; {args.users} users x {args.candidates} candidates; "
          f"native bf16: {native_bf16()}")

    variants: dict[str, dict] = {}
    ref: list[list[float]] = []

    def record(name: str, scores: list[list[float]], secs: list[float], load_s: float) -> None:
        row = {"median_s": round(statistics.median(secs), 4), "users": len(secs), "load_s": round(load_s, 1)}
        if ref and name != "hf_shared":
            row.update(parity(ref[:len(scores)], scores))
        variants[name] = row
        print(f"{name:15s} {row['median_s'] * 1000:9.1f} ms/user (median of {len(secs)}; loaded in {load_s:.1f}s)"
              + (f"  max|dp| {row['max_abs_dp']:.2e}  same top-5 {row['same_top5']:.0%}  "
                 f"same ranking {row['same_ranking']:.0%}" if "max_abs_dp" in row else ""))

    for dtype in ["float32"] + ([] if args.no_bf16 else ["bfloat16"]):
        t0 = time.perf_counter()
        b = TransformersBackend(path, adapters, dtype=dtype, batch_size=args.candidates, threads=args.threads)
        load = time.perf_counter() - t0
        b.score_yes_no(users[0][:2], prefix_sharing=False)  # warm-up
        sfx = "" if dtype == "float32" else "_bf16"
        if dtype == "float32":
            s, t = timed(b, users, prefix_sharing=True)
            ref[:] = s
            record("hf_shared", s, t, load)
            s, t = timed(b, users[:args.naive_users], prefix_sharing=False)
            record("hf_naive", s, t, 0.0)
        else:
            s, t = timed(b, users, prefix_sharing=True)
            record("hf_shared" + sfx, s, t, load)
        b.close()
        del b
    if not args.no_vllm:
        from mllm_msr.models.vllm_engine import VLLMInProcessBackend

        for dtype in ["float32"] + ([] if args.no_bf16 else ["bfloat16"]):
            t0 = time.perf_counter()
            v = VLLMInProcessBackend(path, adapters, dtype=dtype, max_model_len=2048, work_dir=work / "vllm")
            load = time.perf_counter() - t0
            v.score_yes_no(recommend_requests(items[:2], "warm-up", adapter="rec" if adapter else None))
            s, t = timed(v, users)
            record("vllm" + ("" if dtype == "float32" else "_bf16"), s, t, load)
            v.close()
            del v

    base = variants["hf_naive"]["median_s"]
    ratios = {k: round(base / r["median_s"], 2) for k, r in variants.items()}
    fp32 = [k for k in variants if not k.endswith("bf16")]
    best = min(fp32, key=lambda k: variants[k]["median_s"])
    print("speed vs hf_naive: " + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()))
    print(f"fastest float32 variant: {best} (ratio {ratios[best]:.2f}x vs naive)")
    for k, r in variants.items():
        if k.endswith("bf16"):
            keeps = r["max_abs_dp"] <= 0.01 and r["same_top5"] >= 0.99
            r["keeps_results"] = keeps
            print(f"{k}: {'keeps' if keeps else 'does NOT keep'} results (|dp| <= 0.01 and same top-5 >= 99%)")
    write_result(args.out, {
        "bench": "scoring", "model": args.model, "adapter": adapter, "users": args.users,
        "candidates": args.candidates, **({} if args.catalog == "default" else {"catalog": args.catalog}),
        "native_bf16": native_bf16(), "variants": variants,
        "ratios_vs_naive": ratios, "fastest_fp32": best, "ratio": ratios[best]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
