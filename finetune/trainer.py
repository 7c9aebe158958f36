"""LoRA training of the yes/no recommender (:func:`train_sft`), held-out scoring
(:func:`evaluate_adapter`) and export (:func:`merge_and_export`, :func:`copy_adapter`).

transformers ``Trainer`` (checkpoints that resume, progress bar, ``logging_steps`` loss log saved as
``train_log.json``) with a loss computed from the LM head at the labelled positions only (the
full-vocabulary head on every position dominated a CPU step). The output folder is a plain PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``, fp16 by default) on the language
model's projections only, rank <= 16, so both ``TransformersBackend(adapters={"rec": dir})`` and
vLLM (``--enable-lora --lora-modules rec=dir``) load it.

Distributed: run the same command under ``torchrun --nproc_per_node N`` (or ``accelerate launch``)
and the Trainer trains with DDP (gloo on CPU, NCCL on GPUs), each process drawing its own shard of
every epoch; only process 0 writes the log, the adapter and the metrics. Checkpoints hold the LoRA
weights, optimizer, scheduler and step, so a run resumes under another number of processes (keep
batch_size x processes fixed to keep the schedule).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mllm_msr.finetune.config import SFTConfig
from mllm_msr.finetune.encoding import SFTCollator, SFTEncoder, _ListDataset
from mllm_msr.finetune.examples import SFTExample, build_sft_examples
from mllm_msr.metrics import auc_score

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


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
    import torch.nn.functional as F

    inner, head = _body_and_head(model)
    labels = batch["labels"]
    kw = {k: v for k, v in batch.items() if k != "labels"}
    h = inner(**kw, use_cache=False).last_hidden_state
    tgt = labels[:, 1:]
    mask = tgt != -100
    logits = head(h[:, :-1][mask]).float()
    return F.cross_entropy(logits, tgt[mask])


# what peft's causal-LM wrapper adds to every forward call; the answer-only loss needs none of it
_WRAPPER_KW = ("output_attentions", "output_hidden_states", "return_dict", "inputs_embeds", "num_items_in_batch",
               "use_cache")


def route_loss_through_forward(peft_model) -> None:
    """Make ``peft_model(**batch).loss`` the answer-only loss. The loss then runs inside the
    model's forward, which is what DDP wraps (its gradient all-reduce is prepared there)."""
    import types

    from transformers.modeling_outputs import CausalLMOutput

    hf = _hf_model(peft_model)

    def forward(self, labels=None, **kw):
        if kw.get("inputs_embeds") is not None:
            raise ValueError("answer-only SFT takes input_ids, not inputs_embeds")
        kw = {k: v for k, v in kw.items() if k not in _WRAPPER_KW}
        return CausalLMOutput(loss=answer_loss(self, {**kw, "labels": labels}))

    hf.forward = types.MethodType(forward, hf)


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
        bf16_autocast = False  # set per run (the Trainer's own bf16 flag would also cast the weights)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            dev = inputs["input_ids"].device.type
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.bf16_autocast):
                loss = model(**inputs).loss  # answer-only loss (route_loss_through_forward), via DDP if on
            return (loss, None) if return_outputs else loss

    return AnswerOnlyTrainer


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
    acc = sum((s > 0.5) == bool(t) for s, t in zip(scores, y, strict=True)) / max(1, len(y))
    be.close()
    return {"auc": auc_score(y, scores), "accuracy": acc, "n": len(y), "scores": scores,
            "score_s": round(time.perf_counter() - t0, 2)}


def _loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not losses:
        return {}
    k = max(1, len(losses) // 5)
    first = sum(loss for _, loss in losses[:k]) / k
    last = sum(loss for _, loss in losses[-k:]) / k
    return {"first_loss": round(first, 4), "last_loss": round(last, 4),
            "min_loss": round(min(loss for _, loss in losses), 4),
            "logged_points": len(losses), "curve": [[s, round(loss, 4)] for s, loss in losses]}


def train_sft(cfg: SFTConfig, examples: Sequence[SFTExample | Sequence[Any]], model_dir: str | Path,
              eval_examples: Sequence[SFTExample | Sequence[Any]] | None = None, *,
              resume_from_checkpoint: bool | str | None = None, show_progress: bool = True
              ) -> dict[str, Any]:
    """Train the recommender's LoRA adapter; write it to ``cfg.output_dir``; return metrics.

    ``resume_from_checkpoint``: True = the latest checkpoint in ``output_dir/checkpoints``, or a
    checkpoint folder. Metrics: steps, wall time, loss-curve summary, and (with ``eval_examples``)
    held-out AUC / accuracy scored through ``TransformersBackend`` with the saved adapter."""
    from mllm_msr.models.hf_backend import TransformersBackend

    t_start = time.perf_counter()
    examples = build_sft_examples(examples)
    if not examples:
        raise ValueError("no training examples")
    be = TransformersBackend(model_dir, max_length=cfg.max_length, threads=cfg.threads)
    enc = SFTEncoder(be, use_images=cfg.use_images, max_length=cfg.max_length, history=cfg.history)
    metrics = train_lora(cfg, lambda: enc.encode_all(examples), be,
                         resume_from_checkpoint=resume_from_checkpoint, show_progress=show_progress,
                         extra={"examples": len(examples), "positives": sum(ex.label == "yes" for ex in examples)})
    if "rank" in metrics:
        return metrics
    out = Path(cfg.output_dir)
    if eval_examples:
        ev = evaluate_adapter(model_dir, out, build_sft_examples(eval_examples), use_images=cfg.use_images,
                              batch_size=cfg.eval_batch_size, adapter_name=cfg.adapter_name,
                              history=cfg.history)
        metrics["eval"] = {k: v for k, v in ev.items() if k != "scores"}
    metrics["wall_s"] = round(time.perf_counter() - t_start, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _end_process_group(world: int) -> None:
    """Leave the DDP group explicitly (only under torchrun, world > 1): every rank waits for the
    others, then the group is destroyed.

    Left to interpreter exit, gloo's worker threads can be torn down while still joinable
    ("terminate called without an active exception", SIGABRT on a rank that finished first).
    A one-process run leaves any group alone: an in-process vLLM engine owns one of its own.
    """
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_lora(cfg: SFTConfig, encode: Callable[[], list[dict[str, Any]]], be, *,
               resume_from_checkpoint: bool | str | None = None, show_progress: bool = True,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """LoRA training of ``be``'s model (a :class:`TransformersBackend`, no adapter loaded) on rows
    ``encode()`` returns (``input_ids``, ``labels`` with -100 outside the completion, optional
    pixel inputs). Loss on the labelled positions only. Writes the adapter, ``train_log.json`` and
    ``sft_config.json`` to ``cfg.output_dir``; returns the training metrics. Shared by the
    recommender (yes/no answers) and the user memory (summaries, :mod:`mllm_msr.finetune.memory`)."""
    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments, set_seed

    t_start = time.perf_counter()
    rank, world = process_rank()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    rows = encode()
    if not rows:
        raise ValueError("no training rows")
    encode_s = time.perf_counter() - t0
    pad_id = be.tokenizer.pad_token_id
    model = be.model
    model.config.use_cache = False
    set_seed(cfg.seed)
    model = get_peft_model(model, lora_config(cfg, _n_layers(model)))
    route_loss_through_forward(model)
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
        ddp_backend=("gloo" if be.device.type == "cpu" else "nccl") if world > 1 else None,
        ddp_find_unused_parameters=False if world > 1 else None,
    )
    bf16 = use_bf16(cfg, be.device.type)
    seen: list[int] | None = [] if cfg.log_example_order else None
    trainer = _make_trainer_cls()(model=model, args=args, train_dataset=_ListDataset(rows, seen),
                                  data_collator=SFTCollator(pad_id))
    trainer.bf16_autocast = bf16
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None
        resume_from_checkpoint = last  # None: nothing to resume, start fresh
    t1 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    train_s = time.perf_counter() - t1
    if seen is not None:
        (out / f"example_order.rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "world_size": world, "examples": len(rows), "indices": seen}))
    if not trainer.is_world_process_zero():  # process 0 writes the log, adapter and metrics
        steps = trainer.state.global_step
        del trainer, model
        _end_process_group(world)
        return {"global_step": steps, "rank": rank, "world_size": world}
    history = trainer.state.log_history
    (out / "train_log.json").write_text(json.dumps(history, indent=1))

    model.save_pretrained(str(out))
    _convert_adapter_dtype(out, cfg.save_dtype)
    (out / "sft_config.json").write_text(cfg.model_dump_json(indent=1))
    steps = trainer.state.global_step
    metrics: dict[str, Any] = {
        "global_step": steps, **(extra or {}), "rows": len(rows), "processes": world,
        "trainable_params": n_trainable, "lora_modules": len(lora_modules), "bf16": bf16,
        "train_loss": round(float(result.training_loss), 4),
        "loss": _loss_summary(history),
        "encode_s": round(encode_s, 2), "train_s": round(train_s, 2),
        "s_per_step": round(train_s / max(1, steps - (trainer.state.global_step - result.global_step)), 3),
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "resumed_from": str(resume_from_checkpoint) if resume_from_checkpoint else None,
    }
    del trainer, model
    _end_process_group(world)
    be.close()
    metrics["wall_s"] = round(time.perf_counter() - t_start, 2)
    return metrics


def merge_and_export(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Base model + adapter merged into a full HF folder (config, weights, processor/tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out_dir)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    auto_model: Any
    auto_proc: Any
    if getattr(cfg, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText as auto_model
        from transformers import AutoProcessor as auto_proc
    else:
        from transformers import AutoModelForCausalLM as auto_model
        from transformers import AutoTokenizer as auto_proc
    base = auto_model.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    auto_proc.from_pretrained(str(model_dir)).save_pretrained(str(out))
    for name in ("chat_template.jinja", "generation_config.json", "msr_build.json"):
        src = model_dir / name
        if src.exists():
            shutil.copy2(src, out / name)
    (out / "merged_from.json").write_text(json.dumps({"base": str(model_dir), "adapter": str(adapter_dir)}, indent=1))
    return out


def copy_adapter(src: str | Path, dst: str | Path,
                 extra: Iterable[str] = ("sft_config.json", "train_log.json")) -> Path:
    """Copy only the adapter files (+ small logs) into ``dst`` (e.g. the shipped weights folder)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*ADAPTER_FILES, *extra):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst


