"""User memory: one new interaction on a stored history (incremental) vs re-summarising it from
scratch, at history lengths n = 6, 30, 120, side by side.

    python bench/bench_incremental.py                  # the embedded composite (a few minutes)
    python bench/bench_incremental.py --model tiny --sizes 3 6 --max-new-tokens 4
    python bench/bench_incremental.py --sizes 6 30 120 --repeats 2

Only the memory is measured: item summaries are synthetic ``ItemSummary`` rows put directly in
the store (and read back from it). For each n:

* incremental: a store already holding the user's summary versions for the first n items (written
  by the real ``UserMemory.update_many`` code path, with a stub generator carrying the real
  model's id so the cache keys are the real ones), then ``update_many`` on the n + 1 item history
  with the real backend: expected 1 model call (one block), whatever n;
* from scratch: a fresh store, ``update_many`` on the same n + 1 item history with the real
  backend: ceil((n + 1) / block) calls, one per block, sequential (each block needs the last).

Generation uses the real backend (transformers) with a small ``--max-new-tokens``. The variants
alternate per repeat; medians. Results: one JSON line in ``bench/results/bench_incremental.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import model_path, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
GENRES = ("mystery", "romance", "comedy", "horror", "sci-fi", "fantasy", "documentary", "western")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown")
SHAPES = ("circle", "star", "square", "triangle", "ring")


class StubGenerator:
    """Fills the store through the real code path without running the model (same model_id)."""

    supports_images = False

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def generate(self, requests, **kw):
        return ["The user appears to have a preference for red mystery covers with stars."
                for _ in requests]

    def score_yes_no(self, requests):  # pragma: no cover - unused
        raise NotImplementedError


def catalog_and_summaries(n_items: int, store):
    """Synthetic items + summaries, written to and read back from the store."""
    from mllm_msr.data.schema import Item
    from mllm_msr.hashing import digest
    from mllm_msr.stores.summaries import ItemSummary

    items, rows = {}, []
    for k in range(n_items):
        iid = f"i{k}"
        g, c, s = GENRES[k % 8], COLOURS[(k * 3) % 8], SHAPES[(k * 7) % 5]
        items[iid] = Item(iid, f"Item {k}: a {g} story")
        rows.append(ItemSummary(iid, digest("bench-item", iid), f"A {g} story. The cover shows a "
                                f"{c} {s} on a plain background.", f"A {c} {s}.", f"A {g} story."))
    store.put_items(rows)
    got = store.get_items([r.key for r in rows])
    return items, {s.item_id: s for s in got.values()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[6, 30, 120], help="history lengths n")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_incremental.json")
    args = ap.parse_args(argv)

    from mllm_msr.agents.user_memory import MemoryConfig, UserHistory, UserMemory
    from mllm_msr.models.hf_backend import TransformersBackend
    from mllm_msr.stores.summaries import StoreConfig, SummaryStore

    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    path = model_path(args.model, work)
    backend = TransformersBackend(path, dtype="float32", batch_size=8, threads=args.threads)
    mcfg = MemoryConfig(block_size=args.block_size, max_new_tokens=args.max_new_tokens)
    stub = StubGenerator(backend.model_id)
    n_max = max(args.sizes) + args.repeats + 1
    stores = {}

    def store(name: str) -> SummaryStore:
        if name not in stores:
            stores[name] = SummaryStore(StoreConfig(path=str(work / name)))
        return stores[name]

    catalog, summaries = catalog_and_summaries(n_max, store("items"))
    backend.generate([UserMemory(backend, store("warm"), mcfg).p_block.request(
        previous_summary="none", items="1. <data>x</data>")], max_new_tokens=2)  # warm-up
    print(f"model {path}; block {args.block_size}, max_new_tokens {args.max_new_tokens}, "
          f"sizes {args.sizes}, {args.repeats} repeat(s)")

    rows = []
    for n in args.sizes:
        hist_ids = tuple(f"i{k}" for k in range(n))
        inc_s, inc_calls, scr_s, scr_calls = [], [], [], []
        for r in range(args.repeats):
            uid = f"user-n{n}-r{r}"
            new = f"i{n + r}"  # a different new interaction per repeat: each one really is new
            ts = tuple(float(k) for k in range(n + 1))
            # prepare (untimed): the stored history of n items, real keys, no model
            pre = store(f"inc-{n}-{r}")
            UserMemory(stub, pre, mcfg).update_many([UserHistory(uid, hist_ids, ts[:n])],
                                                    catalog, summaries)
            full = UserHistory(uid, hist_ids + (new,), ts)
            # incremental: one new interaction on the stored history
            mem = UserMemory(backend, pre, mcfg)
            t = time.perf_counter()
            v_inc = mem.update_many([full], catalog, summaries)[uid]
            inc_s.append(time.perf_counter() - t)
            inc_calls.append(mem.model_calls)
            # from scratch: a fresh store, the same n + 1 items
            mem = UserMemory(backend, store(f"scratch-{n}-{r}"), mcfg)
            t = time.perf_counter()
            v_scr = mem.update_many([full], catalog, summaries)[uid]
            scr_s.append(time.perf_counter() - t)
            scr_calls.append(mem.model_calls)
            assert v_inc.covered == v_scr.covered == full.items, "memory does not cover the history"
        row = {"n": n, "blocks": math.ceil((n + 1) / args.block_size),
               "incremental_calls": int(statistics.median(inc_calls)),
               "incremental_s": round(statistics.median(inc_s), 3),
               "scratch_calls": int(statistics.median(scr_calls)),
               "scratch_s": round(statistics.median(scr_s), 3)}
        row["ratio"] = round(row["scratch_s"] / row["incremental_s"], 2)
        rows.append(row)
        print(f"n={n:4d}: incremental {row['incremental_calls']:3d} call(s) "
              f"{row['incremental_s']:7.2f}s | from scratch {row['scratch_calls']:3d} calls "
              f"{row['scratch_s']:7.2f}s | ratio {row['ratio']:.1f}x", flush=True)
    flat = len({r["incremental_calls"] for r in rows}) == 1 and rows[0]["incremental_calls"] == 1
    linear = all(r["scratch_calls"] == r["blocks"] for r in rows)
    print(f"incremental calls flat at 1 block: {flat}; from-scratch calls = blocks (linear): {linear}")
    print(f"ratio at n={rows[-1]['n']}: {rows[-1]['ratio']:.1f}x (scratch / incremental wall time)")
    write_result(args.out, {"bench": "incremental", "date": time.strftime("%Y-%m-%d %H:%M"),
                            "model": args.model, "block_size": args.block_size,
                            "max_new_tokens": args.max_new_tokens, "rows": rows,
                            "ratio": rows[-1]["ratio"], "flat": flat, "linear": linear})
    return 0 if flat and linear else 1


if __name__ == "__main__":
    sys.exit(main())
