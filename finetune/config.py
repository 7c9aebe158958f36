"""Settings of the recommender's LoRA SFT (stage 2, paper Sec. 3.4): :class:`SFTConfig`."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# Language-model projections only: the negative look-ahead keeps the vision tower (whose attention
# also has q/k/v_proj) out, so the adapter holds nothing vLLM's LoRA loader would refuse.
LM_TARGET_MODULES = (r"^(?!.*(?:vision|visual|image_tower|connector|multi_modal_projector)).*"
                     r"\.layers\.\d+\.(?:self_attn|mlp)\."
                     r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


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

    lora_r: int = Field(16, ge=1, le=64,
        description="LoRA rank (keep <= 16 so vLLM's default --max-lora-rank accepts it; paper 8).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str = Field(LM_TARGET_MODULES,
        description="Regex (full match on module names) of the LoRA'd modules: the language model's "
                    "q,k,v,o,gate,up,down projections, never the vision tower.")
    lora_top_layers: int = Field(16, ge=0,
        description="LoRA only the top N decoder layers (0 = all). Backward then stops at the lowest adapted layer: "
                    "fewer layers = faster CPU steps. 16 of SmolLM2's 30 learned the benchmark (valid AUC 0.69); 10 "
                    "with lr 1e-3 stayed at chance.")
    learning_rate: float = Field(5e-4, gt=0.0,
        description="Peak AdamW learning rate (paper 2e-5 for 7B). For the 135M embedded model 5e-4 learned (test AUC "
                    "0.50 -> 0.71 on the bundled benchmark); 1e-3 plateaued at chance.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    epochs: float = Field(3.0, gt=0.0, description="Passes over the training examples (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = use epochs).")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass, per process: under torchrun the "
                                                  "effective batch is batch_size x processes x grad_accum.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_length: int = Field(1024, ge=16,
        description="Longest tokenised example (prompt + answer); longer ones are an error, never silently cut.")
    seed: int = Field(0, description="Seed of LoRA init, data order and dropout.")
    train_connector: bool = Field(False,
        description="Also train the vision connector and encoder fully (modules_to_save). Such adapters load in "
                    "transformers/peft but NOT in vLLM.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0,
        description="Fraction of steps of linear warm-up (then cosine decay).")
    lr_scheduler: str = Field("cosine",
        description="transformers scheduler name (cosine, linear, constant_with_warmup, ...).")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every this many steps (train_log.json).")
    save_steps: int = Field(50, ge=1,
        description="Write a resumable checkpoint every this many steps (output_dir/checkpoints).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    output_dir: str = Field("runs/sft/rec_adapter",
        description="Adapter folder written at the end (checkpoints go to its checkpoints/ subfolder).")
    save_dtype: str = Field("float16",
        description="dtype of the saved adapter weights (float16 halves the file; float32 keeps it exact).")
    bf16: bool | None = Field(None,
        description="bf16 autocast for the forward/backward (None = auto: on when the CPU has native bf16 matmuls (AMX"
                    " / AVX512-BF16) or on a bf16 GPU). Measured on the 2-core dev CPU: 1.56 vs 2.55 s per step "
                    "(1.6x). LoRA weights, optimizer and the saved adapter stay float32 / save_dtype.")
    threads: int | None = Field(None,
        description="torch CPU threads (None = leave torch's setting). On a shared machine 1 is often fastest "
                    "(oversubscribed threads slow a step many times).")
    eval_batch_size: int = Field(16, ge=1, description="Batch size when scoring held-out examples.")
    use_images: bool = Field(True,
        description="Show the candidate's cover in the prompt (must match RecommenderConfig.use_images at inference).")
    history: Literal["summary", "titles"] = Field("summary",
        description="Prompt family (as RecommenderConfig.history): 'summary' = MLLM-MSR; 'titles' = TALLRec-style "
                    "titles-only baseline (set use_images=false).")
    positions: Literal["all", "block_ends"] = Field("all",
        description="Benchmark SFT cases: every history position after the first summary ('all', ~3x the data) or only"
                    " where a summary version ends ('block_ends').")
    negatives: Literal["uniform", "popularity"] = Field("uniform",
        description="How benchmark SFT negatives are drawn from the items a user never touched: 'uniform' (the paper)"
                    " or 'popularity' (in proportion to how often each item occurs in the training users' sequences,"
                    " so positives and negatives share one item prior and items unseen in training are never drawn;"
                    " with uniform negatives an adapter can learn 'unseen item -> no' instead of the preference "
                    "match).")
    log_example_order: bool = Field(False,
        description="Write the indices of the training examples each process drew, in order, to "
                    "output_dir/example_order.rank{R}.json (an audit of how distributed training shards the data).")
    adapter_name: str = Field("rec",
        description="Adapter name used for evaluation requests (as RecommenderConfig.adapter).")

