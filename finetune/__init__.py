"""Fine-tuning (installed as ``mllm_msr.finetune``).

Stage 1, vision alignment: :mod:`.align`. Stage 2, the recommender's LoRA SFT (TRL-style modules):
:mod:`.config` (``SFTConfig``), :mod:`.examples` (``SFTExample``, builders, JSONL I/O),
:mod:`.encoding` (encoder, collator), :mod:`.trainer` (loss, ``Trainer`` subclass, ``train_sft``,
``evaluate_adapter``, merge/export), :mod:`.benchmark` (``run_benchmark``). Command line:
``msr finetune align`` and ``msr finetune sft train | benchmark | merge``.
"""
