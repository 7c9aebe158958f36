"""GPU presets (``configs/presets/*.yaml``): the method at the paper's scale on a real MLLM served by
vLLM, and their checks without a GPU.

A preset file is an ordinary MSR config (``msr run -c configs/presets/NAME.yaml`` reads it; the
``preset`` block is ignored there) plus a ``preset`` block (:class:`PresetSpec`): the Hugging Face
model, its architecture as its ``config.json`` gives it (text and vision towers, connector, image
processor, chat template), how vLLM serves it (GPUs, tensor parallel, context), and the paper's
LoRA settings for ``msr finetune sft``.

:func:`check_preset` validates one without a GPU: every key (MSR config via
:func:`mllm_msr.config.load_config`, strictly), the architecture against vLLM's model registry, the
architecture's own consistency (image tokens = patches / scale_factor²), that every LoRA target
module exists in the model (built from the config on the meta device: no weights), and a memory
estimate per GPU. :func:`build_reduced` writes a random-weights model of the same architecture at
the preset's real image and processor settings with only depth and width reduced, so the code path
real weights take (512 px tiles, image splitting, 64-169 tokens per tile, the model's chat
template) runs here on CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# The SmolVLM / Idefics3 chat template ("User:<image>text<end_of_utterance>\nAssistant:"), extended
# like the embedded model's so that a string content and `image_url` parts render too.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] in ['image', 'image_url'] %}{{ ':' }}{% else %}{{ ': ' }}"
    "{% endif %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class TextTower(BaseModel):
    """The language model's shape (config.json ``text_config``)."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(description="Hidden width.")
    intermediate_size: int = Field(description="MLP width.")
    num_hidden_layers: int = Field(description="Decoder layers.")
    num_attention_heads: int = Field(description="Query heads.")
    num_key_value_heads: int = Field(description="KV heads (GQA).")
    head_dim: int = Field(description="Per-head width.")
    vocab_size: int = Field(description="Vocabulary incl. the Idefics3 image tokens.")


class VisionTower(BaseModel):
    """The SigLIP vision encoder's shape (config.json ``vision_config``)."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(description="Tile side the encoder sees (px).")
    patch_size: int = Field(description="Patch side (px).")
    hidden_size: int = Field(description="Hidden width.")
    intermediate_size: int = Field(description="MLP width.")
    num_hidden_layers: int = Field(description="Encoder layers.")
    num_attention_heads: int = Field(description="Attention heads.")


class ProcessorSpec(BaseModel):
    """The image processor (preprocessor_config.json) and processor (processor_config.json)."""

    model_config = ConfigDict(extra="forbid")
    longest_edge: int = Field(description="Images are resized so their longest edge is this (px).")
    max_image_size: int = Field(description="Tile side after splitting (px): the vision image_size.")
    do_image_splitting: bool = Field(description="Split into tiles plus a global view.")
    image_seq_len: int = Field(description="<image> tokens per tile.")


class LoraSpec(BaseModel):
    """The recommender's LoRA, as the paper trains it."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, description="LoRA rank (paper: 8).")
    alpha: int = Field(16, description="LoRA alpha.")
    dropout: float = Field(0.05, description="LoRA dropout.")
    target_modules: list[str] = Field(description="Module names (suffixes) adapted in the language model.")
    learning_rate: float = Field(2e-5, description="Paper: 2e-5.")
    epochs: float = Field(description="Passes over the training examples.")
    batch_size: int = Field(1, description="Paper: 1 (per device).")


class PresetSpec(BaseModel):
    """The ``preset`` block of a preset file."""

    model_config = ConfigDict(extra="forbid")
    description: str = Field(description="What this preset runs.")
    hf_model: str = Field(description="Hugging Face model id (download it on the GPU machine).")
    architecture: str = Field(description="config.json `architectures[0]`; must be in vLLM's registry.")
    source: str = Field(description="Where the architecture numbers below come from.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Serving dtype.")
    gpus: int = Field(1, ge=1, description="GPUs per vLLM server.")
    gpu_memory_gib: float = Field(80.0, gt=0, description="Memory of one GPU (GiB).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM --tensor-parallel-size.")
    max_model_len: int = Field(8192, description="vLLM --max-model-len (tokens).")
    scale_factor: int = Field(description="Pixel-shuffle factor of the connector.")
    image_token_id: int = Field(description="Id of <image> in the real tokenizer.")
    text: TextTower
    vision: VisionTower
    processor: ProcessorSpec
    lora: LoraSpec

    def serve_command(self, port: int = 8000) -> str:
        """The vLLM server command for one replica of this preset (LoRA adapters added with --lora-modules)."""
        return (f"vllm serve {self.hf_model} --port {port} --dtype {self.dtype} "
                f"--tensor-parallel-size {self.tensor_parallel_size} --max-model-len {self.max_model_len} "
                f"--gpu-memory-utilization {self.gpu_memory_utilization} --enable-lora --max-lora-rank {self.lora.r} "
                "--lora-modules rec=ADAPTER_DIR")


def preset_path(name: str) -> Path:
    """configs/presets/NAME.yaml, or NAME itself when it is a file."""
    p = Path(name)
    return p if p.suffix in {".yaml", ".yml"} and p.is_file() else PRESET_DIR / f"{name}.yaml"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> tuple[PresetSpec, Any]:
    """(spec, MSRConfig) of a preset; unknown keys anywhere are an error."""
    from mllm_msr.config import MSRConfig, load_config

    path = preset_path(name)
    if not path.is_file():
        raise ValueError(f"no preset {name!r}; one of {preset_names()}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "preset" not in raw:
        raise ValueError(f"{path}: no `preset` block")
    unknown = _unknown_keys(MSRConfig, {k: v for k, v in raw.items() if k != "preset"})
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    return PresetSpec.model_validate(raw["preset"]), load_config(path)


def _unknown_keys(cls: type[BaseModel], data: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        f = cls.model_fields.get(k)
        if f is None:
            out.append(prefix + k)
        elif isinstance(v, dict) and isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += _unknown_keys(f.annotation, v, f"{prefix}{k}.")
    return out


# ------------------------------------------------------------------------------------ model builds

def hf_config(spec: PresetSpec, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None):
    """The preset's Idefics3Config (``text`` / ``vision`` override tower fields: a reduced build)."""
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    t = {**spec.text.model_dump(), **(text or {})}
    return Idefics3Config(
        vision_config=Idefics3VisionConfig(**{**spec.vision.model_dump(), **(vision or {})}),
        text_config=LlamaConfig(**t, max_position_embeddings=max(spec.max_model_len, 4096), tie_word_embeddings=False),
        image_token_id=spec.image_token_id, scale_factor=spec.scale_factor, tie_word_embeddings=False)


def meta_model(spec: PresetSpec):
    """The full-size model on the meta device (shapes only, no memory)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    with torch.device("meta"):
        return Idefics3ForConditionalGeneration(hf_config(spec))


def build_reduced(spec: PresetSpec, out_dir: Path, seed: int = 0) -> Path:
    """A random-weights model folder of the preset's architecture at its REAL vision image size,
    patch size, scale factor, tokens per tile, image splitting, resize edge and chat template;
    only depth and width are reduced (2 layers, hidden 64) and the vocabulary is the tiny test
    tokenizer's (so "yes"/"no" are single tokens)."""
    import json

    import torch
    from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    from mllm_msr.models.embedded import IMAGE_TOKEN, _tiny_tokenizer

    tok = _tiny_tokenizer()
    tok.chat_template = SMOLVLM_CHAT_TEMPLATE
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=len(tok), initializer_range=0.2,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = hf_config(spec, text=small, vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=2))
    cfg.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)  # float32: torch.get_default_dtype()
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [eou, tok.eos_token_id]
    p = spec.processor
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": p.longest_edge},
                                                  max_image_size={"longest_edge": p.max_image_size},
                                                  do_image_splitting=p.do_image_splitting),
        tokenizer=tok, image_seq_len=p.image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(SMOLVLM_CHAT_TEMPLATE)
    (out / "PRESET.json").write_text(json.dumps({"reduced_from": spec.hf_model}))
    return out


# ------------------------------------------------------------------------------------------ check

class CheckRow(BaseModel):
    what: str
    ok: bool
    detail: str


def check_preset(name: str) -> list[CheckRow]:
    """Every check of a preset, without a GPU (see the module doc)."""
    rows: list[CheckRow] = []
    try:
        spec, cfg = load_preset(name)
    except ValueError as e:
        return [CheckRow(what="keys", ok=False, detail=str(e))]
    rows.append(CheckRow(what="keys", ok=True, detail=f"MSR config and preset block valid ({preset_path(name)})"))
    models = {cfg.generator.model, cfg.scorer.model}
    rows.append(CheckRow(what="models", ok=models == {spec.hf_model},
                         detail=f"generator/scorer model {sorted(models)}; preset {spec.hf_model}"))
    from vllm.model_executor.models import ModelRegistry

    archs = set(ModelRegistry.get_supported_archs())
    rows.append(CheckRow(what="vLLM architecture", ok=spec.architecture in archs,
                         detail=f"{spec.architecture} {'in' if spec.architecture in archs else 'NOT in'} vLLM's "
                                f"registry ({len(archs)} architectures)"))
    v = spec.vision
    tokens = (v.image_size // v.patch_size) ** 2 // spec.scale_factor ** 2
    rows.append(CheckRow(what="image tokens", ok=tokens == spec.processor.image_seq_len
                         and spec.processor.max_image_size == v.image_size,
                         detail=f"({v.image_size}//{v.patch_size})^2/{spec.scale_factor}^2 = {tokens} per tile; "
                                f"processor {spec.processor.image_seq_len}, tile {spec.processor.max_image_size} px"))
    tiles = (-(-spec.processor.longest_edge // spec.processor.max_image_size)) ** 2 + 1 \
        if spec.processor.do_image_splitting else 1
    model = meta_model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    lm = model.model.text_model
    found, lora_params = set(), 0
    for mod_name, mod in lm.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        if leaf in spec.lora.target_modules and hasattr(mod, "in_features"):
            found.add(leaf)
            lora_params += spec.lora.r * (mod.in_features + mod.out_features)
    missing = sorted(set(spec.lora.target_modules) - found)
    rows.append(CheckRow(what="LoRA targets", ok=not missing,
                         detail=f"{sorted(found)} in the language model; missing {missing}; r={spec.lora.r}: "
                                f"{lora_params / 1e6:.1f}M trainable params"))
    t, b = spec.text, DTYPE_BYTES[spec.dtype]
    tp = spec.tensor_parallel_size
    weights_gib = n_params * b / 2**30
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * b  # K and V, every layer
    free_gib = spec.gpu_memory_gib * spec.gpu_memory_utilization - weights_gib / tp
    seqs = int(free_gib * 2**30 * tp // (kv_per_token * spec.max_model_len)) if free_gib > 0 else 0
    rows.append(CheckRow(what="parallelism", ok=tp <= spec.gpus and t.num_attention_heads % tp == 0
                         and (t.num_key_value_heads % tp == 0 or tp % t.num_key_value_heads == 0),
                         detail=f"tensor_parallel {tp} on {spec.gpus} GPU(s); {t.num_attention_heads} query / "
                                f"{t.num_key_value_heads} KV heads"))
    rows.append(CheckRow(what="memory", ok=free_gib > 0 and seqs >= 1,
                         detail=f"{n_params / 1e9:.2f}B params = {weights_gib:.1f} GiB {spec.dtype} "
                                f"({weights_gib / tp:.1f} GiB per GPU); KV {kv_per_token / 1024:.0f} KiB/token; "
                                f"{free_gib:.1f} GiB left per GPU = {seqs} sequences of {spec.max_model_len} tokens; "
                                f"an image = {tiles} tile(s) x {spec.processor.image_seq_len} = "
                                f"{tiles * spec.processor.image_seq_len} tokens"))
    return rows
