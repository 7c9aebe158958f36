"""Stage-2 fine-tuning of the recommender: a LoRA adapter that answers "yes"/"no" (paper Sec. 3.4).

Data (:func:`build_sft_examples`, :func:`examples_from_store`): for every training user and every
stored recurrent summary version (after block b, covering ``history[:e]``), the next item
``seq[e]`` is a positive and one uniformly sampled never-touched item a negative (1:1, as the paper).

Tokenisation (:class:`SFTEncoder`): the prompt is ``Recommender.request`` rendered by
``TransformersBackend.render`` (the very chat template, processor and image expansion used at
inference), followed by the answer word and the end-of-turn token. Labels are ``-100`` everywhere
except the answer token and the end token: the loss covers the answer only (the authors' code also
trained on the prompt; we do not). Rows are right-padded, so the answer is predicted from the
last prompt token exactly as ``score_yes_no`` reads it.

Training (:func:`train_sft`): transformers ``Trainer`` (checkpoints that resume, progress bar,
``logging_steps`` loss log saved as ``train_log.json``) with a loss computed from the LM head at
the labelled positions only (the full-vocabulary head on every position dominated a CPU step).
The output folder is a plain PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
fp16 by default) on the language model's projections only, rank <= 16, so both
``TransformersBackend(adapters={"rec": dir})`` and vLLM (``--enable-lora --lora-modules rec=dir``)
load it. :func:`merge_and_export` writes a merged full model folder.

Command line: ``python -m mllm_msr.finetune.sft --help`` (``train`` from a JSONL file,
``benchmark`` for the whole pipeline on the configured dataset, ``merge``).
"""
from __future__ import annotations

from mllm_msr.paths import file_sha256

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Any, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, Field

from mllm_msr.data.schema import Item

log = logging.getLogger(__name__)

ANSWERS = ("yes", "no")
# Language-model projections only: the negative look-ahead keeps the vision tower (whose attention
# also has q/k/v_proj) out, so the adapter holds nothing vLLM's LoRA loader would refuse.
LM_TARGET_MODULES = (r"^(?!.*(?:vision|visual|image_tower|connector|multi_modal_projector)).*"
                     r"\.layers\.\d+\.(?:self_attn|mlp)\."
                     r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class SFTConfig(BaseModel):
    """LoRA supervised fine-tuning of the yes/no recommender.

    The paper's settings (LoRA r=8, lr 2e-5, batch 1) are for 7B models and a GPU; on the small
    embedded model (SmolLM2-135M language model) on CPU they barely move the loss in the few hundred
    steps a CPU affords. Measured on the embedded model (text prompts, ground-truth preference
    summaries of the bundled benchmark, batch 8, 1 thread on a loaded 2-core machine):

    * top-10-layer LoRA r=16: 4.4-5.3 s/step vs 9-10 s/step for all 30 layers;
    * clean rule (yes iff the candidate's genre is the summary's genre), lr 1e-3: held-out AUC
      0.69 after 40 steps, 0.83 after 120 steps (960 examples);
    * the benchmark's sampled positives vs random negatives (a weaker signal: genre match alone
      caps AUC near 0.7), ground-truth summaries: AUC 0.56 after 60 steps at lr 1e-3, 0.52 after
      150 steps at lr 2e-3 (too high: collapses to a constant answer at ln 2).

    So: lr 1e-3, r=16, top 10 layers, several epochs; learning is data-bound (hundreds of steps).
    See ``mllm_msr/weights/rec_adapter/PROVENANCE.json`` for the shipped adapter's run.
    """

    lora_r: int = Field(16, ge=1, le=64, description="LoRA rank (keep <= 16 so vLLM's default --max-lora-rank accepts it; paper 8).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str = Field(LM_TARGET_MODULES, description="Regex (full match on module names) of the LoRA'd modules: the language model's q,k,v,o,gate,up,down projections, never the vision tower.")
    lora_top_layers: int = Field(16, ge=0, description="LoRA only the top N decoder layers (0 = all). Backward then stops at the lowest adapted layer: fewer layers = faster CPU steps. 16 of SmolLM2's 30 learned the benchmark (valid AUC 0.69); 10 with lr 1e-3 stayed at chance.")
    learning_rate: float = Field(5e-4, gt=0.0, description="Peak AdamW learning rate (paper 2e-5 for 7B). For the 135M embedded model 5e-4 learned (test AUC 0.50 -> 0.71 on the bundled benchmark); 1e-3 plateaued at chance.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    epochs: float = Field(3.0, gt=0.0, description="Passes over the training examples (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = use epochs).")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_length: int = Field(1024, ge=16, description="Longest tokenised example (prompt + answer); longer ones are an error, never silently cut.")
    seed: int = Field(0, description="Seed of LoRA init, data order and dropout.")
    train_connector: bool = Field(False, description="Also train the vision connector and encoder fully (modules_to_save). Such adapters load in transformers/peft but NOT in vLLM.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of steps of linear warm-up (then cosine decay).")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant_with_warmup, ...).")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every this many steps (train_log.json).")
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every this many steps (output_dir/checkpoints).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    output_dir: str = Field("runs/sft/rec_adapter", description="Adapter folder written at the end (checkpoints go to its checkpoints/ subfolder).")
    save_dtype: str = Field("float16", description="dtype of the saved adapter weights (float16 halves the file; float32 keeps it exact).")
    bf16: bool | None = Field(None, description="bf16 autocast for the forward/backward (None = auto: on when the CPU has native bf16 matmuls (AMX / AVX512-BF16) or on a bf16 GPU). Measured on the 2-core dev CPU: 1.56 vs 2.55 s per step (1.6x). LoRA weights, optimizer and the saved adapter stay float32 / save_dtype.")
    threads: int | None = Field(None, description="torch CPU threads (None = leave torch's setting). On a shared machine 1 is often fastest (oversubscribed threads slow a step many times).")
    eval_batch_size: int = Field(16, ge=1, description="Batch size when scoring held-out examples.")
    use_images: bool = Field(True, description="Show the candidate's cover in the prompt (must match RecommenderConfig.use_images at inference).")
    history: Literal["summary", "titles"] = Field("summary", description="Prompt family (as RecommenderConfig.history): 'summary' = MLLM-MSR; 'titles' = TALLRec-style titles-only baseline (set use_images=false).")
    positions: Literal["all", "block_ends"] = Field("all", description="Benchmark SFT cases: every history position after the first summary ('all', ~3x the data) or only where a summary version ends ('block_ends').")
    adapter_name: str = Field("rec", description="Adapter name used for evaluation requests (as RecommenderConfig.adapter).")


# ------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SFTExample:
    """One pointwise example: preference summary, candidate item, answer ("yes"/"no")."""

    user_summary: str
    item: Item
    label: str
    user_id: str = ""

    def __post_init__(self) -> None:
        if self.label not in ANSWERS:
            raise ValueError(f"label must be 'yes' or 'no', got {self.label!r}")


def _label(v: Any) -> str:
    if isinstance(v, str) and v.strip().lower() in ANSWERS:
        return v.strip().lower()
    if v in (1, True):
        return "yes"
    if v in (0, False):
        return "no"
    raise ValueError(f"label must be yes/no or 1/0, got {v!r}")


def build_sft_examples(triples: Iterable[Sequence[Any]]) -> list[SFTExample]:
    """(user_summary, Item, label) triples (label "yes"/"no" or 1/0, optional 4th: user id)."""
    out = []
    for n, t in enumerate(triples):
        if isinstance(t, SFTExample):
            out.append(t)
            continue
        if len(t) not in (3, 4):
            raise ValueError(f"example {n}: expected (user_summary, item, label[, user_id]), got {len(t)} fields")
        summary, item, label = t[0], t[1], t[2]
        if not isinstance(item, Item):
            raise ValueError(f"example {n}: candidate must be an Item, got {type(item).__name__}")
        out.append(SFTExample(str(summary), item, _label(label), str(t[3]) if len(t) == 4 else ""))
    return out


def _next_position(seq: Sequence[str], covered: Sequence[str]) -> int | None:
    """Index in ``seq`` of the item right after the contiguous window ``covered`` (latest match)."""
    k = len(covered)
    if k == 0 or k > len(seq):
        return None
    cov = list(covered)
    for end in range(len(seq), k - 1, -1):
        if list(seq[end - k:end]) == cov:
            return end
    return None


def examples_from_store(store, sequences: Mapping[str, Sequence[Any]], users: Iterable[str],
                        catalog: Mapping[str, Item], *, seed: int = 0, negatives: int = 1,
                        source: str = "history", positions: Literal["all", "block_ends"] = "all",
                        context: Callable[[str, list[str]], str] | None = None) -> list[SFTExample]:
    """SFT examples from the pipeline's own stored recurrent summaries.

    ``sequences``: user → chronological item ids (or Interactions). Each stored version
    (``store.user_history(user)``, ``source`` versions only) covers the sequence up to some end
    position. ``positions="block_ends"``: one case per version end e; ``"all"``: every position e
    after the first version's end, each with the latest summary whose window ends at or before e
    (the recent items in ``context`` fill the gap; about block_size times more data). At each case
    ``seq[e]`` is a "yes" and ``negatives`` uniformly drawn items the user never touched are "no"
    (seeded per user and position). ``context(summary, history_before_e)`` turns the summary into
    the preference text the recommender shows (``Recommender.context`` with the recent items'
    summaries), so training sees exactly what inference sees."""
    pool = sorted(catalog)
    out: list[SFTExample] = []
    for u in sorted(set(users)):
        seq = [getattr(x, "item_id", x) for x in sequences.get(u, ())]
        if not seq:
            continue
        touched = set(seq)
        by_end: dict[int, str] = {}
        for v in store.user_history(u):  # oldest first: a later version of the same end wins
            if v.source != source or not v.summary.strip():
                continue
            e = _next_position(seq, v.covered)
            if e is not None and e < len(seq):
                by_end[e] = v.summary
        if not by_end:
            continue
        ends = sorted(by_end)
        cases = ends if positions == "block_ends" else range(ends[0], len(seq))
        cands = [i for i in pool if i not in touched]
        for e in cases:
            summary = by_end[max(x for x in ends if x <= e)]
            text = context(summary, seq[:e]) if context else summary
            out += _case(text, u, seq[e], e, cands, catalog, seed, negatives)
    return out


def _case(text: str, user: str, positive: str, e: int, cands: Sequence[str], catalog: Mapping[str, Item],
          seed: int, negatives: int) -> list[SFTExample]:
    """The "yes" at position e and ``negatives`` never-touched "no" items (seeded per user, position)."""
    rng = random.Random(f"{seed}:sft:{user}:{e}")
    return [SFTExample(text, catalog[positive], "yes", user),
            *(SFTExample(text, catalog[n], "no", user) for n in rng.sample(cands, min(negatives, len(cands))))]


def examples_from_sequences(sequences: Mapping[str, Sequence[Any]], users: Iterable[str],
                            catalog: Mapping[str, Item], context: Callable[[list[str]], str], *,
                            seed: int = 0, negatives: int = 1, min_history: int = 3) -> list[SFTExample]:
    """TALLRec-style examples straight from the sequences (no summaries): at every position
    e >= ``min_history`` the preference text is ``context(seq[:e])`` (the history's item ids;
    ``Services.preference_text`` in titles mode), ``seq[e]`` is a
    "yes" and ``negatives`` never-touched items are "no" (same seeding as :func:`examples_from_store`)."""
    pool = sorted(catalog)
    out: list[SFTExample] = []
    for u in sorted(set(users)):
        seq = [getattr(x, "item_id", x) for x in sequences.get(u, ())]
        touched = set(seq)
        cands = [i for i in pool if i not in touched]
        for e in range(max(1, min_history), len(seq)):
            text = context(seq[:e])
            out += _case(text, u, seq[e], e, cands, catalog, seed, negatives)
    return out


def save_examples_jsonl(examples: Sequence[SFTExample], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for ex in examples:
            it = ex.item
            f.write(json.dumps({"user_id": ex.user_id, "user_summary": ex.user_summary, "label": ex.label,
                                "item_id": it.item_id, "title": it.title, "text": it.text,
                                "image_path": str(it.image_path) if it.image_path else None}) + "\n")
    return p


def load_examples_jsonl(path: str | Path) -> list[SFTExample]:
    """Rows {user_summary, label, item_id, title, [text], [image_path], [user_id]}."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                item = Item(str(r["item_id"]), r["title"], r.get("text"),
                            Path(r["image_path"]) if r.get("image_path") else None)
                out.append(SFTExample(r["user_summary"], item, _label(r["label"]), str(r.get("user_id", ""))))
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}: line {n}: {e}") from e
    return out


# ------------------------------------------------------------------------------- tokenising
class SFTEncoder:
    """Turns examples into model inputs exactly as inference renders them, with answer-only labels.

    ``backend``: a :class:`~mllm_msr.models.hf_backend.TransformersBackend` (its ``render``,
    processor and resolved yes/no token ids); ``recommender``: a Recommender whose ``request``
    builds the prompt (default: the packaged prompts, ``use_images`` as given)."""

    def __init__(self, backend, recommender=None, *, use_images: bool = True, max_length: int = 1024,
                 history: str = "summary"):
        from mllm_msr.agents.recommender import Recommender, RecommenderConfig

        self.backend = backend
        self.recommender = recommender or Recommender(
            backend, RecommenderConfig(use_images=use_images, adapter=None, history=history))
        self.max_length = max_length
        self.tokenizer = backend.tokenizer
        eot = self.tokenizer.eos_token
        if eot is None:
            raise ValueError("the tokenizer has no end-of-turn (eos) token")
        self.end_token = eot
        self.end_token_id = self.tokenizer.convert_tokens_to_ids(eot)
        self.answer_ids = {"yes": backend.yes_token_id, "no": backend.no_token_id}
        self._checked = False

    def request(self, ex: SFTExample):
        return self.recommender.request(ex.user_summary, ex.item, None)

    def _check_template(self, req, prompt: str, answer: str) -> None:
        """The chat template itself must render an assistant turn as prompt + answer + end token."""
        from mllm_msr.models.base import ChatRequest

        full, _ = self.backend.render(ChatRequest(req.messages + ({"role": "assistant", "content": answer},)))
        if not full.startswith(prompt + answer + self.end_token):
            raise ValueError("chat template does not render an assistant answer as "
                             f"<generation prompt>{answer}{self.end_token}: {full[len(prompt) - 40:]!r}")
        self._checked = True

    def encode(self, ex: SFTExample) -> dict[str, Any]:
        """input_ids, labels (answer + end token only), pixel_values / pixel_attention_mask."""
        req = self.request(ex)
        prompt, images = self.backend.render(req)
        completion = ex.label + self.end_token
        if not self._checked:
            self._check_template(req, prompt, ex.label)
        tok = self.tokenizer
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        if f_ids[:len(p_ids)] != p_ids:
            raise ValueError("the answer merges with the prompt's last token; cannot mask the prompt")
        n_c = len(f_ids) - len(p_ids)
        if f_ids[len(p_ids)] != self.answer_ids[ex.label] or f_ids[-1] != self.end_token_id:
            raise ValueError(f"answer {ex.label!r} tokenises to {f_ids[len(p_ids):]}, expected "
                             f"[{self.answer_ids[ex.label]}, ..., {self.end_token_id}] (scoring reads "
                             "the first answer token)")
        if images:
            enc = self.backend.processor(text=[prompt + completion], images=[images], return_tensors="pt")
        else:
            enc = tok([prompt + completion], return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"][0]
        if ids.shape[0] > self.max_length:
            raise ValueError(f"example for user {ex.user_id!r} item {ex.item.item_id!r} has "
                             f"{ids.shape[0]} tokens > max_length={self.max_length}")
        if ids[-n_c:].tolist() != f_ids[-n_c:]:
            raise ValueError("processor and tokenizer disagree on the answer tokens")
        labels = ids.clone()
        labels[:-n_c] = -100
        row: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if "pixel_values" in enc:
            row["pixel_values"] = enc["pixel_values"][0]
            if "pixel_attention_mask" in enc:
                row["pixel_attention_mask"] = enc["pixel_attention_mask"][0]
        return row

    def encode_all(self, examples: Sequence[SFTExample]) -> list[dict[str, Any]]:
        return [self.encode(ex) for ex in examples]


class SFTCollator:
    """Right padding (pad id / label -100); images padded to the batch's max count with zeros
    (Idefics3 drops all-zero images, so text-only rows can share a batch with image rows)."""

    def __init__(self, pad_token_id: int):
        self.pad = int(pad_token_id)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(r["input_ids"].shape[0] for r in rows)
        B = len(rows)
        ids = torch.full((B, n), self.pad, dtype=torch.long)
        labels = torch.full((B, n), -100, dtype=torch.long)
        att = torch.zeros((B, n), dtype=torch.long)
        for i, r in enumerate(rows):
            L = r["input_ids"].shape[0]
            ids[i, :L] = r["input_ids"]
            labels[i, :L] = r["labels"]
            att[i, :L] = 1
        out = {"input_ids": ids, "attention_mask": att, "labels": labels}
        with_img = [r for r in rows if r.get("pixel_values") is not None]
        if with_img:
            ref = with_img[0]["pixel_values"]
            k = max(r["pixel_values"].shape[0] for r in with_img)
            pv = torch.zeros((B, k, *ref.shape[1:]), dtype=ref.dtype)
            has_mask = "pixel_attention_mask" in with_img[0]
            if has_mask:
                pm_ref = with_img[0]["pixel_attention_mask"]
                pm = torch.zeros((B, k, *pm_ref.shape[1:]), dtype=pm_ref.dtype)
            for i, r in enumerate(rows):
                if r.get("pixel_values") is None:
                    continue
                m = r["pixel_values"].shape[0]
                pv[i, :m] = r["pixel_values"]
                if has_mask:
                    pm[i, :m] = r["pixel_attention_mask"]
            out["pixel_values"] = pv
            if has_mask:
                out["pixel_attention_mask"] = pm
        return out


class _ListDataset:
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


# ---------------------------------------------------------------------------------- model
def _hf_model(model):
    """The transformers model under a PeftModel (LoRA layers are injected in place)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _body_and_head(model):
    m = _hf_model(model)
    inner, head = getattr(m, "model", None), m.get_output_embeddings()
    if inner is None or head is None:
        raise ValueError(f"{type(m).__name__}: cannot split into body + LM head")
    return inner, head


def answer_loss(model, batch: Mapping[str, Any]):
    """Mean cross-entropy over the labelled (answer) positions; the head runs only there."""
    import torch
    import torch.nn.functional as F

    inner, head = _body_and_head(model)
    labels = batch["labels"]
    kw = {k: v for k, v in batch.items() if k != "labels"}
    h = inner(**kw, use_cache=False).last_hidden_state
    tgt = labels[:, 1:]
    mask = tgt != -100
    logits = head(h[:, :-1][mask]).float()
    return F.cross_entropy(logits, tgt[mask])


def score_rows(model, rows: Sequence[dict[str, Any]], yes_id: int, no_id: int, pad_id: int,
               batch_size: int = 16) -> list[float]:
    """p(yes)/(p(yes)+p(no)) at each row's answer position (in memory, no adapter save needed)."""
    import torch

    coll = SFTCollator(pad_id)
    inner, head = _body_and_head(model)
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            b = coll(rows[s:s + batch_size])
            labels = b.pop("labels")
            with torch.inference_mode():
                h = inner(**b, use_cache=False).last_hidden_state
            first = (labels != -100).float().argmax(dim=1) - 1  # last prompt token
            hid = h[torch.arange(h.shape[0]), first]
            lg = head(hid)[:, [yes_id, no_id]].double()
            out += torch.softmax(lg, dim=-1)[:, 0].tolist()
    finally:
        model.train(was_training)
    return out


def _n_layers(model_or_config) -> int:
    c = getattr(model_or_config, "config", model_or_config)
    c = getattr(c, "text_config", None) or c
    return int(c.num_hidden_layers)


def target_regex(cfg: SFTConfig, n_layers: int | None = None) -> str:
    """``cfg.target_modules`` restricted to the top ``cfg.lora_top_layers`` layers when set."""
    if not cfg.lora_top_layers or n_layers is None or cfg.lora_top_layers >= n_layers:
        return cfg.target_modules
    top = "|".join(str(i) for i in range(n_layers - cfg.lora_top_layers, n_layers))
    if r"\.layers\.\d+\." not in cfg.target_modules:
        raise ValueError("lora_top_layers needs a target_modules regex containing '\\.layers\\.\\d+\\.'")
    return cfg.target_modules.replace(r"\.layers\.\d+\.", rf"\.layers\.(?:{top})\.")


def lora_config(cfg: SFTConfig, n_layers: int | None = None):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_regex(cfg, n_layers), bias="none", task_type="CAUSAL_LM",
                      modules_to_save=["connector", "vision_model"] if cfg.train_connector else None)


def _check_lm_only(model) -> list[str]:
    names = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    bad = [n for n in names if "vision" in n or "connector" in n]
    if bad:
        raise ValueError(f"target_modules matched vision modules: {bad[:3]}")
    if not names:
        raise ValueError("target_modules matched no module")
    return names


def _convert_adapter_dtype(folder: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from mllm_msr.models.hf_backend import _torch_dtype

    p = folder / "adapter_model.safetensors"
    dt = _torch_dtype(dtype)
    sd = load_file(str(p))
    if all(v.dtype == dt for v in sd.values()):
        return
    save_file({k: v.to(dt).contiguous() if v.is_floating_point() else v for k, v in sd.items()},
              str(p), metadata={"format": "pt"})


def use_bf16(cfg: SFTConfig, device_type: str) -> bool:
    """Resolve ``cfg.bf16``; auto = native bf16 matmuls on this device."""
    import torch

    if cfg.bf16 is not None:
        return bool(cfg.bf16)
    if device_type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return device_type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _make_trainer_cls():
    from transformers import Trainer

    class AnswerOnlyTrainer(Trainer):
        """Loss from the LM head at the labelled positions only; mean per micro-batch."""

        loss_is_scaled_for_ga = False
        bf16_autocast = False  # set per run; the loss bypasses model.forward, so autocast is ours

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            dev = inputs["input_ids"].device.type
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.bf16_autocast):
                loss = answer_loss(model, inputs)
            return (loss, None) if return_outputs else loss

    return AnswerOnlyTrainer


def _auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def evaluate_adapter(model_dir: str | Path, adapter_dir: str | Path | None,
                     examples: Sequence[SFTExample], *, use_images: bool = True,
                     batch_size: int = 16, adapter_name: str = "rec", threads: int | None = None,
                     history: str = "summary") -> dict[str, Any]:
    """Score held-out examples through ``TransformersBackend`` (+ adapter) → AUC, accuracy, scores."""
    from mllm_msr.agents.recommender import Recommender, RecommenderConfig
    from mllm_msr.models.hf_backend import TransformersBackend

    adapters = {adapter_name: str(adapter_dir)} if adapter_dir else None
    be = TransformersBackend(model_dir, adapters, batch_size=batch_size, threads=threads)
    rec = Recommender(be, RecommenderConfig(use_images=use_images, adapter=adapter_name if adapter_dir else None,
                                            history=history))
    t0 = time.perf_counter()
    reqs = [rec.request(ex.user_summary, ex.item, rec.cfg.adapter) for ex in examples]
    scores = be.score_yes_no(reqs)
    y = [1 if ex.label == "yes" else 0 for ex in examples]
    acc = sum((s > 0.5) == bool(t) for s, t in zip(scores, y)) / max(1, len(y))
    be.close()
    return {"auc": _auc(y, scores), "accuracy": acc, "n": len(y), "scores": scores,
            "score_s": round(time.perf_counter() - t0, 2)}


def _loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not losses:
        return {}
    k = max(1, len(losses) // 5)
    first = sum(l for _, l in losses[:k]) / k
    last = sum(l for _, l in losses[-k:]) / k
    return {"first_loss": round(first, 4), "last_loss": round(last, 4), "min_loss": round(min(l for _, l in losses), 4),
            "logged_points": len(losses), "curve": [[s, round(l, 4)] for s, l in losses]}


def train_sft(cfg: SFTConfig, examples: Sequence[SFTExample | Sequence[Any]], model_dir: str | Path,
              eval_examples: Sequence[SFTExample | Sequence[Any]] | None = None, *,
              resume_from_checkpoint: bool | str | None = None, show_progress: bool = True
              ) -> dict[str, Any]:
    """Train the LoRA adapter; write it to ``cfg.output_dir``; return metrics.

    ``resume_from_checkpoint``: True = the latest checkpoint in ``output_dir/checkpoints``, or a
    checkpoint folder. Metrics: steps, wall time, loss-curve summary, and (with ``eval_examples``)
    held-out AUC / accuracy scored through ``TransformersBackend`` with the saved adapter."""
    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments, set_seed

    from mllm_msr.models.hf_backend import TransformersBackend

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    examples = build_sft_examples(examples)
    if not examples:
        raise ValueError("no training examples")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"

    set_seed(cfg.seed)
    be = TransformersBackend(model_dir, max_length=cfg.max_length)
    enc = SFTEncoder(be, use_images=cfg.use_images, max_length=cfg.max_length, history=cfg.history)
    t0 = time.perf_counter()
    rows = enc.encode_all(examples)
    encode_s = time.perf_counter() - t0
    pad_id = be.tokenizer.pad_token_id
    model = be.model
    model.config.use_cache = False
    set_seed(cfg.seed)
    model = get_peft_model(model, lora_config(cfg, _n_layers(model)))
    lora_modules = _check_lm_only(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()

    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed,
        data_seed=cfg.seed, use_cpu=(be.device.type == "cpu"), report_to="none",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not show_progress,
        label_names=["labels"], save_only_model=False,
    )
    bf16 = use_bf16(cfg, be.device.type)
    trainer = _make_trainer_cls()(model=model, args=args, train_dataset=_ListDataset(rows),
                                  data_collator=SFTCollator(pad_id))
    trainer.bf16_autocast = bf16
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None
        resume_from_checkpoint = last  # None: nothing to resume, start fresh
    t1 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    train_s = time.perf_counter() - t1
    history = trainer.state.log_history
    (out / "train_log.json").write_text(json.dumps(history, indent=1))

    model.save_pretrained(str(out))
    _convert_adapter_dtype(out, cfg.save_dtype)
    (out / "sft_config.json").write_text(cfg.model_dump_json(indent=1))
    steps = trainer.state.global_step
    metrics: dict[str, Any] = {
        "global_step": steps, "examples": len(examples),
        "positives": sum(ex.label == "yes" for ex in examples),
        "trainable_params": n_trainable, "lora_modules": len(lora_modules), "bf16": bf16,
        "train_loss": round(float(result.training_loss), 4),
        "loss": _loss_summary(history),
        "encode_s": round(encode_s, 2), "train_s": round(train_s, 2),
        "s_per_step": round(train_s / max(1, steps - (trainer.state.global_step - result.global_step)), 3),
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "resumed_from": str(resume_from_checkpoint) if resume_from_checkpoint else None,
    }
    del trainer, model, be
    if eval_examples:
        ev = evaluate_adapter(model_dir, out, build_sft_examples(eval_examples), use_images=cfg.use_images,
                              batch_size=cfg.eval_batch_size, adapter_name=cfg.adapter_name,
                              history=cfg.history)
        metrics["eval"] = {k: v for k, v in ev.items() if k != "scores"}
    metrics["wall_s"] = round(time.perf_counter() - t_start, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def merge_and_export(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Base model + adapter merged into a full HF folder (config, weights, processor/tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out_dir)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    if getattr(cfg, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText as Auto
        from transformers import AutoProcessor as AutoProc
    else:
        from transformers import AutoModelForCausalLM as Auto
        from transformers import AutoTokenizer as AutoProc
    base = Auto.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    AutoProc.from_pretrained(str(model_dir)).save_pretrained(str(out))
    for name in ("chat_template.jinja", "generation_config.json", "msr_build.json"):
        src = model_dir / name
        if src.exists():
            shutil.copy2(src, out / name)
    (out / "merged_from.json").write_text(json.dumps({"base": str(model_dir), "adapter": str(adapter_dir)}, indent=1))
    return out


def copy_adapter(src: str | Path, dst: str | Path, extra: Iterable[str] = ("sft_config.json", "train_log.json")) -> Path:
    """Copy only the adapter files (+ small logs) into ``dst`` (e.g. the shipped weights folder)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*ADAPTER_FILES, *extra):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst


# ------------------------------------------------------------------------------- benchmark


def _histories(splits, users: Sequence[str], cases=None):
    """(user → history window used for the summaries, user → window + target)."""
    from mllm_msr.agents.user_memory import UserHistory

    hist, full = {}, {}
    if cases is None:
        pos = {ex.user_id: ex for ex in splits.train if ex.label == 1}  # latest positive per user
        for ex in splits.train:
            if ex.label == 1 and len(ex.history) >= len(pos[ex.user_id].history):
                pos[ex.user_id] = ex
        for u in users:
            if u in pos:
                ex = pos[u]
                hist[u] = UserHistory(u, tuple(ex.history), tuple(ex.history_timestamps))
                full[u] = (*ex.history, ex.item_id)
    else:
        for c in cases:
            hist[c.user_id] = UserHistory(c.user_id, tuple(c.history), tuple(c.history_timestamps))
            full[c.user_id] = (*c.history, c.target)
    return hist, full


def run_benchmark(config: str | Path | None = None, msr_overrides: Sequence[str] = (),
                  sft_cfg: SFTConfig | None = None, work_dir: str | Path = "runs/sft",
                  ship: str | Path | None = None, max_valid_users: int | None = 100,
                  resume: bool = False, max_train_users: int | None = 120,
                  command: str | None = None) -> dict[str, Any]:
    """The whole stage 2 on the configured dataset (default: the bundled benchmark).

    1. item summaries + recurrent user summaries for the TRAIN and VALID users (the pipeline's own
       agents, cached in ``work_dir/store``); 2. SFT examples from the stored versions
       (:func:`examples_from_store`); 3. validation metrics zero-shot (no adapter) on the valid
       users with the test protocol (1 positive : ``protocol.valid_negatives`` negatives); 4. LoRA
       SFT, held-out AUC on the valid users' examples; 5. validation metrics with the adapter;
       6. PROVENANCE.json (training user ids included, for the leak guard) and a copy of the
       adapter in ``ship``. The test set is never read here: ``msr eval`` reads it once per shipped
       configuration. ``max_train_users`` / ``max_valid_users``: the documented subsets that fit a
       CPU budget (the first N of the split's order)."""
    from mllm_msr.config import load_config
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.pipeline import run_cases
    from mllm_msr.pipeline import build_services, load_data

    t_all = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sft_cfg = (sft_cfg or SFTConfig()).model_copy(update={"output_dir": str(work / "adapter")})
    titles = sft_cfg.history == "titles"
    if titles:  # TALLRec-style: titles only, no summaries, no images
        sft_cfg = sft_cfg.model_copy(update={"use_images": False})
    base_ov = [f"store.path={work / 'store' / 'chroma'}", "recommender.adapter=null",
               *(["recommender.history=titles", "recommender.use_images=false"] if titles else [])]
    cfg = load_config(config, [*base_ov, *msr_overrides])
    ds = load_data(cfg)
    splits = build_splits(ds, cfg.protocol)
    catalog = ds.items
    services = build_services(cfg, ds)
    backend = services.recommender.backend
    from mllm_msr.models.factory import resolve_model_path

    model_dir = Path(resolve_model_path(cfg.scorer.model))  # training always runs in transformers
    timings: dict[str, float] = {}

    # 1. summaries for train + valid users
    train_users = list(splits.train_users)[: max_train_users or None]
    h_tr, f_tr = _histories(splits, train_users)
    valid_cases = splits.valid[: max_valid_users or None]
    h_va, f_va = _histories(splits, [c.user_id for c in valid_cases], valid_cases)
    hist = {**h_tr, **h_va}
    if titles:  # 2'. examples straight from the sequences
        def titles_text(before: list[str]) -> str:
            return services.preference_text(before, None)

        train_ex = examples_from_sequences(f_tr, f_tr, catalog, titles_text, seed=cfg.seed)
        valid_ex = examples_from_sequences(f_va, f_va, catalog, titles_text, seed=cfg.seed)
    else:
        t0 = time.perf_counter()
        ids = list(dict.fromkeys(i for h in hist.values() for i in h.items))
        log.info("item summaries for %d items (train+valid histories)", len(ids))
        summaries = services.summarizer.summarize([catalog[i] for i in ids])
        timings["item_summaries_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log.info("recurrent user summaries for %d users", len(hist))
        services.memory.update_many(list(hist.values()), catalog, summaries)
        timings["user_summaries_s"] = time.perf_counter() - t0

        # 2. examples: the preference text exactly as inference builds it (pipeline recipe)
        def context(summary: str, before: list[str]) -> str:
            return services.preference_text(before, summary, summaries)

        kw = {"seed": cfg.seed, "context": context, "positions": sft_cfg.positions}
        train_ex = examples_from_store(services.store, f_tr, f_tr, catalog, **kw)
        valid_ex = examples_from_store(services.store, f_va, f_va, catalog, **kw)
    save_examples_jsonl(train_ex, work / "train_examples.jsonl")
    save_examples_jsonl(valid_ex, work / "valid_examples.jsonl")
    log.info("SFT examples: %d train, %d valid", len(train_ex), len(valid_ex))

    # 3. zero-shot on the validation users, test protocol
    cases = valid_cases
    t0 = time.perf_counter()
    before = run_cases(services, cases, work / "valid_zero_shot", show_progress=False)
    timings["valid_zero_shot_s"] = time.perf_counter() - t0
    backend.close()
    if services.memory.llm is not backend:  # a separate generator (e.g. vLLM): free it before training
        services.memory.llm.close()
    del services, backend

    # 4. SFT
    train_metrics = train_sft(sft_cfg, train_ex, model_dir, valid_ex, resume_from_checkpoint=resume or None)
    timings["sft_s"] = train_metrics["wall_s"]

    # 5. validation users with the adapter
    name = sft_cfg.adapter_name
    cfg_after = load_config(config, [*base_ov, *msr_overrides, f"recommender.adapter={name}",
                                     f"scorer.adapters={{{name}: {sft_cfg.output_dir}}}"])
    services = build_services(cfg_after, ds)
    t0 = time.perf_counter()
    after = run_cases(services, cases, work / "valid_adapter", show_progress=False)
    timings["valid_adapter_s"] = time.perf_counter() - t0
    services.recommender.backend.close()
    timings["total_s"] = time.perf_counter() - t_all

    out = Path(sft_cfg.output_dir)
    prov = {
        "what": "LoRA adapter of the yes/no recommender (MLLM-MSR stage 2), answer-only loss",
        "command": command or "python -m mllm_msr.finetune.sft benchmark ...",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "base_model": {"path": str(model_dir),
                       "build": json.loads((Path(model_dir) / "msr_build.json").read_text())
                       if (Path(model_dir) / "msr_build.json").exists() else None},
        "data": {"dataset": cfg.dataset, "synth": cfg.synth.model_dump() if cfg.dataset == "synth" else None,
                 "synth_config_hash": cfg.synth.config_hash() if cfg.dataset == "synth" else None,
                 "protocol": cfg.protocol.model_dump(), "splits": splits.summary(),
                 "sft_train_examples": len(train_ex), "sft_valid_examples": len(valid_ex),
                 "sft_train_users": len(f_tr), "valid_users_scored": len(cases),
                 "train_user_ids": sorted(f_tr), "valid_user_ids": sorted(f_va),
                 "dataset_fingerprint": ds.fingerprint()},
        "seed": sft_cfg.seed,
        "sft_config": json.loads(sft_cfg.model_dump_json()),
        "msr_config": json.loads(cfg_after.model_dump_json()),
        "training": {k: v for k, v in train_metrics.items()},
        "valid_zero_shot": {k: v for k, v in before.items() if k != "rows"},
        "valid_adapter": {k: v for k, v in after.items() if k != "rows"},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "adapter_sha256": file_sha256(out / "adapter_model.safetensors"),
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
    }
    (out / "PROVENANCE.json").write_text(json.dumps(prov, indent=1, default=str))
    if ship:
        copy_adapter(out, ship, extra=("sft_config.json", "train_log.json", "PROVENANCE.json"))
    return {"metrics": {"zero_shot": before["metrics"], "adapter": after["metrics"],
                        "valid": train_metrics.get("eval"), "timings_s": prov["timings_s"]},
            "provenance": str(out / "PROVENANCE.json")}


# ------------------------------------------------------------------------------------- CLI
def _sft_cfg(overrides: Sequence[str], base: SFTConfig | None = None) -> SFTConfig:
    import yaml

    data = (base or SFTConfig()).model_dump()
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key=value")
        k, v = ov.split("=", 1)
        if k.strip() not in data:
            raise ValueError(f"unknown SFT setting {k!r}; one of {sorted(data)}")
        data[k.strip()] = yaml.safe_load(v)
    return SFTConfig.model_validate(data)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mllm_msr.finetune.sft", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="Train from a JSONL of examples.")
    t.add_argument("--data", required=True, help="JSONL rows {user_summary,label,item_id,title,[image_path]}")
    t.add_argument("--eval-data", help="Held-out JSONL (AUC after training).")
    t.add_argument("--model-dir", help="HF model folder (default: the embedded default model).")
    t.add_argument("--set", "-s", action="append", default=[], help="SFTConfig override key=value (repeatable).")
    t.add_argument("--resume", action="store_true", help="Resume from the latest checkpoint.")
    b = sub.add_parser("benchmark", help="Whole pipeline: train users' summaries → SFT → test before/after.")
    b.add_argument("--config", "-c", help="MSR YAML config.")
    b.add_argument("--msr-set", action="append", default=[], help="MSRConfig override key.sub=value.")
    b.add_argument("--set", "-s", action="append", default=[], help="SFTConfig override key=value.")
    b.add_argument("--work-dir", default="runs/sft", help="Where the store, runs and adapter go.")
    b.add_argument("--ship", help="Copy the final adapter + PROVENANCE.json here (e.g. mllm_msr/weights/rec_adapter).")
    b.add_argument("--max-valid-users", type=int, default=100)
    b.add_argument("--max-train-users", type=int, default=120)
    b.add_argument("--resume", action="store_true")
    m = sub.add_parser("merge", help="Merge an adapter into a full model folder.")
    m.add_argument("--model-dir", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.cmd == "train":
        from mllm_msr.models.embedded import ensure_default_model

        cfg = _sft_cfg(ns.set)
        model_dir = ns.model_dir or ensure_default_model()
        ev = load_examples_jsonl(ns.eval_data) if ns.eval_data else None
        res = train_sft(cfg, load_examples_jsonl(ns.data), model_dir, ev, resume_from_checkpoint=ns.resume or None)
        print(json.dumps({k: v for k, v in res.items() if k != "loss"}, indent=1))
    elif ns.cmd == "merge":
        print(merge_and_export(ns.model_dir, ns.adapter, ns.out))
    else:
        import sys

        res = run_benchmark(config=ns.config, msr_overrides=ns.msr_set, sft_cfg=_sft_cfg(ns.set),
                            work_dir=ns.work_dir, ship=ns.ship, max_valid_users=ns.max_valid_users,
                            resume=ns.resume, max_train_users=ns.max_train_users,
                            command=" ".join(["python -m mllm_msr.finetune.sft", *sys.argv[1:]]))
        print(json.dumps(res.get("metrics", res), indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
