"""Batched vs one-at-a-time item summarization throughput (generated tokens/s), side by side.

    python bench/bench_summarize.py                    # the embedded composite (minutes)
    python bench/bench_summarize.py --model tiny --no-vllm --items 4 --max-new-tokens 8
    python bench/bench_summarize.py --model /path/to/hf/folder --repeats 3

The requests are the real ``item_image`` prompt on covers of the bundled benchmark
(``load_dataset("synth")``). Three backends, each with its variants interleaved per repeat
(medians reported), tokens counted with the model's tokenizer on the returned texts:

* transformers (``TransformersBackend``): batch 1 (one request at a time) vs batch 8 vs batch 16;
* vLLM in process (``VLLMInProcessBackend``): one ``generate`` call with all requests vs one call
  per request;
* vLLM server (``ManagedVLLMServer`` + ``VLLMServerBackend``): 1, 4 and 16 concurrent requests.

Target: the better backend's batched/concurrent throughput >= 3x its one-at-a-time throughput.
Results: one JSON line in ``bench/results/bench_summarize.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import model_path, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 3.0
RESULTS = Path(__file__).resolve().parent / "results"


def item_requests(n: int):
    """n ``item_image`` requests on the bundled benchmark's covers (distinct items)."""
    from mllm_msr.data.loaders import load_dataset
    from mllm_msr.prompting import load_prompt

    ds = load_dataset("synth")
    items = [it for it in ds.items.values() if it.image_path is not None][:n]
    p = load_prompt("item_image")
    return [p.request(it.image_path) for it in items]


def count_tokens(tok, texts: list[str]) -> int:
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def timed(fn, tok) -> tuple[float, int]:
    t = time.perf_counter()
    outs = fn()
    return time.perf_counter() - t, count_tokens(tok, outs)


def run_variants(variants: dict, tok, repeats: int) -> dict:
    """Interleave the variants per repeat; median tokens/s (and seconds, tokens) per variant."""
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            s, n = timed(fn, tok)
            runs[name].append((s, n))
            print(f"  rep {r + 1} {name:>12}: {n:5d} tokens in {s:7.2f}s = {n / s:7.1f} tok/s",
                  flush=True)
    return {k: {"tok_s": round(statistics.median(n / s for s, n in v), 2),
                "seconds": round(statistics.median(s for s, _ in v), 3),
                "tokens": int(statistics.median(n for _, n in v))} for k, v in runs.items()}


def _ratio(label: str, res: dict, fast: str, slow: str) -> float:
    """tokens/s of variant ``fast`` over ``slow``, printed."""
    r = round(res[fast]["tok_s"] / res[slow]["tok_s"], 2)
    print(f"{label}: {fast} {res[fast]['tok_s']:.1f} vs {slow} {res[slow]['tok_s']:.1f} tok/s -> ratio {r:.2f}x")
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--items", type=int, default=16, help="requests (distinct benchmark covers)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (transformers)")
    ap.add_argument("--no-vllm", action="store_true", help="transformers only (no vLLM at all)")
    ap.add_argument("--no-server", action="store_true", help="skip the vLLM server part")
    ap.add_argument("--no-inprocess", action="store_true", help="skip the in-process vLLM part")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_summarize.json")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from mllm_msr.models.hf_backend import TransformersBackend

    work = Path(tempfile.mkdtemp(prefix="bench-summarize-"))
    path = model_path(args.model, work)
    reqs = item_requests(args.items)
    tok = AutoTokenizer.from_pretrained(str(path))
    mnt = args.max_new_tokens
    print(f"model {path}; {len(reqs)} item_image requests, max_new_tokens {mnt}, "
          f"{args.repeats} interleaved repeats")
    result: dict = {"bench": "summarize", "date": time.strftime("%Y-%m-%d %H:%M"),
                    "model": args.model, "items": len(reqs), "max_new_tokens": mnt}
    ratios: dict[str, float] = {}

    # ---------------------------------------------------------------- transformers
    b = TransformersBackend(path, dtype="float32", batch_size=1, threads=args.threads)
    import torch

    result["threads"] = torch.get_num_threads()

    def hf(bs: int, backend=b):
        def go():
            backend.batch_size = bs
            return backend.generate(reqs, max_new_tokens=mnt)
        return go

    sizes = sorted({1, min(8, len(reqs)), min(16, len(reqs))})
    b.batch_size = 1
    b.generate(reqs[:1], max_new_tokens=4)  # warm-up
    print(f"transformers (torch threads {result['threads']}): batch sizes {sizes}")
    hf_res = run_variants({f"batch{s}": hf(s) for s in sizes}, tok, args.repeats)
    best = max((k for k in hf_res if k != "batch1"), key=lambda k: hf_res[k]["tok_s"], default=None)
    if best:
        ratios["transformers"] = _ratio("transformers", hf_res, best, "batch1")
    result["transformers"] = hf_res
    b.close()
    del b
    gc.collect()

    # ---------------------------------------------------------------- vLLM in process
    if not (args.no_vllm or args.no_inprocess):
        from mllm_msr.models.vllm_engine import VLLMInProcessBackend

        t0 = time.perf_counter()
        v = VLLMInProcessBackend(path, dtype="float32", max_model_len=1024, work_dir=work)
        print(f"vLLM in process: engine up in {time.perf_counter() - t0:.1f}s")
        v.generate(reqs[:1], max_new_tokens=4)  # warm-up
        res = run_variants({
            "sequential": lambda: [o for r in reqs for o in v.generate([r], max_new_tokens=mnt)],
            "batched": lambda: v.generate(reqs, max_new_tokens=mnt)}, tok, args.repeats)
        ratios["vllm"] = _ratio("vLLM in process", res, "batched", "sequential")
        result["vllm_inprocess"] = res
        v.close()
        del v
        gc.collect()

    # ---------------------------------------------------------------- vLLM server
    if not (args.no_vllm or args.no_server):
        from mllm_msr.models.vllm_server import ManagedVLLMServer

        with ManagedVLLMServer(path, max_model_len=1024, dtype="float32", work_dir=work) as srv:
            print(f"vLLM server healthy after {srv.startup_s:.1f}s")
            levels = sorted({1, min(4, len(reqs)), min(16, len(reqs))})
            backends = {c: srv.backend(max_concurrency=c, timeout=600) for c in levels}
            backends[1].generate(reqs[:1], max_new_tokens=4)  # warm-up
            res = run_variants({f"conc{c}": (lambda c=c: backends[c].generate(reqs, max_new_tokens=mnt))
                                for c in levels}, tok, args.repeats)
        top = max(levels)
        ratios["vllm_server"] = _ratio("vLLM server", res, f"conc{top}", "conc1")
        result["vllm_server"] = res

    best_name = max(ratios, key=ratios.get)
    result.update(ratios=ratios, best=best_name, ratio=ratios[best_name], target=TARGET,
                  met=ratios[best_name] >= TARGET)
    print(f"ratio (better backend: {best_name}): {ratios[best_name]:.2f}x  target >= {TARGET:g}x  "
          f"{'MET' if result['met'] else 'NOT MET'}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
