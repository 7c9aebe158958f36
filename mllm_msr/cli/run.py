"""The top-level commands that run the method: `msr run`, `recommend`, `chat`, `web`, `config`.

Plain functions; :mod:`mllm_msr.cli` registers them on the `msr` app."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import Progress
from rich.table import Table

from mllm_msr.cli.common import ConfigOpt, SetOpt, console, load_cfg, print_table, run_lock, user_sequences

UserOpt = typer.Option(..., "--user", "-u", help="User id.")


def run(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
        users: int | None = typer.Option(None, help="Evaluate at most this many test users."),
        quiet: bool = typer.Option(False, help="No progress bars."),
        record: Path | None = typer.Option(None, help="Also write the run's metrics.json, with its command, date, "
                                           "machine and memory peak, here (the committed results/run/ the README "
                                           "quotes); refused with --users (a smoke run) or --set.")) -> None:
    """The main job: summarise items, build user memories, score the test candidates, report metrics."""
    import json
    import os
    import platform
    import resource
    import sys
    import time

    from mllm_msr.data.protocol import build_splits
    from mllm_msr.pipeline import build_services, finalize_config, load_data, run_cases

    if record is not None and (users is not None or set_ or config):
        console.print("[red]--record writes the committed result of the default main job: drop --users, --set "
                      "and --config[/]")
        raise typer.Exit(2)
    load0 = os.getloadavg()
    cfg = finalize_config(load_cfg(config, set_))
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
    m = result["metrics"]
    print_table(f"MLLM-MSR on {ds.name} ({result['users']} test users)", m)
    if "auc_ci95_low" in m:
        console.print(f"[bold]AUC {m['auc']:.3f}[/] (95% bootstrap interval over the {result['users']} test users: "
                      f"{m['auc_ci95_low']:.3f}–{m['auc_ci95_high']:.3f})")
    console.print(f"model calls: {result['model_calls']}  timings: {result['timings_s']}")
    console.print(f"results in {run_dir}/metrics.json and {run_dir}/scores.jsonl")
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        rss = [resource.getrusage(w).ru_maxrss / 2**20 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        out = {k: v for k, v in result.items() if k != "rows"}
        out.update(command="msr run " + " ".join(sys.argv[sys.argv.index("run") + 1:]) if "run" in sys.argv
                   else "msr run", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs, load {load0[0]:.1f} at start / "
                           f"{os.getloadavg()[0]:.1f} at end", peak_rss_gb=round(max(rss), 2),
                   fresh_store=bool(result["model_calls"]["item_summaries"]))
        (record / "metrics.json").write_text(json.dumps(out, indent=1))
        console.print(f"recorded in {record / 'metrics.json'}")


def recommend(user: str = UserOpt, top: int = typer.Option(10, help="How many items to show."),
              retrieve: bool = typer.Option(False, help="Retrieve candidates from Chroma instead of the test "
                                                        "candidates."),
              config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """One user's preference summary and top items with scores (runs the LangGraph pipeline)."""
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.graphs.pipeline import compile_pipeline, make_checkpointer, make_node_cache, thread
    from mllm_msr.graphs.prepare import interactive_config, prepare_user, rich_advance
    from mllm_msr.pipeline import build_services, finalize_config, load_data

    cfg = interactive_config(finalize_config(load_cfg(config, set_)))
    ds = load_data(cfg)
    seqs = user_sequences(ds, user)
    splits = build_splits(ds, cfg.protocol)
    case = next((c for c in (*splits.test, *splits.valid) if c.user_id == user), None)
    if case is not None:
        history, ts = list(case.history), list(case.history_timestamps)
    else:
        history, ts = [i.item_id for i in seqs[user]], [i.timestamp for i in seqs[user]]
    candidates = [] if (retrieve or case is None) else list(case.candidates)
    services = build_services(cfg, ds)
    with Progress(console=console) as prog:  # this user's history (+ candidates) only, never the catalog
        prepare_user(services, user, history, ts, candidates, rich_advance(prog))
    graph = compile_pipeline(services, make_checkpointer(cfg), make_node_cache(cfg))
    state = graph.invoke({"user_id": user, "history": history, "history_timestamps": ts,
                          "candidates": candidates}, thread(user))
    console.print(f"[bold]user {user}[/] — history of {len(history)} items")
    console.print(f"[bold]preference summary:[/] {state['user_summary']}")
    t = Table(title="top items")
    for col in ("rank", "item", "title", "score", "target"):
        t.add_column(col)
    positives = {c for c, lab in zip(case.candidates, case.labels, strict=True) if lab} if case else set()
    for r, row in enumerate(state["ranking"][:top], 1):
        t.add_row(str(r), row["item_id"], row["title"], f"{row['score']:.3f}",
                  "✓" if row["item_id"] in positives else "")
    console.print(t)


def config_cmd(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
               as_yaml: bool = typer.Option(False, "--yaml", help="Print the effective config as YAML.")) -> None:
    """Every setting with its default and help (or the effective config as YAML)."""
    import yaml

    from mllm_msr.config import describe

    if as_yaml:
        console.print(yaml.safe_dump(load_cfg(config, set_).model_dump(), sort_keys=False))
        return
    t = Table(title="settings (override with --set key=value or a YAML file)")
    for col in ("key", "default", "help"):
        t.add_column(col)
    for row in describe():
        t.add_row(*row)
    console.print(t)


def chat(user: str = UserOpt, config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Conversational recommender: say what you like or want; the memory folds it in and answers."""
    from langchain_core.messages import HumanMessage

    from mllm_msr.graphs.chat import compile_chat
    from mllm_msr.graphs.pipeline import make_checkpointer, make_node_cache, thread
    from mllm_msr.graphs.prepare import interactive_config, prepare_user, rich_advance
    from mllm_msr.pipeline import build_services, finalize_config, load_data

    cfg = interactive_config(finalize_config(load_cfg(config, set_)))
    ds = load_data(cfg)
    seqs = user_sequences(ds, user)
    s = build_services(cfg, ds)
    s.warm_up()  # the model loads while the store opens and the user types
    hist = [i.item_id for i in seqs[user]]
    console.print(f"summarizing {user}'s {len(hist)} history items and preferences (cached after the first time)…")
    with Progress(console=console) as prog:  # this user's history only, never the catalog
        prepare_user(s, user, hist, [i.timestamp for i in seqs[user]], advance=rich_advance(prog))
    graph = compile_chat(s, make_checkpointer(cfg, "chat"), make_node_cache(cfg))
    conf = thread(f"chat:{user}")
    console.print(f"[bold]chatting as {user}[/] ({len(hist)} items in history). Empty line = recommend, "
                  "'quit' to stop.")
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


def web(port: int = typer.Option(8765, help="Port to serve on."),
        users: int = typer.Option(12, help="How many test users to list."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs "
                                 "--allow-remote and a token."),
        allow_remote: bool = typer.Option(False, "--allow-remote",
                                          help="Allow binding a non-loopback --host (a token is then required)."),
        token: str | None = typer.Option(None, envvar="MSR_WEB_TOKEN", show_default=False,
                                         help="Require this token on every request (Authorization: Bearer, "
                                              "or ?token= once in a browser). Env: MSR_WEB_TOKEN."),
        config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Web demo: history covers, summary evolution, recommendations with scores, and a chat box."""
    from mllm_msr.web import check_bind

    try:
        check_bind(host, allow_remote, token)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    import uvicorn

    from mllm_msr.data.protocol import build_splits
    from mllm_msr.graphs.prepare import interactive_config
    from mllm_msr.pipeline import build_services, finalize_config, load_data
    from mllm_msr.web import create_app

    cfg = interactive_config(finalize_config(load_cfg(config, set_)))
    ds = load_data(cfg)
    s = build_services(cfg, ds)
    s.warm_up()  # a resident server: the model loads while it starts, not on the first request
    cases = build_splits(ds, cfg.protocol).test[:users]  # a user's page summarizes only that user's items
    table = {c.user_id: {"history": list(c.history), "timestamps": list(c.history_timestamps),
                         "candidates": list(c.candidates)} for c in cases}
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving on http://{shown}:{port}/" + (" (token required)" if token else ""))
    uvicorn.run(create_app(s, table, token=token), host=host, port=port, log_level="warning")
