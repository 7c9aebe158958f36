"""`msr preset list | check NAME`: the GPU presets in configs/presets/, validated without a GPU."""
from __future__ import annotations

import typer
from rich.table import Table

from mllm_msr.cli.common import console

app = typer.Typer(help="GPU presets (configs/presets/*.yaml): the method at the paper's scale on vLLM.",
                  no_args_is_help=True)


@app.command("list")
def list_cmd() -> None:
    """The shipped presets."""
    from mllm_msr.presets import load_preset, preset_names

    for name in preset_names():
        spec, _ = load_preset(name)
        console.print(f"[bold]{name}[/]: {spec.description}")


@app.command("check")
def check(name: str = typer.Argument(..., help="Preset name (configs/presets/NAME.yaml) or a YAML file.")) -> None:
    """Validate a preset without a GPU: keys, vLLM architecture support, image tokens, LoRA target
    modules, tensor parallelism and a memory estimate; prints the vLLM serve and SFT commands."""
    from mllm_msr.presets import check_preset, load_preset

    rows = check_preset(name)
    t = Table(title=f"preset {name}")
    for col in ("check", "ok", "detail"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.what, "[green]ok[/]" if r.ok else "[red]FAIL[/]", r.detail)
    console.print(t)
    if not all(r.ok for r in rows):
        raise typer.Exit(1)
    spec, _ = load_preset(name)
    lo = spec.lora
    console.print(f"serve (each replica): {spec.serve_command()}", markup=False, highlight=False)
    console.print(f"fine-tune: msr finetune sft ... --set lora_r={lo.r} --set lora_alpha={lo.alpha} "
                  f"--set learning_rate={lo.learning_rate} --set epochs={lo.epochs} --set batch_size={lo.batch_size}",
                  markup=False, highlight=False)
