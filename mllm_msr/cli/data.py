"""`msr data`: generate the bundled benchmark, inspect any dataset."""
from __future__ import annotations

from pathlib import Path

import typer

from mllm_msr.cli.common import ConfigOpt, SetOpt, console, load_cfg, print_table

app = typer.Typer(help="Datasets: generate the bundled benchmark, inspect any dataset.", no_args_is_help=True)


@app.command("synth")
def data_synth(out: Path | None = typer.Option(None, help="Output folder (default: the cache folder)."),
               config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Generate the bundled synthetic multimodal benchmark (MicroLens layout), deterministic by seed."""
    from mllm_msr.data.synth import default_benchmark_dir, generate_benchmark

    cfg = load_cfg(config, set_)
    path = generate_benchmark(out or default_benchmark_dir(cfg.synth), cfg.synth)
    console.print(f"benchmark written to {path}")


@app.command("stats")
def data_stats(dataset: str | None = typer.Argument(None, help="synth | ml-100k | a dataset folder"),
               config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Load a dataset (validating it) and print its statistics, split sizes and load report."""
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.pipeline import load_data

    cfg = load_cfg(config, set_)
    if dataset:
        cfg = cfg.model_copy(update={"dataset": dataset})
    ds = load_data(cfg)
    splits = build_splits(ds, cfg.protocol)
    stats = {**ds.stats(), "train_examples": len(splits.train), "valid_users": len(splits.valid),
             "test_users": len(splits.test), "cold_test_items": len(splits.cold_items)}
    print_table(f"dataset {ds.name}", stats, ("stat", "value"))
    for reason, n in ds.report.dropped.items():
        console.print(f"[yellow]dropped {n} × {reason}[/]")
    for w in ds.report.warnings[:10]:
        console.print(f"[yellow]  {w}[/]")
