"""Achieved prefill FLOP/s of yes/no scoring as a fraction of this CPU's measured matmul peak.

    python bench/bench_flops.py                        # the embedded composite
    python bench/bench_flops.py --model tiny --candidates 4 --matmul-n 256
    python bench/bench_flops.py --threads 2 --repeats 5

One user's 21 ``recommend`` prompts (preference summary, then each candidate's cover and title)
go through ``TransformersBackend.score_yes_no`` in one call (prefix sharing on, as in a run).
FLOPs are counted on the tokens actually run (real tokens, not padding; the shared prefix once,
images expanded to their image tokens):

    linear    2 x (LM params without the embedding table) x tokens
    attention 4 x layers x (heads x head_dim) x sum over tokens of the keys each attends to
    head      2 x hidden x vocab x rows   (the LM head runs only at each row's answer position)
    vision    2 x (vision tower params) x patches + 2 x (connector params) x image tokens

The peak is ``torch.matmul`` of two large fp32 square matrices (2 n^3 FLOPs) with the same torch
thread count, measured in the same run, interleaved with the scoring repeats (medians).

Target: achieved / peak >= 25%. Results: one JSON line in ``bench/results/bench_flops.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import model_path, recommend_requests, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 0.25
RESULTS = Path(__file__).resolve().parent / "results"
def score_requests(n: int):
    """One user's n candidates from the bundled benchmark, through the recommender's own prompt."""
    from mllm_msr.data.loaders import load_dataset

    ds = load_dataset("synth")
    return recommend_requests([it for it in ds.items.values() if it.image_path is not None][:n])


def n_params(module, skip: tuple = ()) -> int:
    return sum(p.numel() for name, p in module.named_parameters()
               if not any(s in name for s in skip))


def count_flops(b, reqs) -> dict:
    """Tokens the backend actually runs for ``reqs`` (its own plan) and their FLOPs."""
    import torch

    rendered = [b.render(r) for r in reqs]
    texts, images = [t for t, _ in rendered], [im for _, im in rendered]
    toks = [b.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    groups = b._plan(toks) if b.prefix_sharing and len(reqs) > 1 else [(list(range(len(reqs))), 0)]
    with torch.no_grad():
        enc = b._encode(texts, images, "right")
    lengths = enc["attention_mask"].sum(dim=1).tolist()  # real tokens per row, images expanded
    tokens = keys = padded = 0
    for seg, c in groups:
        c = c if (len(seg) > 1 and c >= b.min_shared_prefix) else 0
        tokens += c + sum(lengths[i] - c for i in seg)
        keys += c * (c + 1) // 2 + sum(L * (L + 1) // 2 - c * (c + 1) // 2 for L in (lengths[i] for i in seg))
        padded += c + len(seg) * (max(lengths[i] for i in seg) - c)
    m = b._hf_model()
    tc = m.config.text_config if hasattr(m.config, "text_config") else m.config
    text_model = getattr(m.model, "text_model", m.model)
    p_lin = n_params(text_model, skip=("embed_tokens",))
    layers, hidden = tc.num_hidden_layers, tc.hidden_size
    attn_dim = tc.num_attention_heads * getattr(tc, "head_dim", hidden // tc.num_attention_heads)
    vocab = b._inner_and_head()[1].weight.shape[0]
    n_img = sum(len(im) for im in images)
    fl = {"linear": 2 * p_lin * tokens, "attention": 4 * layers * attn_dim * keys,
          "head": 2 * hidden * vocab * len(reqs)}
    vision = getattr(m.model, "vision_model", None)
    if vision is not None and n_img:
        vc = m.config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        img_tokens = getattr(m.config, "image_seq_len", None) or patches // m.config.scale_factor ** 2
        fl["vision"] = (2 * n_params(vision, skip=("embeddings",)) * patches * n_img
                        + 2 * n_params(m.model.connector) * img_tokens * n_img)
    return {"rows": len(reqs), "groups": len(groups), "prefix": max(c for _, c in groups),
            "tokens": int(tokens), "padded_tokens": int(padded), "images": n_img,
            "lm_linear_params": p_lin, "flops": {k: int(v) for k, v in fl.items()},
            "total_flops": int(sum(fl.values()))}


def matmul_peak(n: int, reps: int = 3) -> float:
    """Best FLOP/s of ``reps`` fp32 n x n matmuls (torch's current thread count)."""
    import torch

    a, c = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, c)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--candidates", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="peak probe matrix size")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_flops.json")
    args = ap.parse_args(argv)

    import torch

    from mllm_msr.models.hf_backend import TransformersBackend

    work = Path(tempfile.mkdtemp(prefix="bench-flops-"))
    path = model_path(args.model, work)
    b = TransformersBackend(path, dtype="float32", batch_size=args.candidates, threads=args.threads)
    threads = torch.get_num_threads()
    reqs = score_requests(args.candidates)
    fc = count_flops(b, reqs)
    print(f"model {path}; torch threads {threads}; {fc['rows']} recommend prompts, "
          f"{fc['groups']} prefix group(s), shared prefix {fc['prefix']} tokens")
    print(f"tokens run {fc['tokens']} (padded shape {fc['padded_tokens']}), images {fc['images']}, "
          f"LM params without embeddings {fc['lm_linear_params'] / 1e6:.1f}M")
    print("FLOPs per call: " + ", ".join(f"{k} {v / 1e9:.2f}G" for k, v in fc["flops"].items())
          + f" = {fc['total_flops'] / 1e9:.2f} GFLOP")
    b.score_yes_no(reqs)  # warm-up
    matmul_peak(min(args.matmul_n, 512), 1)
    call_s, fwd_s, peaks = [], [], []
    for r in range(args.repeats):
        peaks.append(matmul_peak(args.matmul_n))
        f0 = b.stats["forward_s"]
        t = time.perf_counter()
        b.score_yes_no(reqs)
        call_s.append(time.perf_counter() - t)
        fwd_s.append(b.stats["forward_s"] - f0)
        print(f"  rep {r + 1}: matmul peak {peaks[-1] / 1e9:6.1f} GFLOP/s | scoring "
              f"{call_s[-1] * 1000:7.1f} ms = {fc['total_flops'] / call_s[-1] / 1e9:6.1f} GFLOP/s",
              flush=True)
    peak, s, fs = statistics.median(peaks), statistics.median(call_s), statistics.median(fwd_s)
    achieved = fc["total_flops"] / s
    frac = achieved / peak
    print(f"matmul peak ({args.matmul_n}^2 fp32, {threads} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"scoring: {s * 1000:.1f} ms per call -> {achieved / 1e9:.1f} GFLOP/s "
          f"(model forwards only, without rendering: {fc['total_flops'] / fs / 1e9:.1f} GFLOP/s)")
    print(f"ratio achieved/peak: {frac:.1%}  target >= {TARGET:.0%}  "
          f"{'MET' if frac >= TARGET else 'NOT MET'}")
    write_result(args.out, {
        "bench": "flops", "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
        "threads": threads, "count": fc, "call_s": round(s, 4), "forward_s": round(fs, 4),
        "achieved_gflops": round(achieved / 1e9, 2),
        "achieved_forward_gflops": round(fc["total_flops"] / fs / 1e9, 2),
        "peak_gflops": round(peak / 1e9, 2), "ratio": round(frac, 4),
        "target": TARGET, "met": frac >= TARGET})
    return 0


if __name__ == "__main__":
    sys.exit(main())
