"""`msr prompts`: list, show, diff and evaluate prompt files."""
from __future__ import annotations

import difflib
from pathlib import Path

import typer
from rich.table import Table

from mllm_msr.cli.common import ConfigOpt, SetOpt, console, load_cfg

app = typer.Typer(help="Prompt workbench: list, show and diff prompt files.", no_args_is_help=True)
PromptDirOpt = typer.Option(None, help="Prompt folder.")


@app.command("list")
def prompts_list(prompt_dir: Path | None = PromptDirOpt) -> None:
    """Prompt files with their version (content hash) and variables."""
    from mllm_msr.prompting import list_prompts, load_prompt

    t = Table()
    for col in ("name", "version", "variables", "image", "description"):
        t.add_column(col)
    for n in list_prompts(prompt_dir):
        p = load_prompt(n, prompt_dir)
        t.add_row(p.name, p.version, ", ".join(p.variables), "yes" if p.image else "", p.description)
    console.print(t)


@app.command("show")
def prompts_show(name: str, prompt_dir: Path | None = PromptDirOpt) -> None:
    """Print a prompt file."""
    from mllm_msr.prompting import load_prompt

    p = load_prompt(name, prompt_dir)
    if p.path is None:
        raise typer.BadParameter(f"prompt {name!r} has no file")
    console.print(f"[bold]{p.key}[/] ({p.path})")
    console.print(p.path.read_text(encoding="utf-8"), markup=False, highlight=False)


@app.command("diff")
def prompts_diff(a: Path = typer.Argument(..., help="Prompt file A"),
                 b: Path = typer.Argument(..., help="Prompt file B")) -> None:
    """Unified diff of two prompt files (e.g. a packaged prompt and your edited copy)."""
    la = a.read_text(encoding="utf-8").splitlines(keepends=True)
    lb = b.read_text(encoding="utf-8").splitlines(keepends=True)
    console.print("".join(difflib.unified_diff(la, lb, str(a), str(b))) or "identical",
                  markup=False, highlight=False)


@app.command("eval")
def prompts_eval(a: Path = typer.Argument(..., help="Prompt folder A (e.g. the packaged prompts/)."),
                 b: Path = typer.Argument(..., help="Prompt folder B (may hold only the changed files)."),
                 users: int = typer.Option(8, help="Users scored (the first N of the split; the same for both)."),
                 split: str = typer.Option("valid", help="'valid' (choose prompts here) or 'test' (report once)."),
                 config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Run two prompt versions on the same users; print metric differences (B − A) with 95% CIs.
    Prompts are settings: choose them on validation users (the default), read the test set once."""
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.evaluation.prompt_eval import compare, complete_prompt_dir, with_prompts
    from mllm_msr.pipeline import build_services, finalize_config, load_data, make_backends
    from mllm_msr.stores.summaries import SummaryStore

    cfg = finalize_config(load_cfg(config, set_))
    work = Path(cfg.run_dir) / "prompt-eval"
    work.mkdir(parents=True, exist_ok=True)
    da, db = complete_prompt_dir(a, work), complete_prompt_dir(b, work)
    ds = load_data(cfg)
    if split not in ("valid", "test"):
        raise typer.BadParameter("expected 'valid' or 'test'", param_hint="--split")
    cases = getattr(build_splits(ds, cfg.protocol), split)[:users]
    gen, sc = make_backends(cfg)
    store = SummaryStore(cfg.store)
    res = compare(lambda d: build_services(with_prompts(cfg, d), ds, generator=gen, scorer=sc, store=store),
                  cases, da, db, work)
    t = Table(title=f"prompts B − A on {res['users']} {split} users (paired bootstrap 95% CI over users)")
    for col in ("metric", "A", "B", "B − A", "95% CI"):
        t.add_column(col)
    for m, d in res["diff_b_minus_a"].items():
        t.add_row(m, f"{d['A']:.4f}", f"{d['B']:.4f}", f"{d['diff']:+.4f}", f"[{d['low']:+.4f}, {d['high']:+.4f}]")
    console.print(t)
    console.print(f"model calls: {res['model_calls']}")
