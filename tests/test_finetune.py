"""LoRA SFT of the yes/no recommender on a tiny random Idefics3 (fast, CPU)."""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mllm_msr.data.schema import Item  # noqa: E402
from mllm_msr.finetune import encoding, examples, trainer  # noqa: E402
from mllm_msr.finetune.config import SFTConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from mllm_msr.models.embedded import build_tiny_idefics3

    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny-sft") / "model")


@pytest.fixture(scope="module")
def cover(tmp_path_factory) -> Path:
    from mllm_msr.data.covers import draw_cover

    p = tmp_path_factory.mktemp("covers") / "red.jpg"
    draw_cover("red", "circle", "striped").save(p)
    return p


@pytest.fixture(scope="module")
def backend(tiny_dir):
    from mllm_msr.models.hf_backend import TransformersBackend

    return TransformersBackend(tiny_dir)


def colour_task(n: int, seed: int, cover: Path | None = None) -> list[tuple[str, Item, str]]:
    """Summaries 'likes red/blue', titles with red/blue; "yes" iff the title is red.

    The tiny model is random and frozen except for LoRA; a rule that crosses summary and title
    (XOR-like) needs ~1500 steps (AUC 0.82, 55 s measured), so the test rule reads the title."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        like, col = rng.choice(["red", "blue"]), rng.choice(["red", "blue"])
        img = cover if (cover is not None and i % 4 == 0) else None
        out.append((f"The user likes {like} items.",
                    Item(f"{seed}-{i}", f"A {col} {rng.choice(['film', 'story', 'book'])}", image_path=img),
                    "yes" if col == "red" else "no"))
    return out


def fast_cfg(out: Path, **kw) -> SFTConfig:
    base = dict(learning_rate=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0, batch_size=8,
                max_steps=120, warmup_ratio=0.05, logging_steps=10, save_steps=1000,
                output_dir=str(out), save_dtype="float32", threads=1, bf16=False)
    base.update(kw)
    return SFTConfig(**base)


def test_config_documents_every_key():
    for name, f in SFTConfig.model_fields.items():
        assert f.description, name
    assert SFTConfig().lora_r <= 16


def test_labels_cover_only_answer_and_end_token(backend, cover):
    from mllm_msr.models.base import ChatRequest

    enc = encoding.SFTEncoder(backend)
    exs = examples.build_sft_examples([
        ("likes red", Item("a", "A red film"), "yes"),
        ("likes blue", Item("b", "A blue film", image_path=cover), 0),
    ])
    tok = backend.tokenizer
    for ex, row in zip(exs, enc.encode_all(exs), strict=True):
        ids, labels = row["input_ids"], row["labels"]
        kept = (labels != -100).nonzero().flatten().tolist()
        n = ids.shape[0]
        assert kept == [n - 2, n - 1]  # answer + end-of-turn, nothing of the prompt
        assert labels[kept].tolist() == ids[kept].tolist()
        assert [tok.decode([i]) for i in ids[kept]] == [ex.label, tok.eos_token]
        assert ids[n - 2].item() == (backend.yes_token_id if ex.label == "yes" else backend.no_token_id)
        # the prompt part is exactly what inference encodes for the same request
        req = enc.recommender.request(ex.user_summary, ex.item, None)
        text, images = backend.render(req)
        inf = backend._encode([text], [images], "right")["input_ids"][0]
        assert ids[:-2].tolist() == inf.tolist()
        if ex.item.image_path is not None:
            assert row["pixel_values"].shape[0] == 1
            assert isinstance(req, ChatRequest) and req.image_paths()
    batch = encoding.SFTCollator(tok.pad_token_id)(enc.encode_all(exs))
    assert batch["pixel_values"].shape[0] == 2 and float(batch["pixel_values"][0].abs().sum()) == 0.0
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # right padding
    assert (batch["labels"][0][batch["attention_mask"][0] == 0] == -100).all()


def test_examples_from_store_positive_next_item_and_untouched_negative():
    from mllm_msr.stores.summaries import UserSummaryVersion

    class FakeStore:
        def user_history(self, u):
            def mk(step, cov):
                return UserSummaryVersion(u, step, f"k{step}", f"sum {step}", cov, 0.0, "v", "m")

            return [mk(0, ("i0", "i1", "i2")), mk(1, ("i0", "i1", "i2", "i3", "i4", "i5")),
                    mk(2, ("i0", "i1", "i2", "i3", "i4", "i5", "i6"))]

    catalog = {f"i{k}": Item(f"i{k}", f"t{k}") for k in range(30)}
    seq = [f"i{k}" for k in range(7)]
    exs = examples.examples_from_store(FakeStore(), {"u": seq}, ["u"], catalog, seed=0, positions="block_ends")
    assert [(e.user_summary, e.item.item_id, e.label) for e in exs if e.label == "yes"] == [
        ("sum 0", "i3", "yes"), ("sum 1", "i6", "yes")]  # the version covering everything has no next
    negs = [e for e in exs if e.label == "no"]
    assert len(negs) == 2 and all(e.item.item_id not in seq for e in negs)
    # every position: each next item with the latest summary that ends at or before it, and the
    # context function sees exactly the history before that position
    seen = []

    def ctx(summary, before):
        seen.append(tuple(before))
        return f"{summary} | {len(before)}"

    allpos = examples.examples_from_store(FakeStore(), {"u": seq}, ["u"], catalog, seed=0, context=ctx)
    assert [(e.user_summary, e.item.item_id) for e in allpos if e.label == "yes"] == [
        ("sum 0 | 3", "i3"), ("sum 0 | 4", "i4"), ("sum 0 | 5", "i5"), ("sum 1 | 6", "i6")]
    assert seen == [tuple(seq[:e]) for e in (3, 4, 5, 6)]
    assert sum(e.label == "no" for e in allpos) == 4
    assert all(e.item.item_id not in seq for e in allpos if e.label == "no")
    assert allpos == examples.examples_from_store(FakeStore(), {"u": seq}, ["u"], catalog, seed=0, context=ctx)


def test_popularity_negatives_follow_training_counts_and_never_draw_unseen_items():
    """negatives='popularity': negatives are drawn in proportion to training counts (one item prior
    for yes and no), items unseen in training never; seeded, so the same examples every time."""
    catalog = {f"i{k}": Item(f"i{k}", f"t{k}") for k in range(40)}
    train = {f"u{n}": [f"i{k}" for k in (0, 1, 2, n % 5 + 3)] for n in range(50)}  # i30..i39 never seen
    counts = Counter(i for seq in train.values() for i in seq)  # the Popularity row's counting
    assert counts["i0"] == 50 and counts["i3"] == 10 and "i30" not in counts
    seqs = {f"v{n}": [f"i{k}" for k in range(n % 3 + 10, n % 3 + 16)] for n in range(300)}
    texts = lambda ids: " ".join(ids)  # noqa: E731
    pop = examples.examples_from_sequences(seqs, seqs, catalog, texts, seed=0, popularity=counts)
    negs = [e.item.item_id for e in pop if e.label == "no"]
    assert len(negs) == sum(e.label == "yes" for e in pop) and set(negs) <= set(counts)
    share = {i: negs.count(i) / len(negs) for i in ("i0", "i3")}
    assert share["i0"] > 3 * share["i3"] > 0  # weights 50 vs 10 among the items each user never touched
    assert pop == examples.examples_from_sequences(seqs, seqs, catalog, texts, seed=0, popularity=counts)
    uniform = [e.item.item_id for e in examples.examples_from_sequences(seqs, seqs, catalog, texts, seed=0)
               if e.label == "no"]
    assert any(i not in counts for i in uniform)  # the paper's uniform draw does take unseen items
    touched_only = {"w": [f"i{k}" for k in range(30)]}  # every counted item touched: uniform fallback
    rest = examples.examples_from_sequences(touched_only, touched_only, catalog, texts, seed=0, popularity=counts,
                                            min_history=29)
    assert [e.item.item_id for e in rest if e.label == "no"][0] not in counts


def test_titles_examples_and_prompt_show_history_titles_only():
    """TALLRec-style rows: every position from min_history on, preference text = titles only."""
    from mllm_msr.agents.recommender import Recommender, RecommenderConfig

    catalog = {f"i{k}": Item(f"i{k}", f"title {k}", text="long text", image_path=None) for k in range(30)}
    seq = [f"i{k}" for k in range(6)]
    rec = Recommender(None, RecommenderConfig(history="titles", title_history=2, use_images=False))
    exs = examples.examples_from_sequences({"u": seq}, ["u"], catalog,
                                      lambda ids: rec.titles_context([catalog[i].title for i in ids]), seed=0)
    yes = [(e.user_summary, e.item.item_id) for e in exs if e.label == "yes"]
    assert yes == [("title 1 | title 2", "i3"), ("title 2 | title 3", "i4"), ("title 3 | title 4", "i5")]
    assert all(e.item.item_id not in seq for e in exs if e.label == "no") and len(exs) == 6
    prompt = rec.request(exs[0].user_summary, catalog["i9"]).user_content
    text = prompt if isinstance(prompt, str) else " ".join(p.get("text", "") for p in prompt)
    assert "title 1 | title 2" in text and "title 9" in text and "long text" not in text


@pytest.fixture(scope="module")
def trained(tiny_dir, cover, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "adapter"
    cfg = fast_cfg(out)
    metrics = trainer.train_sft(cfg, colour_task(256, 0, cover), tiny_dir, colour_task(64, 1, cover),
                            show_progress=False)
    return out, metrics


def test_tiny_model_learns_separable_task(trained):
    out, m = trained
    assert m["global_step"] == 120
    assert m["loss"]["last_loss"] < m["loss"]["first_loss"] - 1.0
    assert m["eval"]["auc"] > 0.9, m["eval"]
    log = json.loads((out / "train_log.json").read_text())
    assert any("loss" in r for r in log)
    # a PEFT adapter on language-model projections only, small
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("vision" in k or "connector" in k for k in keys)
    assert all(".text_model.layers." in k for k in keys)


def test_adapter_round_trip_and_merge(tiny_dir, cover, tmp_path):
    """In-memory LoRA scores == saved adapter through TransformersBackend == merged model."""
    import torch
    from peft import get_peft_model

    from mllm_msr.agents.recommender import Recommender, RecommenderConfig
    from mllm_msr.models.hf_backend import TransformersBackend

    be = TransformersBackend(tiny_dir)
    cfg = fast_cfg(tmp_path / "a")
    lc = trainer.lora_config(cfg)
    lc.init_lora_weights = False  # random A and B: a non-trivial adapter
    torch.manual_seed(0)
    model = get_peft_model(be.model, lc)
    exs = examples.build_sft_examples(colour_task(12, 3, cover))
    enc = encoding.SFTEncoder(be)
    mem = trainer.score_rows(model, enc.encode_all(exs), be.yes_token_id, be.no_token_id,
                         be.tokenizer.pad_token_id, batch_size=5)
    with model.disable_adapter():
        base = trainer.score_rows(model, enc.encode_all(exs), be.yes_token_id, be.no_token_id,
                              be.tokenizer.pad_token_id)
    assert max(abs(a - b) for a, b in zip(mem, base, strict=True)) > 1e-3  # the adapter changes scores
    adir = tmp_path / "adapter"
    model.save_pretrained(str(adir))
    del model, be

    loaded = TransformersBackend(tiny_dir, adapters={"rec": str(adir)})
    rec = Recommender(loaded, RecommenderConfig(adapter="rec"))
    got = loaded.score_yes_no([rec.request(e.user_summary, e.item, "rec") for e in exs])
    assert got == pytest.approx(mem, abs=1e-5)
    zero = loaded.score_yes_no([rec.request(e.user_summary, e.item, None) for e in exs])
    assert zero == pytest.approx(base, abs=1e-5)

    merged = trainer.merge_and_export(tiny_dir, adir, tmp_path / "merged")
    mb = TransformersBackend(merged)
    got_m = mb.score_yes_no([rec.request(e.user_summary, e.item, None) for e in exs])
    assert got_m == pytest.approx(mem, abs=1e-4)

    # fp16 adapter files (the shipped format) score within rounding
    trainer._convert_adapter_dtype(adir, "float16")
    half = TransformersBackend(tiny_dir, adapters={"rec": str(adir)})
    got_h = half.score_yes_no([rec.request(e.user_summary, e.item, "rec") for e in exs])
    assert got_h == pytest.approx(mem, abs=2e-3)


def test_training_resumes_from_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "resume"
    data = colour_task(64, 5)
    m1 = trainer.train_sft(fast_cfg(out, max_steps=4, save_steps=4, logging_steps=1), data, tiny_dir,
                       show_progress=False)
    assert m1["global_step"] == 4
    assert (out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").exists()
    m2 = trainer.train_sft(fast_cfg(out, max_steps=8, save_steps=4, logging_steps=1), data, tiny_dir,
                       resume_from_checkpoint=True, show_progress=False)
    assert m2["resumed_from"].endswith("checkpoint-4")
    assert m2["global_step"] == 8
    steps = [r["step"] for r in json.loads((out / "train_log.json").read_text()) if "loss" in r]
    assert steps == list(range(1, 9))  # the first run's log is kept, steps continue
    assert (out / "checkpoints" / "checkpoint-8").exists()


def test_jsonl_round_trip(tmp_path, cover):
    exs = examples.build_sft_examples(colour_task(6, 9, cover))
    p = examples.save_examples_jsonl(exs, tmp_path / "x.jsonl")
    back = examples.load_examples_jsonl(p)
    assert [(e.user_summary, e.item.item_id, e.item.title, e.item.image_path, e.label) for e in back] == \
           [(e.user_summary, e.item.item_id, e.item.title, e.item.image_path, e.label) for e in exs]
    with pytest.raises(ValueError):
        examples.build_sft_examples([("s", Item("x", "t"), "maybe")])


def test_top_layers_regex_keeps_vision_out():
    import re

    rx = trainer.target_regex(SFTConfig(lora_top_layers=2), 30)
    assert re.fullmatch(rx, "model.text_model.layers.29.self_attn.q_proj")
    assert re.fullmatch(rx, "model.text_model.layers.28.mlp.down_proj")
    assert not re.fullmatch(rx, "model.text_model.layers.27.mlp.down_proj")
    assert not re.fullmatch(rx, "model.vision_model.encoder.layers.29.self_attn.q_proj")
    full = trainer.target_regex(SFTConfig(lora_top_layers=0), 30)
    assert re.fullmatch(full, "model.layers.3.mlp.up_proj")  # text-only causal LMs too
    assert not re.fullmatch(full, "model.vision_model.encoder.layers.0.self_attn.k_proj")


def test_sft_overrides_parse_yaml_values_and_refuse_unknown_keys():
    from mllm_msr.config import apply_overrides

    cfg = apply_overrides(SFTConfig, ["lora_r=4", "bf16=false", "history=titles", "threads=null"])
    assert (cfg.lora_r, cfg.bf16, cfg.history, cfg.threads) == (4, False, "titles", None)
    assert apply_overrides(cfg, ["epochs=2"]).model_dump() == {**cfg.model_dump(), "epochs": 2.0}
    with pytest.raises(ValueError, match="unknown setting 'lora_rank'"):
        apply_overrides(SFTConfig, ["lora_rank=4"])
    with pytest.raises(ValueError):
        apply_overrides(SFTConfig, ["lora_r=0"])  # validated: ge=1


def test_sft_train_and_merge_commands(tiny_dir, cover, tmp_path):
    """`msr finetune sft train` from JSONL with --set overrides, then `merge`; the benchmark's
    provenance command is the `msr finetune sft benchmark` line that reproduces the run."""
    from typer.testing import CliRunner

    from mllm_msr.cli import app
    from mllm_msr.cli.finetune import benchmark_command

    data = examples.save_examples_jsonl(examples.build_sft_examples(colour_task(16, 0, cover)), tmp_path / "t.jsonl")
    out = tmp_path / "adapter"
    sets = [f"output_dir={out}", "max_steps=2", "batch_size=4", "save_steps=1000", "threads=1", "bf16=false"]
    res = CliRunner().invoke(app, ["finetune", "sft", "train", "--data", str(data), "--model-dir", str(tiny_dir),
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.rindex("\n{\n"):])["global_step"] == 2  # after the progress bar
    assert json.loads((out / "sft_config.json").read_text())["max_steps"] == 2
    merged = CliRunner().invoke(app, ["finetune", "sft", "merge", "--model-dir", str(tiny_dir), "--adapter", str(out),
                                      "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "config.json").exists()
    bad = CliRunner().invoke(app, ["finetune", "sft", "train", "--data", str(data), "--set", "lora_rank=4"])
    assert bad.exit_code == 2 and "unknown setting 'lora_rank'" in bad.output
    cmd = benchmark_command(None, ["scorer.threads=2"], ["history=titles"], Path("runs/t"), None, 100, 120, False)
    assert cmd == ("msr finetune sft benchmark --work-dir runs/t --msr-set scorer.threads=2 --set history=titles "
                   "--max-valid-users 100 --max-train-users 120")


# ------------------------------------------------------------------------------ distributed (DDP)
DDP_LOSS_TOLERANCE = 0.05  # mean |Δ loss| per logged step, 2 processes x 4 vs 1 process x 8


def _train_cli(data: Path, model: Path, out: Path, sets: list[str], procs: int, resume: bool = False) -> dict:
    """`msr finetune sft train` in a subprocess; under torchrun (gloo) when procs > 1."""
    import subprocess
    import sys

    from helpers import free_port

    cli = ["-m", "mllm_msr.cli", "finetune", "sft", "train", "--data", str(data), "--model-dir", str(model),
           *[a for s in [f"output_dir={out}", *sets] for a in ("--set", s)], *(["--resume"] if resume else [])]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if procs > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(launcher + cli, capture_output=True, text=True, env=env, timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout[res.stdout.index("\n{\n"):] if "\n{\n" in res.stdout else res.stdout)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in json.loads((out / "train_log.json").read_text()) if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_two_processes_shard_every_epoch_and_track_single_process(tiny_dir, cover, tmp_path):
    data = examples.save_examples_jsonl(examples.build_sft_examples(colour_task(64, 3, cover)), tmp_path / "d.jsonl")
    common = ["epochs=2", "learning_rate=1e-2", "lora_r=8", "lora_alpha=16", "lora_dropout=0.0", "logging_steps=1",
              "save_steps=8", "save_dtype=float32", "threads=1", "bf16=false", "log_example_order=true"]
    single = _train_cli(data, tiny_dir, tmp_path / "one", common + ["batch_size=8"], procs=1)
    ddp = _train_cli(data, tiny_dir, tmp_path / "two", common + ["batch_size=4"], procs=2)
    assert single["global_step"] == ddp["global_step"] == 16 and ddp["processes"] == 2
    # every example is drawn exactly once per epoch, across the two processes
    orders = [json.loads((tmp_path / "two" / f"example_order.rank{r}.json").read_text())["indices"] for r in (0, 1)]
    assert all(len(o) == 64 for o in orders)
    for epoch in (0, 1):
        drawn = sorted(i for o in orders for i in o[epoch * 32:(epoch + 1) * 32])
        assert drawn == list(range(64))
    assert set(orders[0][:32]).isdisjoint(orders[1][:32])
    # the loss curve stays within the stated tolerance of the single-process run (same effective batch)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert a.keys() == b.keys() == set(range(1, 17))
    gap = sum(abs(a[k] - b[k]) for k in a) / len(a)
    print(f"mean |loss(1x8) - loss(2x4)| per step = {gap:.4f}; first {a[1]:.3f}/{b[1]:.3f}, "
          f"last {a[16]:.3f}/{b[16]:.3f}")
    assert gap <= DDP_LOSS_TOLERANCE

    # a distributed checkpoint resumes in one process, and a one-process checkpoint under DDP
    half = [s.replace("epochs=2", "max_steps=8") for s in common]
    _train_cli(data, tiny_dir, tmp_path / "d2s", half + ["batch_size=4"], procs=2)
    m = _train_cli(data, tiny_dir, tmp_path / "d2s", common + ["batch_size=8"], procs=1, resume=True)
    assert m["resumed_from"].endswith("checkpoint-8") and m["global_step"] == 16 and m["processes"] == 1
    _train_cli(data, tiny_dir, tmp_path / "s2d", half + ["batch_size=8"], procs=1)
    m = _train_cli(data, tiny_dir, tmp_path / "s2d", common + ["batch_size=4"], procs=2, resume=True)
    assert m["resumed_from"].endswith("checkpoint-8") and m["global_step"] == 16 and m["processes"] == 2
    assert sorted(_losses(tmp_path / "s2d")) == list(range(1, 17))  # the log continues across the switch
