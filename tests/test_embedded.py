"""The embedded Idefics3 composite (mllm_msr.models.embedded) and its alignment stage
(mllm_msr.finetune.align). Fast tests use the tiny random model; real weights are @slow."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

torch = pytest.importorskip("torch")

from mllm_msr.data import covers  # noqa: E402
from mllm_msr.finetune import align as A  # noqa: E402
from mllm_msr.models import embedded as E  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return E.build_tiny_idefics3(tmp_path_factory.mktemp("tiny") / "tiny-idefics3")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return E.load_model(tiny_dir)


def _chat(prompt="Describe the cover in one sentence.", part="image"):
    return [{"role": "user", "content": [{"type": part}, {"type": "text", "text": prompt}]}]


# ------------------------------------------------------------------------------------- fast
def test_tiny_folder_tokenizer_and_template(tiny_dir, tiny):
    model, proc = tiny
    tok = proc.tokenizer
    for w in ("yes", "no"):
        assert len(tok.tokenize(w)) == 1
    assert all(t in tok.get_vocab() for t in E.IDEFICS3_TOKENS)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(tok)
    for part in ("image", "image_url"):
        text = proc.apply_chat_template(_chat(part=part), add_generation_prompt=True)
        assert text.count("<image>") == 1 and text.endswith("<|im_start|>assistant\n")
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "idefics3" and cfg["text_config"]["head_dim"] == 32


def test_tiny_generates_with_an_image(tiny):
    model, proc = tiny
    img = covers.draw_cover("red", "star", "dotted", rng=random.Random(1))
    text = proc.apply_chat_template(_chat(), add_generation_prompt=True)
    enc = proc(text=[text], images=[[img]], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == E.IMAGE_SEQ_LEN == 16
    assert tuple(enc["pixel_values"].shape[-2:]) == (128, 128)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 6
    # the image changes the output distribution
    img2 = covers.draw_cover("blue", "ring", "solid", rng=random.Random(2))
    enc2 = proc(text=[text], images=[[img2]], return_tensors="pt")
    with torch.no_grad():
        l1 = model(**enc).logits[0, -1]
        l2 = model(**enc2).logits[0, -1]
    assert not torch.allclose(l1, l2)


def test_vision_weights_roundtrip(tiny, tmp_path):
    model, _ = tiny
    path = E.save_vision_weights(model, tmp_path / "v.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    assert sd and all(k.startswith(E.VISION_PREFIXES) and v.dtype == torch.float16 for k, v in sd.items())
    before = {k: v.clone() for k, v in E.vision_state_dict(model).items()}
    with torch.no_grad():
        for v in E.vision_state_dict(model).values():
            v.zero_()
    E.load_vision_weights(model, path)
    for k, v in E.vision_state_dict(model).items():
        assert torch.allclose(v, before[k], atol=1e-2, rtol=1e-2)


def test_alignment_masks_the_prompt(tiny):
    _, proc = tiny
    img, cap = A.render(("green", "triangle", "striped", 5))
    ex = A.encode_example(proc, img, cap, A.CAPTION_PROMPTS[1])
    lab = ex["labels"]
    n = int((lab != -100).sum())
    assert (lab[:-n] == -100).all() and (lab[-n:] != -100).all()
    assert proc.tokenizer.decode(lab[-n:]) == cap + "<|im_end|>"
    assert torch.equal(ex["input_ids"][-n:], lab[-n:])
    assert int((ex["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 16
    assert "<image>" not in proc.tokenizer.decode(lab[-n:])


def test_prefix_cache_gives_the_same_loss(tiny):
    model, proc = tiny
    cfg = A.AlignConfig(batch_size=3)
    batch = A.batch_for_step(cfg, A.make_pairs(12, 0), proc, 0)
    pc = A.PrefixCache(proc.tokenizer.convert_tokens_to_ids("<fake_token_around_image>"))
    assert A._shared_prefix_len(batch["input_ids"], pc.image_start_id) > 5
    with torch.no_grad():
        assert abs(float(A.caption_loss(model, batch)) - float(A.caption_loss(model, batch, pc))) < 1e-4


def test_data_covers_every_combination_and_heldout_is_disjoint():
    pairs = A.make_pairs(240, 0)
    assert {p[:3] for p in pairs} == set(A.all_combos()) and len(A.all_combos()) == 120
    held = A.heldout_pairs(60, 1234)
    assert not {p[3] for p in held} & {p[3] for p in pairs}
    alt = covers.ALT_CATALOG
    alt_pairs = A.make_pairs(240, 0, alt)  # the alt catalog: its own combinations, the same jitter stream
    assert {p[:3] for p in alt_pairs} == set(A.all_combos(alt)) and not set(A.all_combos(alt)) & set(A.all_combos())
    assert [p[3] for p in alt_pairs] == [p[3] for p in pairs]
    img, cap = A.render(alt_pairs[0], alt)
    assert cap == covers.caption(*alt_pairs[0][:3], alt) and covers.parse_caption(cap, alt)["colour"] == alt_pairs[0][0]
    assert A.chance(alt) == A.chance() == {"colour": 1 / 8, "shape": 1 / 5, "pattern": 1 / 3}


def test_alignment_batches_render_the_configured_catalog(tiny):
    _, proc = tiny
    cfg = A.AlignConfig(batch_size=2, catalog="alt")
    batch = A.batch_for_step(cfg, A.make_pairs(4, 0, covers.ALT_CATALOG), proc, 0)
    for labels in batch["labels"]:
        text = proc.tokenizer.decode(labels[labels != -100])
        got = covers.parse_caption(text, covers.ALT_CATALOG)
        assert None not in got.values() and text.endswith("on a dark poster.<|im_end|>"), text
    # the default run's checkpoint folder (config hash) predates catalogs
    assert A._config_hash(A.AlignConfig()) == "9b68e3b9de36" != A._config_hash(cfg.model_copy(update={"batch_size": 8}))


def test_alignment_loop_reduces_loss_on_tiny(tiny_dir, tmp_path):
    cfg = A.AlignConfig(base_model=tiny_dir, steps=16, n_train=64, lr=3e-3, warmup=3, threads=1,
                        n_eval=2, out_dir=tmp_path / "out", work_dir=tmp_path / "w", checkpoint_every=8)
    m = A.align(cfg, progress=False)
    assert m["steps"] == 16 and m["final_loss"] < m["first_loss"] - 0.5
    out = tmp_path / "out"
    prov = json.loads((out / "PROVENANCE.json").read_text())
    assert prov["metrics"]["final_loss"] == m["final_loss"] and "command" in prov
    assert set(m["heldout"]) >= {"colour", "shape", "pattern"}
    model, _ = E.load_model(tiny_dir)
    E.load_vision_weights(model, out / E.VISION_WEIGHTS_NAME)
    # resume: a finished run's checkpoint is picked up, no further steps
    m2 = A.align(cfg.model_copy(update={"n_eval": 0}), progress=False)
    assert m2["steps"] == 16 and m2["final_loss"] == m["final_loss"]


def test_align_command_maps_flags_onto_the_config(monkeypatch):
    """`msr finetune align`: one flag per AlignConfig field, --out for out_dir, --no-resume."""
    from typer.testing import CliRunner

    from mllm_msr.cli import app

    seen = {}
    monkeypatch.setattr(A, "align", lambda cfg: seen.setdefault("cfg", cfg) and {"steps": cfg.steps})
    res = CliRunner().invoke(app, ["finetune", "align", "--out", "x", "--steps", "3", "--lr", "0.01",
                                   "--no-resume", "--max-minutes", "2.5"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.out_dir.name, cfg.steps, cfg.lr, cfg.resume, cfg.max_minutes, cfg.base_model) == \
        ("x", 3, 0.01, False, 2.5, None)
    assert json.loads(res.output) == {"steps": 3}
    assert cfg.catalog == "default"
    monkeypatch.setattr(A, "align", lambda cfg: {"catalog": cfg.catalog})
    res = CliRunner().invoke(app, ["finetune", "align", "--catalog", "alt"])
    assert res.exit_code == 0 and json.loads(res.output) == {"catalog": "alt"}, res.output
    bad = CliRunner().invoke(app, ["finetune", "align", "--steps", "many"])
    assert bad.exit_code == 2
    assert CliRunner().invoke(app, ["finetune", "align", "--catalog", "nope"]).exit_code == 2


def test_built_config_token_ids_lie_in_the_vocabulary(tiny_dir, tiny):
    """Every special token id of the built composite (config, text config, generation config) is
    below the real vocabulary size; a config naming an id outside it is refused at build time."""
    from transformers import AutoConfig, GenerationConfig

    model, proc = tiny
    vocab = len(proc.tokenizer)
    saved = AutoConfig.from_pretrained(tiny_dir)
    ids = {**E.special_token_ids(saved),
           **{f"gen.{k}": v for k, v in E.special_token_ids(GenerationConfig.from_pretrained(tiny_dir)).items()}}
    assert {"config.pad_token_id", "text_config.pad_token_id", "config.image_token_id",
            "text_config.eos_token_id", "gen.config.pad_token_id", "gen.config.eos_token_id"} <= set(ids)
    assert all(0 <= v < vocab for v in ids.values()), ids
    assert saved.text_config.vocab_size == vocab == model.get_input_embeddings().weight.shape[0]
    E.check_token_ids(saved, vocab)
    bad = AutoConfig.from_pretrained(tiny_dir)
    bad.pad_token_id = 128002  # Idefics3Config's class default, from a 128k-token vocabulary
    with pytest.raises(ValueError, match="config.pad_token_id"):
        E.check_token_ids(bad, vocab)
    with pytest.raises(ValueError, match="vocab_size"):
        E.check_token_ids(saved, vocab + 1)


# ------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tiny_model_runs_in_vllm_with_an_image(tiny_dir, tiny, tmp_path):
    pytest.importorskip("vllm")
    model, proc = tiny
    img_path = tmp_path / "c.png"
    covers.draw_cover("red", "star", "dotted", rng=random.Random(1)).save(img_path)
    text = proc.apply_chat_template(_chat(), add_generation_prompt=True)
    script = tmp_path / "v.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from PIL import Image
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(tiny_dir)!r}, enforce_eager=True, max_model_len=512, dtype="float32",
                      limit_mm_per_prompt={{"image": 1}})
            image = Image.open({str(img_path)!r}).convert("RGB")
            out = llm.generate([{{"prompt": {text!r}, "multi_modal_data": {{"image": image}}}}],
                               SamplingParams(max_tokens=8, temperature=0))
            print("IDS", json.dumps(list(out[0].outputs[0].token_ids)))
    """))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
               VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("IDS ")]
    assert line, r.stderr[-3000:]
    vllm_ids = json.loads(line[0][4:])
    from PIL import Image

    enc = proc(text=[text], images=[[Image.open(img_path).convert("RGB")]], return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert vllm_ids == hf.tolist()[:len(vllm_ids)]


@pytest.mark.slow
def test_composite_text_only_equals_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    lm_dir = E.smollm2_safetensors_dir()
    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    model, proc = E.compose_default(None)
    assert len(proc.tokenizer) == 49192 and model.config.image_token_id == 49153
    for q in ("What is the capital of France?", "Name three colours."):
        msgs = [{"role": "user", "content": q}]
        a = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        b = proc(text=[text], return_tensors="pt")
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        with torch.no_grad():
            ga = lm.generate(**a, max_new_tokens=12, do_sample=False)
            gb = model.generate(**b, max_new_tokens=12, do_sample=False)
        assert ga.tolist() == gb.tolist()


@pytest.mark.slow
def test_shipped_weights_caption_the_colour():
    if not E.shipped_vision_weights().exists():
        pytest.skip("no shipped vision weights")
    torch.set_num_threads(2)
    folder = E.ensure_default_model()
    assert E.ensure_default_model() == folder  # cached
    model, proc = E.load_model(folder)
    vocab = len(proc.tokenizer)
    assert vocab == 49192 and all(0 <= v < vocab for v in E.special_token_ids(model.config).values())
    pairs = [("red", "circle", "solid", 11), ("blue", "square", "striped", 12), ("yellow", "star", "dotted", 13)]
    caps = A.caption_images(model, proc, [A.render(p)[0] for p in pairs])
    for p, cap in zip(pairs, caps, strict=True):
        assert covers.parse_caption(cap)["colour"] == p[0], (p, cap)
