"""`msr finetune`: stage-1 vision alignment (`align`) and the recommender's LoRA SFT
(`sft train | benchmark | merge`)."""
from __future__ import annotations

import inspect
import json
import logging
import shlex
from pathlib import Path
from typing import Any

import typer

from mllm_msr.cli.common import console

app = typer.Typer(help="Alignment (vision stage 1) and LoRA SFT of the recommender.", no_args_is_help=True)
sft_app = typer.Typer(help="LoRA SFT of the yes/no recommender: `benchmark` (pipeline summaries → SFT → "
                           "validation metrics before/after), `train` (from a JSONL of examples), `merge`.",
                      no_args_is_help=True)
app.add_typer(sft_app, name="sft")

SftSetOpt = typer.Option(None, "--set", "-s", help="SFTConfig override key=value (repeatable).")
ResumeOpt = typer.Option(False, "--resume", help="Resume from the latest checkpoint.")


def _sft_cfg(sets: list[str] | None):
    from mllm_msr.config import apply_overrides
    from mllm_msr.finetune.config import SFTConfig

    try:
        return apply_overrides(SFTConfig, sets or [])
    except ValueError as e:  # pydantic's ValidationError is a ValueError too
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from e


def _progress_logs() -> None:
    """Our own INFO progress lines (stages, example counts) on the console."""
    logging.getLogger("mllm_msr").setLevel(logging.INFO)


@sft_app.command("train")
def sft_train(data: Path = typer.Option(..., help="JSONL rows {user_summary,label,item_id,title,[image_path]}."),
              eval_data: Path | None = typer.Option(None, help="Held-out JSONL (AUC after training)."),
              model_dir: Path | None = typer.Option(None, help="HF model folder (default: the embedded model)."),
              set_: list[str] | None = SftSetOpt, resume: bool = ResumeOpt) -> None:
    """Train the LoRA adapter from a JSONL of examples (DDP under `torchrun --nproc_per_node N -m mllm_msr.cli …`)."""
    from mllm_msr.finetune.examples import load_examples_jsonl
    from mllm_msr.finetune.trainer import train_sft
    from mllm_msr.models.embedded import ensure_default_model

    cfg = _sft_cfg(set_)
    _progress_logs()
    ev = load_examples_jsonl(eval_data) if eval_data else None
    res = train_sft(cfg, load_examples_jsonl(data), model_dir or ensure_default_model(), ev,
                    resume_from_checkpoint=resume or None)
    if "rank" not in res:  # under torchrun only process 0 reports
        print(json.dumps({k: v for k, v in res.items() if k != "loss"}, indent=1))


def benchmark_command(config: Path | None, msr_set: list[str], sets: list[str], work_dir: Path,
                      ship: Path | None, max_valid_users: int, max_train_users: int, resume: bool,
                      zero_shot: bool = True) -> str:
    """The `msr finetune sft benchmark` command line that reproduces a run (for PROVENANCE.json)."""
    args = ["msr", "finetune", "sft", "benchmark", "--work-dir", str(work_dir)]
    args += ["--config", str(config)] if config else []
    args += [a for s in msr_set for a in ("--msr-set", s)] + [a for s in sets for a in ("--set", s)]
    args += ["--max-valid-users", str(max_valid_users), "--max-train-users", str(max_train_users)]
    args += (["--ship", str(ship)] if ship else []) + (["--resume"] if resume else [])
    args += [] if zero_shot else ["--no-zero-shot"]
    return shlex.join(args)


@sft_app.command("benchmark")
def sft_benchmark(config: Path | None = typer.Option(None, "--config", "-c", help="MSR YAML config."),
                  msr_set: list[str] | None = typer.Option(None, "--msr-set",
                                                           help="MSRConfig override key.sub=value (repeatable)."),
                  set_: list[str] | None = SftSetOpt,
                  work_dir: Path = typer.Option(Path("runs/sft"), help="Where the store, runs and adapter go."),
                  ship: Path | None = typer.Option(None, help="Copy the final adapter + PROVENANCE.json here "
                                                   "(e.g. mllm_msr/weights/rec_adapter)."),
                  max_valid_users: int = typer.Option(100, help="Validation users scored (the first N of the split)."),
                  max_train_users: int = typer.Option(120, help="Training users whose summaries become SFT "
                                                      "examples (the first N)."),
                  resume: bool = ResumeOpt,
                  zero_shot: bool = typer.Option(True, help="Also score the validation users zero-shot (before).")
                  ) -> None:
    """Whole stage 2: train/valid users' summaries → SFT → validation metrics before/after (never the test set)."""
    from mllm_msr.finetune.benchmark import run_benchmark

    cfg = _sft_cfg(set_)
    _progress_logs()
    command = benchmark_command(config, msr_set or [], set_ or [], work_dir, ship, max_valid_users,
                                max_train_users, resume, zero_shot)
    res = run_benchmark(config=config, msr_overrides=msr_set or [], sft_cfg=cfg, work_dir=work_dir, ship=ship,
                        max_valid_users=max_valid_users, resume=resume, max_train_users=max_train_users,
                        command=command, zero_shot=zero_shot)
    print(json.dumps(res.get("metrics", res), indent=1))


@app.command("memory")
def memory_cmd(config: Path | None = typer.Option(None, "--config", "-c", help="MSR YAML config."),
               msr_set: list[str] | None = typer.Option(None, "--msr-set",
                                                        help="MSRConfig override key.sub=value (repeatable)."),
               set_: list[str] | None = typer.Option(None, "--set", "-s", help="MemorySFTConfig override key=value "
                                                     "(repeatable; LoRA settings as lora.KEY=VALUE)."),
               work_dir: Path = typer.Option(Path("runs/memory_sft"), help="Where the store, samples and adapter go."),
               ship: Path | None = typer.Option(None, help="Copy the adapter + PROVENANCE.json here "
                                                "(e.g. mllm_msr/weights/memory_adapter)."),
               resume: bool = ResumeOpt) -> None:
    """Expert iteration of the user memory: sample block updates of training users, keep those whose words
    retrieve the user's next items, LoRA-train the memory on them, report validation before/after."""
    from mllm_msr.config import apply_overrides
    from mllm_msr.finetune.memory import MemorySFTConfig, run_memory_sft

    try:
        mcfg = apply_overrides(MemorySFTConfig, set_ or [])
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from e
    _progress_logs()
    args = ["msr", "finetune", "memory", "--work-dir", str(work_dir)]
    args += ["--config", str(config)] if config else []
    args += [a for x in msr_set or [] for a in ("--msr-set", x)] + [a for x in set_ or [] for a in ("--set", x)]
    args += (["--ship", str(ship)] if ship else []) + (["--resume"] if resume else [])
    res = run_memory_sft(config, msr_set or [], mcfg, work_dir, ship, shlex.join(args), resume)
    print(json.dumps(res, indent=1, default=str))


@sft_app.command("merge")
def sft_merge(model_dir: Path = typer.Option(..., help="Base HF model folder."),
              adapter: Path = typer.Option(..., help="LoRA adapter folder."),
              out: Path = typer.Option(..., help="Where the merged model folder goes.")) -> None:
    """Merge an adapter into a full model folder."""
    from mllm_msr.finetune.trainer import merge_and_export

    print(merge_and_export(model_dir, adapter, out))


def _align_options() -> list[inspect.Parameter]:
    """One CLI option per AlignConfig field (``--n-train 2400``, ``--resume/--no-resume``, ``--out``)."""
    from mllm_msr.finetune.align import AlignConfig

    params = []
    for name, f in AlignConfig.model_fields.items():
        flags = ["--out", "--out-dir"] if name == "out_dir" else ["--" + name.replace("_", "-")]
        if f.annotation is bool:
            flags = [f"{flags[0]}/--no-{flags[0][2:]}"]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=f.annotation,
                                        default=typer.Option(f.default, *flags, help=f.description)))
    return params


def finetune_align(evaluate: Path | None = None, **fields: Any) -> dict[str, Any]:
    """Stage-1 alignment of the embedded model's vision encoder + connector (language model frozen);
    writes vision.safetensors + PROVENANCE.json to --out (--evaluate: only caption held-out covers)."""
    from mllm_msr.data.covers import get_catalog
    from mllm_msr.finetune.align import AlignConfig, align, evaluate_captions

    cfg = AlignConfig(**fields)
    if evaluate:
        import torch

        torch.set_num_threads(cfg.threads)
        res = evaluate_captions(evaluate, cfg.n_eval, cfg.eval_seed, get_catalog(cfg.catalog))
    else:
        res = align(cfg)
    print(json.dumps(res, indent=1, ensure_ascii=False))
    return res


finetune_align.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("evaluate", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                       default=typer.Option(None, "--evaluate", metavar="MODEL_DIR",
                                            help="Only caption held-out covers with this composite folder.")),
     *_align_options()])
app.command("align")(finetune_align)
