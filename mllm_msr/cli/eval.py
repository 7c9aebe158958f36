"""`msr eval` (every row on the same test users, intervals, paired differences, result files) and
`msr report` (README tables and plots regenerated from the committed result files)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from mllm_msr.cli.common import ConfigOpt, SetOpt, console, load_cfg, run_lock
from mllm_msr.evaluation.rows import DEFAULT_ROWS, GROUPS, ROWS

REPO = Path(__file__).resolve().parents[2]


def eval_cmd(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
             dataset: str | None = typer.Option(None, help="synth | ml-100k | a dataset folder (default: config)."),
             rows: str = typer.Option(",".join(DEFAULT_ROWS), help=f"Comma-separated rows or groups. Rows: "
                                      f"{', '.join(ROWS)}. Groups: {', '.join(GROUPS)}."),
             users: int | None = typer.Option(None, help="Cap on test users (a smoke run: cannot write --results)."),
             valid_users: int = typer.Option(100, help="Validation users scored per row (test protocol)."),
             out: Path | None = typer.Option(None, help="Working folder (default: run_dir); OUT/eval/ is the cache."),
             results: Path | None = typer.Option(None, help="The committed results/<dataset>/ folder: keep each "
                                                 "row's per-user record in RESULTS/rows/ (reused while its settings "
                                                 "are unchanged) and write results.json, table.md and plots there "
                                                 "for every comparable row committed so far."),
             baseline: list[str] | None = typer.Option(None, "--baseline", "-b", help="Baseline setting key=value "
                                                       "(repeatable), e.g. epochs=40."),
             tune: bool = typer.Option(True, help="Choose each baseline's settings on validation (a small grid)."),
             quiet: bool = typer.Option(False, help="No progress bars.")) -> None:
    """The paper's main table: every row on the same test users and candidates, bootstrap intervals
    over users, paired differences to MLLM-MSR, warm and cold targets apart, validation metrics."""
    from mllm_msr.config import apply_overrides
    from mllm_msr.evaluation.baselines import BaselineConfig
    from mllm_msr.evaluation.rows import parse_rows
    from mllm_msr.evaluation.suite import SmokeRunError, run_suite
    from mllm_msr.pipeline import load_data

    cfg = load_cfg(config, set_)
    if dataset:
        cfg = cfg.model_copy(update={"dataset": dataset})
    try:
        row_keys = parse_rows(rows)
        bcfg = apply_overrides(BaselineConfig(), baseline or [])
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    out_dir = Path(out or cfg.run_dir)
    command = "msr " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with run_lock(out_dir / "eval"):
        ds = load_data(cfg)
        try:
            payload = run_suite(cfg, ds, row_keys, out_dir, results_dir=results, users=users,
                                valid_users=valid_users, baseline_cfg=bcfg, tune=tune, command=command,
                                show_progress=not quiet)
        except SmokeRunError as e:
            console.print(f"[red]{e}[/]")
            raise typer.Exit(2) from None
    from mllm_msr.evaluation.report import render_tables

    console.print(render_tables(payload), markup=False, highlight=False)
    console.print(f"results in {out_dir / 'eval'}" + (f" and {results}" if results else ""))


def report_cmd(results: Path = typer.Option(REPO / "results", help="Folder of committed result files."),
               readme: Path = typer.Option(REPO / "README.md", help="README whose result blocks are regenerated."),
               check: bool = typer.Option(False, help="Only check: exit 1 when the README differs from the files.")
               ) -> None:
    """Regenerate the README's result tables (``<!-- results:NAME -->`` blocks) and plots from the
    committed result files."""
    import json

    from mllm_msr.evaluation.report import committed_tables, plots, update_readme

    tables = committed_tables(results)
    changed = update_readme(readme, tables, check=check)
    if check:
        if changed:
            console.print(f"[red]README blocks out of date with {results}: {', '.join(changed)}; run `msr report`[/]")
            raise typer.Exit(1)
        console.print("README matches the committed results")
        return
    for f in sorted(results.glob("*/results.json")):
        plots(json.loads(f.read_text(encoding="utf-8")), f.parent)
    console.print(f"regenerated: {', '.join(changed) or 'nothing changed'}")
