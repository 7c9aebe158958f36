"""Token counts per model call, on the real prompts and the bundled benchmark (input for docs/scaling.md).

Renders every prompt the method sends (image description, text summary, fusion, user memory
block, recommender yes/no) with the agents' own prompt files on the bundled benchmark's items and
users, and counts tokens with the SmolLM2 tokenizer (the tokenizer of the embedded model and of
SmolVLM-256M/2.2B) after the chat template. Slots a model output fills (image description, text
summary, item summaries, previous user summary) are filled with exactly their max_new_tokens cap
of one-token words: the counts are the configured worst case. Image tokens are counted per model:
the embedded 128 px composite and each GPU preset's processor (tiles x tokens per tile).

    .venv/bin/python bench/bench_tokens.py [--users 300] [--out bench/results/bench_tokens.json]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import write_result


def _stats(xs: list[int]) -> dict:
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 1), "p50": int(statistics.median(xs)), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=300, help="Users whose memory blocks and candidates are rendered.")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_tokens.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from mllm_msr.agents.user_memory import EMPTY_SUMMARY, blocks_of
    from mllm_msr.config import MSRConfig
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.models.embedded import IMAGE_SEQ_LEN, ensure_default_model
    from mllm_msr.pipeline import build_services, load_data
    from mllm_msr.presets import load_preset, preset_names
    from mllm_msr.prompting import render_items

    cfg = MSRConfig()
    ds = load_data(cfg)
    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    s = build_services(cfg.model_copy(update={"recommender": cfg.recommender.model_copy(update={"adapter": None})}),
                       ds)

    def n_text(req) -> tuple[int, int]:
        """(text tokens after the chat template, images) of one request; an image counts 0 here."""
        msgs = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]} for m in req.messages]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return len(tok(text.replace("<image>", ""))["input_ids"]), len(req.image_paths())

    def filler(n: int) -> str:
        return " ".join(["word"] * n)  # " word" is one SmolLM2 token

    ic, mc = cfg.items, cfg.memory
    items = list(ds.items.values())
    out: dict[str, dict] = {}
    image = [n_text(s.summarizer.p_image.request(it.image_path)) for it in items if it.image_path]
    out["item_image"] = {"input_text": _stats([t for t, _ in image]), "images_per_call": 1,
                         "max_new_tokens": ic.image_tokens}
    texts = [n_text(s.summarizer.p_text.request(title=it.title, text=it.text or "none"))[0] for it in items]
    out["item_text"] = {"input_text": _stats(texts), "max_new_tokens": ic.text_tokens}
    out["item_fuse"] = {"input_text": _stats([n_text(s.summarizer.p_fuse.request(
        title=it.title, image_description=filler(ic.image_tokens), text_summary=filler(ic.text_tokens)))[0]
        for it in items if it.image_path]), "max_new_tokens": ic.fuse_tokens}
    seqs = ds.sequences()
    users = ds.users[: args.users]
    block_tokens, blocks_per_user = [], []
    for u in users:
        hist = seqs[u][:-1]
        plan = blocks_of(len(hist), mc.block_size)
        blocks_per_user.append(len(plan))
        for b, (lo, hi) in enumerate(plan):
            lines = render_items([(ds.items[x.item_id].title, filler(ic.fuse_tokens)) for x in hist[lo:hi]])
            prev = EMPTY_SUMMARY if b == 0 else filler(mc.max_new_tokens)
            block_tokens.append(n_text(s.memory.p_block.request(previous_summary=prev, items=lines))[0])
    out["user_block"] = {"input_text": _stats(block_tokens), "max_new_tokens": mc.max_new_tokens,
                         "blocks_per_user": _stats(blocks_per_user),
                         "history_len": _stats([len(seqs[u]) for u in users])}
    cases = build_splits(ds, cfg.protocol).test[: args.users]
    rec = s.recommender
    text = rec.context(filler(mc.max_new_tokens))
    out["recommend"] = {"input_text": _stats([n_text(rec.request(text, ds.items[i]))[0]
                                              for c in cases[:20] for i in c.candidates]),
                        "images_per_call": 1 if rec.cfg.use_images else 0, "max_new_tokens": 1,
                        "candidates_per_user": len(cases[0].candidates) if cases else 0}
    # image tokens per image: the embedded composite (no splitting), and each preset on a cover
    per_image = {"embedded-128px": IMAGE_SEQ_LEN + 3}
    for name in preset_names():
        spec, _ = load_preset(name)
        p = spec.processor
        tiles = (-(-p.longest_edge // p.max_image_size)) ** 2 + 1 if p.do_image_splitting else 1
        # each tile: <fake_token_around_image> <row_i_col_j>|<global-img> image_seq_len x <image>, + 1 closing
        per_image[name] = tiles * (p.image_seq_len + 2) + 1
    write_result(args.out, {"tokenizer": "SmolLM2 (embedded model; SmolVLM-256M/2.2B share it)",
                            "dataset": ds.name, "items": len(items), "users_rendered": len(users),
                            "calls": out, "image_tokens_per_image": per_image,
                            "note": "output slots filled at their max_new_tokens cap (worst case)"})
    for k, v in out.items():
        print(f"{k:12s} input text tokens mean {v['input_text']['mean']:7.1f}  max {v['input_text']['max']:5d}  "
              f"output cap {v['max_new_tokens']}")
    print("image tokens per image:", per_image)


if __name__ == "__main__":
    main()
