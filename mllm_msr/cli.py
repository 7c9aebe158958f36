"""The `msr` command line (typer). Every command takes ``--config FILE`` and ``--set key=value``."""
from __future__ import annotations

import difflib
import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="mllm-msr: multimodal sequential recommendation with (M)LLMs.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: generate the bundled benchmark, inspect any dataset.", no_args_is_help=True)
prompts_app = typer.Typer(help="Prompt workbench: list, show and diff prompt files.", no_args_is_help=True)
finetune_app = typer.Typer(help="Alignment (vision stage 1) and LoRA SFT of the recommender.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(prompts_app, name="prompts")
app.add_typer(finetune_app, name="finetune")
console = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (layered over the defaults).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a setting: key.sub=value (repeatable).")


def _cfg(config: Optional[Path], sets: Optional[List[str]]):
    from mllm_msr.config import load_config

    return load_config(config, sets or [])


@contextmanager
def run_lock(*folders: Path) -> Iterator[None]:
    """One run per run folder and per local Chroma store: a second concurrent run on either is
    refused with a clear message instead of two processes writing the same store."""
    handles = []
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            fh = open(folder / ".msr-lock", "w")
            handles.append(fh)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                console.print(f"[red]another msr run is using {folder}; wait for it or choose another "
                              f"run_dir / store.path[/]")
                raise typer.Exit(2)
        yield
    finally:
        for fh in handles:
            fh.close()


def _user_sequences(ds, user: str) -> dict:
    """The dataset's sequences, or exit 2 with a clear message when ``user`` is not in it."""
    seqs = ds.sequences()
    if user not in seqs:
        console.print(f"[red]unknown user {user!r} in {ds.name} (e.g. {', '.join(list(seqs)[:5])})[/]")
        raise typer.Exit(2)
    return seqs


def _print_metrics(title: str, metrics: dict) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)


@data_app.command("synth")
def data_synth(out: Optional[Path] = typer.Option(None, help="Output folder (default: the cache folder)."),
               config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Generate the bundled synthetic multimodal benchmark (MicroLens layout), deterministic by seed."""
    from mllm_msr.data.synth import default_benchmark_dir, generate_benchmark

    cfg = _cfg(config, set_)
    path = generate_benchmark(out or default_benchmark_dir(cfg.synth), cfg.synth)
    console.print(f"benchmark written to {path}")


@data_app.command("stats")
def data_stats(dataset: Optional[str] = typer.Argument(None, help="synth | ml-100k | a dataset folder"),
               config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Load a dataset (validating it) and print its statistics, split sizes and load report."""
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.pipeline import load_data

    cfg = _cfg(config, set_)
    if dataset:
        cfg = cfg.model_copy(update={"dataset": dataset})
    ds = load_data(cfg)
    splits = build_splits(ds, cfg.protocol)
    stats = {**ds.stats(), "train_examples": len(splits.train), "valid_users": len(splits.valid),
             "test_users": len(splits.test), "cold_test_items": len(splits.cold_items)}
    t = Table(title=f"dataset {ds.name}")
    t.add_column("stat")
    t.add_column("value")
    for k, v in stats.items():
        t.add_row(k, str(v))
    console.print(t)
    for reason, n in ds.report.dropped.items():
        console.print(f"[yellow]dropped {n} × {reason}[/]")
    for w in ds.report.warnings[:10]:
        console.print(f"[yellow]  {w}[/]")


@app.command("run")
def run(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        users: Optional[int] = typer.Option(None, help="Evaluate at most this many test users."),
        quiet: bool = typer.Option(False, help="No progress bars.")) -> None:
    """The main job: summarise items, build user memories, score the test candidates, report metrics."""
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.pipeline import run_cases
    from mllm_msr.pipeline import build_services, load_data, finalize_config

    cfg = finalize_config(_cfg(config, set_))
    run_dir = Path(cfg.run_dir)
    locks = [run_dir] + ([] if cfg.store.host else [Path(cfg.store.path)])
    with run_lock(*locks):
        ds = load_data(cfg)
        splits = build_splits(ds, cfg.protocol)
        cases = splits.test[: users or cfg.max_test_users or len(splits.test)]
        console.print(f"dataset {ds.name}: {len(ds.items)} items, {len(cases)} test users × "
                      f"{len(cases[0].candidates) if cases else 0} candidates; scorer adapter: "
                      f"{cfg.recommender.adapter or 'none (zero-shot)'}")
        services = build_services(cfg, ds)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
        result = run_cases(services, cases, run_dir, show_progress=not quiet)
    _print_metrics(f"MLLM-MSR on {ds.name} ({result['users']} test users)", result["metrics"])
    console.print(f"model calls: {result['model_calls']}  timings: {result['timings_s']}")
    console.print(f"results in {run_dir}/metrics.json and {run_dir}/scores.jsonl")


@app.command("recommend")
def recommend(user: str = typer.Option(..., "--user", "-u", help="User id."),
              top: int = typer.Option(10, help="How many items to show."),
              retrieve: bool = typer.Option(False, help="Retrieve candidates from Chroma instead of the test candidates."),
              config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """One user's preference summary and top items with scores (runs the LangGraph pipeline)."""
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.graphs.pipeline import compile_pipeline, make_checkpointer, thread
    from mllm_msr.pipeline import build_services, load_data, finalize_config

    cfg = finalize_config(_cfg(config, set_))
    ds = load_data(cfg)
    seqs = _user_sequences(ds, user)
    splits = build_splits(ds, cfg.protocol)
    case = next((c for c in (*splits.test, *splits.valid) if c.user_id == user), None)
    if case is not None:
        history, ts = list(case.history), list(case.history_timestamps)
    else:
        history, ts = [i.item_id for i in seqs[user]], [i.timestamp for i in seqs[user]]
    candidates = [] if (retrieve or case is None) else list(case.candidates)
    services = build_services(cfg, ds)
    graph = compile_pipeline(services, make_checkpointer(cfg))
    state = graph.invoke({"user_id": user, "history": history, "history_timestamps": ts,
                          "candidates": candidates}, thread(user))
    console.print(f"[bold]user {user}[/] — history of {len(history)} items")
    console.print(f"[bold]preference summary:[/] {state['user_summary']}")
    t = Table(title="top items")
    for col in ("rank", "item", "title", "score", "target"):
        t.add_column(col)
    positives = {c for c, l in zip(case.candidates, case.labels) if l} if case else set()
    for r, row in enumerate(state["ranking"][:top], 1):
        t.add_row(str(r), row["item_id"], row["title"], f"{row['score']:.3f}",
                  "✓" if row["item_id"] in positives else "")
    console.print(t)


@app.command("config")
def config_cmd(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
               as_yaml: bool = typer.Option(False, "--yaml", help="Print the effective config as YAML.")) -> None:
    """Every setting with its default and help (or the effective config as YAML)."""
    import yaml

    from mllm_msr.config import describe

    if as_yaml:
        console.print(yaml.safe_dump(_cfg(config, set_).model_dump(), sort_keys=False))
        return
    t = Table(title="settings (override with --set key=value or a YAML file)")
    for col in ("key", "default", "help"):
        t.add_column(col)
    for row in describe():
        t.add_row(*row)
    console.print(t)


@prompts_app.command("list")
def prompts_list(prompt_dir: Optional[Path] = typer.Option(None, help="Prompt folder.")) -> None:
    """Prompt files with their version (content hash) and variables."""
    from mllm_msr.prompts import list_prompts, load_prompt

    t = Table()
    for col in ("name", "version", "variables", "image", "description"):
        t.add_column(col)
    for n in list_prompts(prompt_dir):
        p = load_prompt(n, prompt_dir)
        t.add_row(p.name, p.version, ", ".join(p.variables), "yes" if p.image else "", p.description)
    console.print(t)


@prompts_app.command("show")
def prompts_show(name: str, prompt_dir: Optional[Path] = typer.Option(None, help="Prompt folder.")) -> None:
    """Print a prompt file."""
    from mllm_msr.prompts import load_prompt

    p = load_prompt(name, prompt_dir)
    console.print(f"[bold]{p.key}[/] ({p.path})")
    console.print(p.path.read_text(encoding="utf-8"), markup=False, highlight=False)


@prompts_app.command("diff")
def prompts_diff(a: Path = typer.Argument(..., help="Prompt file A"), b: Path = typer.Argument(..., help="Prompt file B")) -> None:
    """Unified diff of two prompt files (e.g. a packaged prompt and your edited copy)."""
    la = a.read_text(encoding="utf-8").splitlines(keepends=True)
    lb = b.read_text(encoding="utf-8").splitlines(keepends=True)
    console.print("".join(difflib.unified_diff(la, lb, str(a), str(b))) or "identical",
                  markup=False, highlight=False)


@app.command("chat")
def chat(user: str = typer.Option(..., "--user", "-u", help="User id."),
         config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Conversational recommender: say what you like or want; the memory folds it in and answers."""
    from langchain_core.messages import HumanMessage

    from mllm_msr.agents.user_memory import UserHistory
    from mllm_msr.graphs.chat import compile_chat
    from mllm_msr.graphs.pipeline import make_checkpointer, thread
    from mllm_msr.pipeline import build_services, load_data, finalize_config

    cfg = finalize_config(_cfg(config, set_))
    ds = load_data(cfg)
    seqs = _user_sequences(ds, user)
    s = build_services(cfg, ds)
    console.print("preparing item summaries (cached after the first time)…")
    summaries = s.summarizer.summarize(list(ds.items.values()))
    hist = [i.item_id for i in seqs[user]]
    s.memory.update_many([UserHistory(user, tuple(hist), tuple(i.timestamp for i in seqs[user]))],
                         ds.items, summaries)
    graph = compile_chat(s, make_checkpointer(cfg, "chat"))
    conf = thread(f"chat:{user}")
    console.print(f"[bold]chatting as {user}[/] ({len(hist)} items in history). Empty line = recommend, 'quit' to stop.")
    while True:
        try:
            text = console.input("[bold cyan]you> [/]")
        except (EOFError, KeyboardInterrupt):
            break
        if text.strip().lower() in {"quit", "exit"}:
            break
        state = graph.invoke({"user_id": user, "history": hist, "messages": [HumanMessage(text)]}, conf)
        console.print("[bold green]msr>[/] ", end="")
        console.print(str(state["messages"][-1].content), markup=False, highlight=False)


_PASS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@finetune_app.command("align", context_settings=_PASS)
def finetune_align(ctx: typer.Context) -> None:
    """Stage-1 alignment of the embedded model's vision encoder + connector (LM frozen).

    Flags are AlignConfig's (`msr finetune align --help`), e.g. `--out mllm_msr/weights/vision --steps 480`."""
    from mllm_msr.finetune.align import main as align_main

    align_main(ctx.args)


@finetune_app.command("sft", context_settings=_PASS)
def finetune_sft(ctx: typer.Context) -> None:
    """LoRA SFT of the yes/no recommender: `benchmark` (pipeline summaries → SFT → before/after
    metrics), `train` (from a JSONL of examples) or `merge` (export a merged model); `--help` for flags."""
    from mllm_msr.finetune.sft import main as sft_main

    raise typer.Exit(sft_main(ctx.args))


@prompts_app.command("eval")
def prompts_eval(a: Path = typer.Argument(..., help="Prompt folder A (e.g. the packaged prompts/)."),
                 b: Path = typer.Argument(..., help="Prompt folder B (may hold only the changed files)."),
                 users: int = typer.Option(8, help="Test users sampled (the same for both)."),
                 config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Run two prompt versions on the same users; print metric differences (B − A) with 95% CIs."""
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.evaluation.prompt_eval import compare, complete_prompt_dir, with_prompts
    from mllm_msr.pipeline import build_services, load_data, make_backends, finalize_config
    from mllm_msr.stores.summaries import SummaryStore

    cfg = finalize_config(_cfg(config, set_))
    work = Path(cfg.run_dir) / "prompt-eval"
    work.mkdir(parents=True, exist_ok=True)
    da, db = complete_prompt_dir(a, work), complete_prompt_dir(b, work)
    ds = load_data(cfg)
    cases = build_splits(ds, cfg.protocol).test[:users]
    gen, sc = make_backends(cfg)
    store = SummaryStore(cfg.store)
    res = compare(lambda d: build_services(with_prompts(cfg, d), ds, generator=gen, scorer=sc, store=store),
                  cases, da, db, work)
    t = Table(title=f"prompts B − A on {res['users']} users (paired bootstrap 95% CI)")
    for col in ("metric", "A", "B", "B − A", "95% CI"):
        t.add_column(col)
    for m, d in res["diff_b_minus_a"].items():
        t.add_row(m, f"{d['A']:.4f}", f"{d['B']:.4f}", f"{d['diff']:+.4f}", f"[{d['low']:+.4f}, {d['high']:+.4f}]")
    console.print(t)
    console.print(f"model calls: {res['model_calls']}")


@app.command("web")
def web(port: int = typer.Option(8765, help="Port to serve on."),
        users: int = typer.Option(12, help="How many test users to list."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs "
                                 "--allow-remote and a token."),
        allow_remote: bool = typer.Option(False, "--allow-remote",
                                          help="Allow binding a non-loopback --host (a token is then required)."),
        token: str | None = typer.Option(None, envvar="MSR_WEB_TOKEN", show_default=False,
                                            help="Require this token on every request (Authorization: Bearer, "
                                                 "or ?token= once in a browser). Env: MSR_WEB_TOKEN."),
        config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Web demo: history covers, summary evolution, recommendations with scores, and a chat box."""
    from mllm_msr.web import check_bind

    try:
        check_bind(host, allow_remote, token)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    import uvicorn

    from mllm_msr.data.protocol import build_splits
    from mllm_msr.pipeline import build_services, load_data, finalize_config
    from mllm_msr.web import create_app

    cfg = finalize_config(_cfg(config, set_))
    ds = load_data(cfg)
    s = build_services(cfg, ds)
    cases = build_splits(ds, cfg.protocol).test[:users]
    console.print("preparing item summaries (cached after the first time)…")
    s.summarizer.summarize(list(ds.items.values()))
    table = {c.user_id: {"history": list(c.history), "timestamps": list(c.history_timestamps),
                         "candidates": list(c.candidates)} for c in cases}
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving on http://{shown}:{port}/" + (" (token required)" if token else ""))
    uvicorn.run(create_app(s, table, token=token), host=host, port=port, log_level="warning")


# `msr eval` and `msr report`: mllm_msr/cli/eval.py (added by the lead after the cli package split)


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=os.environ.get("MSR_LOG", "WARNING"))
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
